//! Interrupt injection through the HSM result ring.
//!
//! Each device emulates a level-triggered line: it is injected once, then stays asserted
//! (further used-buffer signals only set InterruptStatus bits) until the guest's InterruptACK
//! clears the status. hvisor panics when more than [`MAX_PENDING_IRQS`] distinct virtio IRQs
//! are pending for a zone, so the event loop never has more lines of a zone asserted than
//! that (it counts them from the devices' transports); a device over the limit waits until
//! another line of its zone drops.

pub use hvisor_hsm::abi::MAX_PENDING_IRQS;
use hvisor_hsm::Hsm;

/// Queues `{zone, irq}` in the result ring and tells the hypervisor (FINISH_REQ). False when
/// the ring stayed full: the status bit stays set and the next signal or ACK retries.
pub fn inject(hsm: &dyn Hsm, zone: u32, irq: u32) -> bool {
    if let Err(e) = hsm.bridge().push_result(zone, irq) {
        log::error!("zone {zone}: cannot queue irq {irq}: {e}");
        return false;
    }
    if let Err(e) = hsm.finish_req() {
        // The entry is in the ring; the next FINISH_REQ delivers it.
        log::error!("zone {zone}: FINISH_REQ for irq {irq} failed: {e}");
    }
    true
}
