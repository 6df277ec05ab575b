//! Interrupt injection through the HSM result ring.
//!
//! Each device emulates a level-triggered line: it is injected once, then stays asserted
//! (further used-buffer signals only set InterruptStatus bits) until the guest's InterruptACK
//! clears the status. hvisor panics when more than [`MAX_PENDING_IRQS`] distinct virtio IRQs
//! are pending for a zone, so the event loop never has more lines of a zone asserted than
//! that (it counts them from the devices' transports); a device over the limit waits until
//! another line of its zone drops.
//!
//! hvisor does not always deliver an injection: it drops one silently while a list register
//! still holds the same virtual IRQ in any state, active included, i.e. while the guest is
//! still inside its handler (Linux's virtio-mmio handler ACKs before it EOIs, so a signal
//! that lands in between is lost). A line that stays asserted after such a drop would never
//! interrupt again, so the event loop injects an asserted line again when its backend
//! signals once more, and when the guest has not ACKed it for a while
//! ([`reinjection_due`]). A repeated injection is harmless: hvisor keeps a pending IRQ once
//! in its per-CPU list, and one that finds the IRQ pending or active changes nothing.

use std::time::Duration;

pub use hvisor_hsm::abi::MAX_PENDING_IRQS;
use hvisor_hsm::Hsm;

/// How long an injection waits for room in a full result ring. hvisor drains the ring inside
/// the FINISH_REQ hypercall, so it is full only when the hypervisor has stopped draining; the
/// ring thread must not wait on that (every other device would), and retries on a timer
/// instead ([`INJECTION_RETRY`]).
pub const RESULT_RING_WAIT: Duration = Duration::from_micros(100);

/// How often an injection that found the result ring full is tried again.
pub const INJECTION_RETRY: Duration = Duration::from_millis(1);

/// Queues `{zone, irq}` in the result ring and tells the hypervisor (FINISH_REQ). False when
/// the ring stayed full for [`RESULT_RING_WAIT`]: the caller retries.
pub fn inject(hsm: &dyn Hsm, zone: u32, irq: u32) -> bool {
    if hsm
        .bridge()
        .push_result_within(zone, irq, RESULT_RING_WAIT)
        .is_err()
    {
        return false;
    }
    if let Err(e) = hsm.finish_req() {
        // The entry is in the ring; the next FINISH_REQ delivers it.
        log::error!("zone {zone}: FINISH_REQ for irq {irq} failed: {e}");
    }
    true
}

/// True when an asserted line must be injected again: the device still flags something in
/// InterruptStatus and the guest has not ACKed within `period` of the last injection, which
/// hvisor may have dropped. A line that is not asserted has nothing to repeat (it is raised
/// afresh, or waits for the zone's pending limit); a cleared status has nothing to tell.
pub fn reinjection_due(
    line_asserted: bool,
    interrupt_status: u32,
    since_last_injection: Duration,
    period: Duration,
) -> bool {
    line_asserted && interrupt_status != 0 && since_last_injection >= period
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_millis(10);

    #[test]
    fn an_unacked_line_is_injected_again_after_the_period() {
        assert!(reinjection_due(true, 1, PERIOD, PERIOD));
        assert!(reinjection_due(true, 2, PERIOD * 3, PERIOD));
    }

    #[test]
    fn a_recent_injection_is_given_time() {
        assert!(!reinjection_due(
            true,
            1,
            PERIOD - Duration::from_micros(1),
            PERIOD
        ));
        assert!(!reinjection_due(true, 1, Duration::ZERO, PERIOD));
    }

    #[test]
    fn nothing_is_repeated_for_a_lowered_line_or_a_cleared_status() {
        assert!(!reinjection_due(false, 1, PERIOD * 5, PERIOD));
        assert!(!reinjection_due(true, 0, PERIOD * 5, PERIOD));
    }
}
