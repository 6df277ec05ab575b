//! The signal handlers. They allocate nothing, take no blocking lock and never unwind:
//! anything they cannot replay ends the process with a message on stderr.

use std::fmt::{self, Write as _};
use std::sync::atomic::Ordering;
use std::sync::{Once, OnceLock};
use std::time::Instant;

use hvisor_vhost_tests::harness::ACCESS_TIMEOUT;

use super::decode::{self, mask, Emulated, EmulatedKind, Stepped, StoreSource};
use super::{TrapState, TRAP, WINDOW_END, WINDOW_SIZE, WINDOW_START};

/// EFLAGS.TF: trap after the next instruction.
const TRAP_FLAG: i64 = 0x100;

/// The actions that were installed before ours (Rust's stack-overflow handler for SIGSEGV).
static PREVIOUS_SIGSEGV: OnceLock<libc::sigaction> = OnceLock::new();
static PREVIOUS_SIGTRAP: OnceLock<libc::sigaction> = OnceLock::new();

/// An `SA_SIGINFO` signal handler.
type SigInfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// An access being single-stepped, between its `SIGSEGV` and its `SIGTRAP`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingStep {
    gpa: u64,
    /// Host address of the operand in the window.
    host: usize,
    plan: Stepped,
    /// Where the instruction falls through to.
    next_rip: u64,
}

/// Installs the handlers for the whole process, once.
pub(super) fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        install_one(libc::SIGSEGV, on_sigsegv, &PREVIOUS_SIGSEGV);
        install_one(libc::SIGTRAP, on_sigtrap, &PREVIOUS_SIGTRAP);
    });
}

fn install_one(signal: libc::c_int, handler: SigInfoHandler, previous: &OnceLock<libc::sigaction>) {
    // SAFETY: an all-zero sigaction is a valid value of this plain C struct.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reads the current action into `old`, which we own.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "sigaction: {}", std::io::Error::last_os_error());
    previous.set(old).expect("installed once");

    // SAFETY: as above.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as usize;
    // No SA_ONSTACK: the faulting code is the driver, not a stack overflow, and the thread's
    // own stack has room for the decoder. No SA_NODEFER: a fault inside a handler kills the
    // process instead of recursing.
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is ours; sigemptyset initialises it.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a valid `extern "C"` SA_SIGINFO handler.
    let rc = unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "sigaction: {}", std::io::Error::last_os_error());
}

/// The live guest's state, if the calling thread is the guest's.
fn guest_state<'a>() -> Option<&'a TrapState> {
    // SAFETY: TRAP is null or points to the live guest's state, which its TrapGuest frees only
    // after emptying the window, when no fault of the guest thread can be in flight.
    let state = unsafe { TRAP.load(Ordering::Acquire).as_ref() }?;
    // SAFETY: gettid has no preconditions.
    (unsafe { libc::gettid() } == state.thread).then_some(state)
}

/// The saved general-purpose registers of the interrupted code.
///
/// # Safety
/// `context` must be the third argument of an `SA_SIGINFO` handler, used by nobody else
/// while the returned borrow lives.
unsafe fn saved_registers<'a>(context: *mut libc::c_void) -> &'a mut [libc::greg_t] {
    // SAFETY: the caller passes the kernel's ucontext_t of this thread, ours alone until the
    // handler returns.
    unsafe { &mut (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs }
}

/// Sets the window's protection: accessible for one stepped instruction, `PROT_NONE` again
/// after it.
fn protect_window(protection: libc::c_int) {
    let start = WINDOW_START.load(Ordering::Acquire);
    // SAFETY: the window is a live mapping of WINDOW_SIZE bytes owned by the trap guest; only
    // its protection changes.
    let rc = unsafe { libc::mprotect(start as *mut libc::c_void, WINDOW_SIZE, protection) };
    if rc != 0 {
        fatal(format_args!(
            "mprotect of the window failed (errno {})",
            errno()
        ));
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

extern "C" fn on_sigsegv(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let fault = unsafe { (*info).si_addr() } as usize;
    let start = WINDOW_START.load(Ordering::Acquire);
    let end = WINDOW_END.load(Ordering::Acquire);
    if !(start..end).contains(&fault) {
        chain(signal, info, context, &PREVIOUS_SIGSEGV);
        return;
    }
    let Some(state) = guest_state() else {
        fatal(format_args!(
            "a thread other than the guest's touched the trap window at {fault:#x}"
        ));
    };
    if state.step.get().is_some() {
        fatal(format_args!(
            "fault at {fault:#x} while single-stepping an access"
        ));
    }
    // SAFETY: `context` is this handler's ucontext, and nothing else uses it meanwhile.
    let gregs = unsafe { saved_registers(context) };
    let rip = gregs[libc::REG_RIP as usize] as u64;
    let insn = decode::decode_at(rip);
    let gpa = state.window_gpa + (fault - start) as u64;

    if let Some(access) = Emulated::of(&insn) {
        check_operand(fault, end, access.width);
        emulate(state, gregs, gpa, access);
        gregs[libc::REG_RIP as usize] = (rip + insn.len() as u64) as i64;
        return;
    }
    // SAFETY: only this guest thread's SIGSEGV handler uses the factory, and it does not
    // nest (SIGSEGV is blocked while it runs).
    let factory = unsafe { &mut *state.info.get() };
    let Some(plan) = Stepped::of(&insn, factory) else {
        fatal(format_args!(
            "cannot replay the access at {fault:#x}: {:?} ({} bytes at rip {rip:#x}: {:02x?}); \
             the harness emulates MOV/MOVZX/MOVSX/MOVSXD and single-steps instructions with one \
             1-, 2-, 4- or 8-byte memory operand that fall through",
            insn.code(),
            insn.len(),
            decode::insn_bytes(rip, insn.len()),
        ));
    };
    check_operand(fault, end, plan.width);
    let reply = plan.reads.then(|| {
        state.loads.fetch_add(1, Ordering::Relaxed);
        device_read(state, gpa, plan.width)
    });
    protect_window(libc::PROT_READ | libc::PROT_WRITE);
    if let Some(value) = reply {
        let bytes = value.to_le_bytes();
        // SAFETY: `fault..fault+width` is inside the window (checked), which is now writable;
        // the stepped instruction reads exactly these bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), fault as *mut u8, plan.width.into())
        };
    }
    state.step.set(Some(PendingStep {
        gpa,
        host: fault,
        plan,
        next_rip: rip + insn.len() as u64,
    }));
    gregs[libc::REG_EFL as usize] |= TRAP_FLAG;
}

extern "C" fn on_sigtrap(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let Some((state, step)) = guest_state().and_then(|s| s.step.take().map(|step| (s, step)))
    else {
        chain(signal, info, context, &PREVIOUS_SIGTRAP);
        return;
    };
    // SAFETY: `context` is this handler's ucontext, and nothing else uses it meanwhile.
    let gregs = unsafe { saved_registers(context) };
    gregs[libc::REG_EFL as usize] &= !TRAP_FLAG;
    let rip = gregs[libc::REG_RIP as usize] as u64;
    if rip != step.next_rip {
        fatal(format_args!(
            "the stepped instruction went to {rip:#x} instead of {:#x}",
            step.next_rip
        ));
    }
    let mut written = [0u8; 8];
    if step.plan.writes {
        // SAFETY: the operand lies in the window (checked before the step), which stays
        // accessible until the protect below.
        unsafe {
            std::ptr::copy_nonoverlapping(
                step.host as *const u8,
                written.as_mut_ptr(),
                step.plan.width.into(),
            )
        };
    }
    protect_window(libc::PROT_NONE);
    if step.plan.writes {
        device_write(
            state,
            step.gpa,
            step.plan.width,
            u64::from_le_bytes(written),
        );
        state.stores.fetch_add(1, Ordering::Relaxed);
    }
    state.stepped.fetch_add(1, Ordering::Relaxed);
}

/// The operand must lie in the window and be naturally aligned, as virtio-mmio registers are.
fn check_operand(fault: usize, end: usize, width: u8) {
    let width = usize::from(width);
    if !fault.is_multiple_of(width) || fault + width > end {
        fatal(format_args!(
            "{width}-byte access at {fault:#x} is misaligned or runs past the window"
        ));
    }
}

fn emulate(state: &TrapState, gregs: &mut [libc::greg_t], gpa: u64, access: Emulated) {
    match access.kind {
        EmulatedKind::Load { dest, extend } => {
            let value = extend.apply(device_read(state, gpa, access.width), access.width);
            let slot = &mut gregs[dest.slot];
            *slot = dest.merge(*slot as u64, value) as i64;
            state.loads.fetch_add(1, Ordering::Relaxed);
        }
        EmulatedKind::Store { source } => {
            let value = match source {
                StoreSource::Register(src) => src.read(gregs[src.slot] as u64),
                StoreSource::Immediate(imm) => imm,
            } & mask(access.width);
            device_write(state, gpa, access.width, value);
            state.stores.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A synchronous `device_req` read, as hvisor sends it; the reply masked to the width.
fn device_read(state: &TrapState, gpa: u64, width: u8) -> u64 {
    let deadline = Some(Instant::now() + ACCESS_TIMEOUT);
    match state.vcpu.access_raw(gpa, width, None, deadline) {
        Ok(value) => value & mask(width),
        Err(e) => fatal(format_args!("read {gpa:#x}/{width}: {e}")),
    }
}

/// A `device_req` write: asynchronous at window offset 0x50 (the simulator decides, as
/// hvisor does), otherwise synchronous.
fn device_write(state: &TrapState, gpa: u64, width: u8, value: u64) {
    let deadline = Some(Instant::now() + ACCESS_TIMEOUT);
    if let Err(e) = state.vcpu.access_raw(gpa, width, Some(value), deadline) {
        fatal(format_args!("write {gpa:#x}/{width} = {value:#x}: {e}"));
    }
}

/// Hands a signal that is not ours to the action installed before ours (Rust's handler
/// reports a stack overflow), or else to the default action.
fn chain(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
    previous: &OnceLock<libc::sigaction>,
) {
    match previous.get() {
        Some(action)
            if action.sa_sigaction != libc::SIG_DFL && action.sa_sigaction != libc::SIG_IGN =>
        {
            if action.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: with SA_SIGINFO the previous action is a three-argument handler; it
                // gets our arguments unchanged.
                let handler: SigInfoHandler = unsafe { std::mem::transmute(action.sa_sigaction) };
                handler(signal, info, context);
            } else {
                // SAFETY: without SA_SIGINFO the previous action is a one-argument handler.
                let handler: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(action.sa_sigaction) };
                handler(signal);
            }
        }
        _ => {
            // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask.
            let default: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: restores the default action, then re-sends the signal; it is blocked
            // until this handler returns, and then the default action ends the process.
            unsafe {
                libc::sigaction(signal, &default, std::ptr::null_mut());
                libc::raise(signal);
            }
        }
    }
}

/// Ends the process with a message on stderr, formatted without allocating.
fn fatal(args: fmt::Arguments<'_>) -> ! {
    let mut text = StackText::default();
    let _ = text.write_str("trap harness: ");
    let _ = text.write_fmt(args);
    let _ = text.write_str("\n");
    // SAFETY: write(2) from a live buffer; abort never returns.
    unsafe {
        libc::write(2, text.buf.as_ptr().cast(), text.len);
        libc::abort()
    }
}

/// A message buffer on the stack; text past its end is cut.
struct StackText {
    buf: [u8; 1024],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        StackText {
            buf: [0; 1024],
            len: 0,
        }
    }
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let take = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
