// LD_PRELOAD shim that lets Debian's user-mode Linux 6.1 run on hosts whose XSAVE area is larger
// than the one UML 6.1 was built for (hosts with AVX-512 or AMX).
//
// UML saves and restores the FPU state of its guest processes with PTRACE_GETREGSET /
// PTRACE_SETREGSET (NT_X86_XSTATE) and a fixed-size buffer. A host kernel truncates a GETREGSET
// that is too small, but refuses (EFAULT) a SETREGSET whose size is not exactly the host's full
// XSAVE size, and UML then kills every guest process ("ptrace set fp regs failed, errno = 14").
// This shim serves the short requests through a buffer of the host's size: a short GET copies the
// leading part, a short SET overlays UML's bytes on the task's current full state.
//
// Limit: state beyond UML's buffer (upper AVX-512 and AMX registers) is not switched between guest
// threads that share one host process. Good enough for the rig's shell-and-dd guests.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef long (*ptrace_fn)(enum __ptrace_request, pid_t, void *, void *);

// Larger than any x86 XSAVE area so far (AMX: about 11 KiB). UML 6.1 runs one host thread at a
// time, so one buffer suffices.
static unsigned char full_state[64 * 1024];

long ptrace(enum __ptrace_request request, ...)
{
    static ptrace_fn real_ptrace;
    va_list args;
    va_start(args, request);
    pid_t pid = va_arg(args, pid_t);
    void *addr = va_arg(args, void *);
    void *data = va_arg(args, void *);
    va_end(args);

    if (!real_ptrace)
        real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if ((request != PTRACE_GETREGSET && request != PTRACE_SETREGSET) || (long)addr != NT_X86_XSTATE)
        return real_ptrace(request, pid, addr, data);

    struct iovec *caller = data;
    struct iovec full = { full_state, sizeof(full_state) };
    // The kernel shortens iov_len to the host's XSAVE size.
    long ret = real_ptrace(PTRACE_GETREGSET, pid, addr, &full);
    if (ret < 0 || caller->iov_len >= full.iov_len)
        return ret < 0 ? ret : real_ptrace(request, pid, addr, data);

    if (request == PTRACE_GETREGSET) {
        memcpy(caller->iov_base, full_state, caller->iov_len);
        return 0;
    }
    memcpy(full_state, caller->iov_base, caller->iov_len);
    return real_ptrace(PTRACE_SETREGSET, pid, addr, &full);
}
