//! The provider protocol: how a separate hypervisor stand-in (the simulator in another
//! process, a test rig) hands the bridge its bridge page, eventfds and zone RAM.
//!
//! The bridge connects to a UNIX stream socket. The provider sends one message: a 4-byte
//! little-endian length N, then N bytes of JSON, with every fd attached (SCM_RIGHTS) to that
//! one `sendmsg`. JSON `fd` values index the received fd array:
//!
//! ```json
//! {"version":1,"bridge":{"fd":0,"offset":0},"wakeup_fd":1,"finish_fd":2,
//!  "regions":[{"zone0_ipa":1342177280,"size":805306368,"fd":3,"offset":0}]}
//! ```
//!
//! The provider writes the wakeup eventfd when requests are pending and `need_wakeup` is
//! set; the bridge writes 1 to the finish eventfd for FINISH_REQ. The connection stays open:
//! EOF means the provider is gone.
//!
//! Two optional keys describe a provider that plays an older hvisor; a provider omits them
//! for the defaults:
//!
//! - `"abi":"32/4/4"`: the bridge page's `MAX_REQ/MAX_DEVS/MAX_CPUS` (default 32/8/32);
//! - `"wakeup":"signal"` (default `"eventfd"`): the provider wakes the bridge with signal 10
//!   directed at one thread, as hvisor.ko modules without `HVISOR_SET_EVENTFD` do. The bridge
//!   then blocks that signal in the thread that takes the handover, reads it through a
//!   signalfd, and answers with one message in the same framing (no fds):
//!   `{"pid":1234,"tid":1234}`, the thread the provider must signal. `wakeup_fd` is still
//!   sent and unused.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::abi::HvisorAbi;
use crate::wakeup::{gettid, SignalWakeup, Wakeup, WakeupKind};
use crate::{BridgePage, Hsm, HsmError, RamFd};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest JSON message accepted.
const MAX_MESSAGE_LEN: usize = 1 << 20;
/// The kernel's limit of fds in one SCM_RIGHTS message (SCM_MAX_FD).
const MAX_FDS: usize = 253;
/// How long the bridge waits for the handover after connecting.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The fds a provider hands over (the sending side of the protocol).
#[derive(Debug, Clone)]
pub struct Handover<'a> {
    /// The bridge page: fd and mmap offset.
    pub bridge: (BorrowedFd<'a>, u64),
    /// Eventfd the provider writes to wake the bridge.
    pub wakeup: BorrowedFd<'a>,
    /// Eventfd the bridge writes for FINISH_REQ.
    pub finish: BorrowedFd<'a>,
    /// Zone RAM regions.
    pub regions: Vec<RegionHandover<'a>>,
}

/// One zone RAM region of a [`Handover`].
#[derive(Debug, Clone)]
pub struct RegionHandover<'a> {
    /// The region's root-Linux address (what `ram_region` is asked for).
    pub zone0_ipa: u64,
    /// Region size in bytes.
    pub size: u64,
    /// File that maps the region.
    pub fd: BorrowedFd<'a>,
    /// mmap offset of `zone0_ipa` in `fd`.
    pub offset: u64,
}

/// The handover JSON message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverMsg {
    /// Must be [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The bridge page.
    pub bridge: FdOffsetMsg,
    /// Index of the wakeup eventfd.
    pub wakeup_fd: usize,
    /// Index of the finish eventfd.
    pub finish_fd: usize,
    /// Zone RAM regions.
    pub regions: Vec<RegionMsg>,
    /// The bridge page's layout, `MAX_REQ/MAX_DEVS/MAX_CPUS`; absent for 32/8/32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abi: Option<String>,
    /// How the provider wakes the bridge; absent for the eventfd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wakeup: Option<WakeupMsg>,
}

/// The `"wakeup"` key of the handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WakeupMsg {
    /// The wakeup eventfd.
    Eventfd,
    /// Signal 10 to the thread the bridge names in its [`SignalTargetMsg`].
    Signal,
}

/// The bridge's answer to a `"wakeup":"signal"` handover: the thread to signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalTargetMsg {
    /// The bridge's process id.
    pub pid: i32,
    /// The thread that polls the signalfd.
    pub tid: i32,
}

/// What a handover says beyond the fds; the defaults describe hvisor 6a3fb78 with an
/// eventfd-capable hvisor.ko.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoverMode {
    /// The bridge page's layout.
    pub abi: HvisorAbi,
    /// How the provider wakes the bridge.
    pub wakeup: WakeupKind,
}

/// An fd index with an mmap offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdOffsetMsg {
    /// Index into the SCM_RIGHTS array.
    pub fd: usize,
    /// mmap offset.
    pub offset: u64,
}

/// A zone RAM region in the handover JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionMsg {
    /// Root-Linux address of the region.
    pub zone0_ipa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Index into the SCM_RIGHTS array.
    pub fd: usize,
    /// mmap offset of `zone0_ipa`.
    pub offset: u64,
}

impl HandoverMsg {
    /// Checks version, fd indices and region ranges against `fd_count` received fds.
    pub fn validate(&self, fd_count: usize) -> Result<(), HsmError> {
        let protocol = |msg: String| Err(HsmError::Protocol(msg));
        if self.version != PROTOCOL_VERSION {
            return protocol(format!(
                "unsupported version {} (expected {PROTOCOL_VERSION})",
                self.version
            ));
        }
        let fds = [
            ("bridge.fd", self.bridge.fd),
            ("wakeup_fd", self.wakeup_fd),
            ("finish_fd", self.finish_fd),
        ];
        let region_fds = self.regions.iter().map(|r| ("regions[].fd", r.fd));
        for (name, index) in fds.into_iter().chain(region_fds) {
            if index >= fd_count {
                return protocol(format!(
                    "{name} {index} out of range ({fd_count} fds received)"
                ));
            }
        }
        if i64::try_from(self.bridge.offset).is_err() {
            return protocol(format!("bridge offset {:#x} too large", self.bridge.offset));
        }
        for r in &self.regions {
            let end = r.zone0_ipa.checked_add(r.size);
            let mmap_end = r
                .offset
                .checked_add(r.size)
                .and_then(|e| i64::try_from(e).ok());
            if r.size == 0 || end.is_none() || mmap_end.is_none() {
                return protocol(format!(
                    "bad region {:#x}+{:#x} at offset {:#x}",
                    r.zone0_ipa, r.size, r.offset
                ));
            }
        }
        Ok(())
    }
}

/// Sends `handover` as the one protocol message on `stream`, in the default mode.
pub fn send_handover(stream: &UnixStream, handover: &Handover<'_>) -> Result<(), HsmError> {
    send_handover_mode(stream, handover, HandoverMode::default())
}

/// Sends `handover` with the keys that describe `mode`. With [`WakeupKind::Signal`], read
/// the bridge's answer with [`parse_signal_target`].
pub fn send_handover_mode(
    stream: &UnixStream,
    handover: &Handover<'_>,
    mode: HandoverMode,
) -> Result<(), HsmError> {
    let mut fds: Vec<RawFd> = vec![
        handover.bridge.0.as_raw_fd(),
        handover.wakeup.as_raw_fd(),
        handover.finish.as_raw_fd(),
    ];
    let mut regions = Vec::with_capacity(handover.regions.len());
    for region in &handover.regions {
        regions.push(RegionMsg {
            zone0_ipa: region.zone0_ipa,
            size: region.size,
            fd: fds.len(),
            offset: region.offset,
        });
        fds.push(region.fd.as_raw_fd());
    }
    if fds.len() > MAX_FDS {
        return Err(HsmError::Protocol(format!("too many fds ({})", fds.len())));
    }
    let msg = HandoverMsg {
        version: PROTOCOL_VERSION,
        bridge: FdOffsetMsg {
            fd: 0,
            offset: handover.bridge.1,
        },
        wakeup_fd: 1,
        finish_fd: 2,
        regions,
        abi: (mode.abi != HvisorAbi::CURRENT).then(|| mode.abi.to_string()),
        wakeup: (mode.wakeup == WakeupKind::Signal).then_some(WakeupMsg::Signal),
    };
    let json = serde_json::to_vec(&msg)
        .map_err(|e| HsmError::Protocol(format!("cannot encode handover: {e}")))?;
    send_raw(stream, &json, &fds)
}

/// Sends one length-prefixed message with `fds` attached (the protocol's framing).
fn send_raw(stream: &UnixStream, payload: &[u8], fds: &[RawFd]) -> Result<(), HsmError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n as usize <= MAX_MESSAGE_LEN)
        .ok_or_else(|| HsmError::Protocol(format!("message too long ({} bytes)", payload.len())))?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(payload);
    let sent = stream
        .send_with_fds(&[&frame[..]], fds)
        .map_err(|e| HsmError::io("sending the handover", e.into()))?;
    // The fds went with the first chunk; a stream may take the rest separately.
    let mut writer = stream;
    writer
        .write_all(&frame[sent..])
        .map_err(|e| HsmError::io("sending the handover", e))
}

/// Receives and validates the handover message. Returns the JSON and the fds it indexes.
pub fn recv_handover(stream: &UnixStream) -> Result<(HandoverMsg, Vec<OwnedFd>), HsmError> {
    let recv_err = |e| HsmError::io("receiving the handover", e);
    let mut len_bytes = [0u8; 4];
    let mut raw_fds: Vec<RawFd> = vec![-1; MAX_FDS];
    let mut iovecs = [libc::iovec {
        iov_base: len_bytes.as_mut_ptr().cast(),
        iov_len: len_bytes.len(),
    }];
    // SAFETY: the iovec points at `len_bytes`, which is writable for its whole length and
    // outlives the call.
    let (got, fd_count) = unsafe { stream.recv_with_fds(&mut iovecs, &mut raw_fds) }
        .map_err(|e| recv_err(e.into()))?;
    // SAFETY: recvmsg just installed these fds in our table; nothing else owns them.
    let fds: Vec<OwnedFd> = raw_fds[..fd_count]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for fd in &fds {
        set_cloexec(fd.as_fd()).map_err(recv_err)?;
    }
    if got == 0 {
        return Err(HsmError::Protocol(
            "connection closed before the handover".into(),
        ));
    }
    let mut reader = stream;
    reader.read_exact(&mut len_bytes[got..]).map_err(recv_err)?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(HsmError::Protocol(format!(
            "message too long ({len} bytes)"
        )));
    }
    let mut json = vec![0u8; len];
    reader.read_exact(&mut json).map_err(recv_err)?;
    let msg: HandoverMsg = serde_json::from_slice(&json)
        .map_err(|e| HsmError::Protocol(format!("bad handover JSON: {e}")))?;
    msg.validate(fds.len())?;
    Ok((msg, fds))
}

/// Parses the bridge's answer to a signal handover from the bytes received so far: `None`
/// until the whole message is there.
pub fn parse_signal_target(received: &[u8]) -> Result<Option<SignalTargetMsg>, HsmError> {
    let Some(len_bytes) = received.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(HsmError::Protocol(format!(
            "message too long ({len} bytes)"
        )));
    }
    let Some(json) = received.get(4..4 + len) else {
        return Ok(None);
    };
    serde_json::from_slice(json)
        .map(Some)
        .map_err(|e| HsmError::Protocol(format!("bad signal target JSON: {e}")))
}

fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_SETFD on an fd we own; no memory is passed.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own; no memory is passed.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn eventfd_from(fd: &OwnedFd) -> io::Result<EventFd> {
    let dup = fd.try_clone()?;
    // SAFETY: `dup` is a fresh fd we own; the EventFd takes it over.
    Ok(unsafe { EventFd::from_raw_fd(dup.into_raw_fd()) })
}

#[derive(Debug)]
struct ProvidedRegion {
    zone0_ipa: u64,
    size: u64,
    fd: Arc<OwnedFd>,
    offset: u64,
}

/// The bridge side of the provider protocol.
#[derive(Debug)]
pub struct ProviderHsm {
    stream: UnixStream,
    bridge: BridgePage,
    wakeup: Wakeup,
    finish: EventFd,
    regions: Vec<ProvidedRegion>,
}

impl ProviderHsm {
    /// Connects to the provider at `socket_path` and takes its handover.
    pub fn connect(socket_path: impl AsRef<Path>) -> Result<Self, HsmError> {
        let stream = UnixStream::connect(socket_path.as_ref())
            .map_err(|e| HsmError::io("connecting to the HSM provider", e))?;
        Self::from_stream(stream)
    }

    /// Takes the handover on an already connected stream.
    ///
    /// When the provider wakes with a signal, the signal is blocked in the calling thread
    /// and directed at it: that thread must poll [`Hsm::wakeup_fd`].
    pub fn from_stream(stream: UnixStream) -> Result<Self, HsmError> {
        let timeout_err = |e| HsmError::io("setting the handover timeout", e);
        stream
            .set_read_timeout(Some(HANDOVER_TIMEOUT))
            .map_err(timeout_err)?;
        let (msg, fds) = recv_handover(&stream)?;
        stream.set_read_timeout(None).map_err(timeout_err)?;

        let fds: Vec<Arc<OwnedFd>> = fds.into_iter().map(Arc::new).collect();
        let abi = match &msg.abi {
            Some(abi) => abi.parse()?,
            None => HvisorAbi::CURRENT,
        };
        let bridge = BridgePage::map_abi(fds[msg.bridge.fd].as_fd(), msg.bridge.offset, abi)?;
        let eventfd_err = |e| HsmError::io("taking over a provider eventfd", e);
        let wakeup = match msg.wakeup {
            None | Some(WakeupMsg::Eventfd) => {
                // ack_wakeup must never block, whatever flags the provider used.
                set_nonblocking(fds[msg.wakeup_fd].as_fd()).map_err(eventfd_err)?;
                Wakeup::Eventfd(eventfd_from(&fds[msg.wakeup_fd]).map_err(eventfd_err)?)
            }
            Some(WakeupMsg::Signal) => {
                let signal = SignalWakeup::new()
                    .map_err(|e| HsmError::io("setting up the signal wakeup", e))?;
                let target = SignalTargetMsg {
                    // SAFETY: getpid has no arguments and cannot fail.
                    pid: unsafe { libc::getpid() },
                    tid: gettid(),
                };
                let json = serde_json::to_vec(&target)
                    .map_err(|e| HsmError::Protocol(format!("cannot encode the target: {e}")))?;
                send_raw(&stream, &json, &[])?;
                Wakeup::Signal(signal)
            }
        };
        log::info!("HSM provider: bridge page {abi}, wakeup: {}", wakeup.kind());
        let finish = eventfd_from(&fds[msg.finish_fd]).map_err(eventfd_err)?;
        let regions = msg
            .regions
            .iter()
            .map(|r| ProvidedRegion {
                zone0_ipa: r.zone0_ipa,
                size: r.size,
                fd: fds[r.fd].clone(),
                offset: r.offset,
            })
            .collect();
        Ok(ProviderHsm {
            stream,
            bridge,
            wakeup,
            finish,
            regions,
        })
    }

    /// How the provider wakes the bridge.
    pub fn wakeup_kind(&self) -> WakeupKind {
        self.wakeup.kind()
    }

    /// The provider connection: EOF/HUP on it means the provider is gone.
    pub fn control_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl Hsm for ProviderHsm {
    fn bridge(&self) -> &BridgePage {
        &self.bridge
    }

    fn wakeup_fd(&self) -> BorrowedFd<'_> {
        self.wakeup.fd()
    }

    fn ack_wakeup(&self) {
        self.wakeup.ack();
    }

    fn finish_req(&self) -> Result<(), HsmError> {
        self.finish
            .write(1)
            .map_err(|e| HsmError::io("signalling FINISH_REQ", e))
    }

    fn ram_region(&self, zone0_ipa: u64, size: u64) -> Result<RamFd, HsmError> {
        let end = zone0_ipa.checked_add(size);
        self.regions
            .iter()
            .find(|r| {
                r.zone0_ipa <= zone0_ipa && end.is_some_and(|end| end <= r.zone0_ipa + r.size)
            })
            .and_then(|r| {
                Some(RamFd {
                    fd: r.fd.clone(),
                    offset: r.offset.checked_add(zone0_ipa - r.zone0_ipa)?,
                })
            })
            .ok_or(HsmError::NoRamRegion { zone0_ipa, size })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::*;
    use crate::abi::{DeviceReq, MMAP_SIZE};
    use crate::mmap::{memfd, SharedMapping};
    use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK};

    struct ProviderFds {
        bridge: OwnedFd,
        wakeup: EventFd,
        finish: EventFd,
        ram: OwnedFd,
    }

    const RAM_ZONE0: u64 = 0x5000_0000;
    const RAM_SIZE: u64 = 0x10_0000;

    fn provider_fds() -> ProviderFds {
        ProviderFds {
            // The bridge page sits at offset 4096 to exercise the offset.
            bridge: memfd("bridge", 2 * MMAP_SIZE as u64).unwrap(),
            wakeup: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap(),
            finish: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap(),
            ram: memfd("ram", RAM_SIZE).unwrap(),
        }
    }

    fn borrow(fd: &impl AsRawFd) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by the referenced value, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
    }

    fn handover(p: &ProviderFds) -> Handover<'_> {
        Handover {
            bridge: (p.bridge.as_fd(), MMAP_SIZE as u64),
            wakeup: borrow(&p.wakeup),
            finish: borrow(&p.finish),
            regions: vec![RegionHandover {
                zone0_ipa: RAM_ZONE0,
                size: RAM_SIZE,
                fd: p.ram.as_fd(),
                offset: 0,
            }],
        }
    }

    #[test]
    fn handover_over_socketpair_shares_everything() {
        let p = provider_fds();
        let (provider_end, bridge_end) = UnixStream::pair().unwrap();
        send_handover(&provider_end, &handover(&p)).unwrap();
        let hsm = ProviderHsm::from_stream(bridge_end).unwrap();

        // The bridge page crosses in both directions.
        let provider_page = BridgePage::map(p.bridge.as_fd(), MMAP_SIZE as u64).unwrap();
        let request = DeviceReq {
            src_cpu: 2,
            address: 0xa000_0000,
            size: 4,
            src_zone: 1,
            ..Default::default()
        };
        assert!(provider_page.push_request(&request));
        assert_eq!(hsm.bridge().pop_request(), Some(request));
        hsm.bridge().reply(2, 0x74726976).unwrap();
        assert_eq!(provider_page.cfg_flag(2), 1);
        assert_eq!(provider_page.cfg_value(2), 0x74726976);

        // Wakeup: provider -> bridge.
        p.wakeup.write(1).unwrap();
        let mut poll = libc::pollfd {
            fd: hsm.wakeup_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 1);
        hsm.ack_wakeup();
        assert!(p.wakeup.read().is_err(), "ack_wakeup cleared the counter");

        // Finish: bridge -> provider.
        hsm.finish_req().unwrap();
        assert_eq!(p.finish.read().unwrap(), 1);

        // RAM: a bridge-side mapping of ram_region sees the provider's writes.
        let ram = hsm.ram_region(RAM_ZONE0 + 0x1000, 0x1000).unwrap();
        assert_eq!(ram.offset, 0x1000);
        let bridge_view = SharedMapping::new(ram.fd.as_fd(), ram.offset, 0x1000).unwrap();
        let provider_view = SharedMapping::new(p.ram.as_fd(), 0x1000, 0x1000).unwrap();
        // SAFETY: both pointers are inside live 4 KiB mappings; byte atomics avoid data races.
        let (theirs, ours) = unsafe {
            (
                &*provider_view.as_ptr().add(17).cast::<AtomicU8>(),
                &*bridge_view.as_ptr().add(17).cast::<AtomicU8>(),
            )
        };
        theirs.store(0x5a, Ordering::SeqCst);
        assert_eq!(ours.load(Ordering::SeqCst), 0x5a);

        assert!(matches!(
            hsm.ram_region(RAM_ZONE0 + RAM_SIZE - 0x1000, 0x2000),
            Err(HsmError::NoRamRegion { .. })
        ));
        assert!(hsm.ram_region(RAM_ZONE0 - 0x1000, 0x1000).is_err());

        // EOF on the control fd once the provider goes away.
        drop(provider_end);
        let mut poll = libc::pollfd {
            fd: hsm.control_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 1);
    }

    /// Sends `json` with the four provider fds attached and returns the bridge's verdict.
    fn receive_raw(json: &str) -> Result<ProviderHsm, HsmError> {
        let p = provider_fds();
        let (provider_end, bridge_end) = UnixStream::pair().unwrap();
        let fds = [
            p.bridge.as_raw_fd(),
            p.wakeup.as_raw_fd(),
            p.finish.as_raw_fd(),
            p.ram.as_raw_fd(),
        ];
        send_raw(&provider_end, json.as_bytes(), &fds).unwrap();
        ProviderHsm::from_stream(bridge_end)
    }

    fn protocol_error(json: &str) -> String {
        match receive_raw(json) {
            Err(HsmError::Protocol(msg)) => msg,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    const GOOD: &str = r#"{"version":1,"bridge":{"fd":0,"offset":0},"wakeup_fd":1,"finish_fd":2,
        "regions":[{"zone0_ipa":1342177280,"size":1048576,"fd":3,"offset":0}]}"#;

    #[test]
    fn documented_example_is_accepted() {
        let hsm = receive_raw(GOOD).unwrap();
        assert_eq!(hsm.ram_region(0x5000_0000, 0x10_0000).unwrap().offset, 0);
    }

    #[test]
    fn bad_messages_are_rejected_clearly() {
        let msg = protocol_error(&GOOD.replace("\"version\":1", "\"version\":2"));
        assert!(msg.contains("unsupported version 2"), "{msg}");
        let msg = protocol_error(&GOOD.replace("\"finish_fd\":2", "\"finish_fd\":4"));
        assert!(msg.contains("finish_fd 4 out of range"), "{msg}");
        let msg = protocol_error(&GOOD.replace("\"fd\":3", "\"fd\":9"));
        assert!(msg.contains("regions[].fd 9 out of range"), "{msg}");
        let msg = protocol_error(&GOOD.replace("\"wakeup_fd\":1,", ""));
        assert!(msg.contains("missing field `wakeup_fd`"), "{msg}");
        let msg = protocol_error(&GOOD.replace("\"version\":1", "\"version\":1,\"extra\":0"));
        assert!(msg.contains("unknown field `extra`"), "{msg}");
        let msg = protocol_error(&GOOD.replace("\"size\":1048576", "\"size\":0"));
        assert!(msg.contains("bad region"), "{msg}");
        let msg = protocol_error("not json");
        assert!(msg.contains("bad handover JSON"), "{msg}");
        // The bridge page must lie inside its file.
        let msg = protocol_error(&GOOD.replace("\"offset\":0}", "\"offset\":8192}"));
        assert!(msg.contains("beyond the end"), "{msg}");
    }

    #[test]
    fn optional_keys_describe_an_older_hvisor() {
        let hsm = receive_raw(&GOOD.replace("\"version\":1", "\"version\":1,\"abi\":\"32/4/4\""))
            .unwrap();
        assert_eq!(hsm.bridge().abi(), HvisorAbi::new(32, 4, 4));
        assert_eq!(hsm.wakeup_kind(), WakeupKind::Eventfd);
        let json = GOOD.replace("\"version\":1", "\"version\":1,\"wakeup\":\"eventfd\"");
        assert_eq!(
            receive_raw(&json).unwrap().wakeup_kind(),
            WakeupKind::Eventfd
        );
        let msg =
            protocol_error(&GOOD.replace("\"version\":1", "\"version\":1,\"wakeup\":\"irq\""));
        assert!(msg.contains("unknown variant `irq`"), "{msg}");
        let err = receive_raw(&GOOD.replace("\"version\":1", "\"version\":1,\"abi\":\"32/8\""))
            .unwrap_err();
        assert!(matches!(err, HsmError::Abi(_)), "{err}");
    }

    #[test]
    fn signal_target_is_parsed_once_complete() {
        let json = br#"{"pid":10,"tid":11}"#;
        let mut frame = (json.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(json);
        for cut in 0..frame.len() {
            assert_eq!(parse_signal_target(&frame[..cut]).unwrap(), None, "{cut}");
        }
        assert_eq!(
            parse_signal_target(&frame).unwrap(),
            Some(SignalTargetMsg { pid: 10, tid: 11 })
        );
        let mut bad = 3u32.to_le_bytes().to_vec();
        bad.extend_from_slice(b"{x}");
        assert!(matches!(
            parse_signal_target(&bad),
            Err(HsmError::Protocol(_))
        ));
        assert!(parse_signal_target(&u32::MAX.to_le_bytes()).is_err());
    }

    #[test]
    fn oversized_or_missing_message_is_rejected() {
        let (provider_end, bridge_end) = UnixStream::pair().unwrap();
        (&provider_end).write_all(&u32::MAX.to_le_bytes()).unwrap();
        let err = ProviderHsm::from_stream(bridge_end).unwrap_err();
        assert!(err.to_string().contains("message too long"), "{err}");

        let (provider_end, bridge_end) = UnixStream::pair().unwrap();
        drop(provider_end);
        let err = ProviderHsm::from_stream(bridge_end).unwrap_err();
        assert!(
            err.to_string().contains("closed before the handover"),
            "{err}"
        );
    }
}
