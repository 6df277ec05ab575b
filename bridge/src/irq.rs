//! Interrupt injection through the HSM result ring, with hvisor's per-zone limit.
//!
//! Each device emulates a level-triggered line: it is injected once, then stays asserted
//! (further used-buffer signals only set InterruptStatus bits) until the guest's InterruptACK
//! clears the status. hvisor panics when more than [`MAX_PENDING_IRQS`] distinct virtio IRQs
//! are pending for a zone, so a zone never has more lines asserted than that; a device over
//! the limit waits until another line of its zone drops.

use std::collections::BTreeMap;

use hvisor_hsm::abi::MAX_PENDING_IRQS;
use hvisor_hsm::Hsm;

/// Tracks asserted lines per zone and pushes injections to the hypervisor.
#[derive(Debug, Default)]
pub struct IrqLines {
    asserted: BTreeMap<u32, usize>,
}

/// What happened to an injection request.
#[derive(Debug, PartialEq, Eq)]
pub enum Injection {
    /// Pushed to the result ring; the line is now asserted.
    Injected,
    /// The zone is at hvisor's limit; retry when a line of the zone drops.
    Deferred,
    /// The hypervisor refused or the ring stayed full; the status bit stays set and the
    /// next signal or ACK retries.
    Failed,
}

impl IrqLines {
    /// Asserts `irq` of `zone` if the zone is under the limit.
    pub fn inject(&mut self, hsm: &dyn Hsm, zone: u32, irq: u32) -> Injection {
        let count = self.asserted.entry(zone).or_default();
        if *count >= MAX_PENDING_IRQS {
            return Injection::Deferred;
        }
        if let Err(e) = hsm.bridge().push_result(zone, irq) {
            log::error!("zone {zone}: cannot queue irq {irq}: {e}");
            return Injection::Failed;
        }
        if let Err(e) = hsm.finish_req() {
            // The entry is in the ring; the next FINISH_REQ delivers it.
            log::error!("zone {zone}: FINISH_REQ for irq {irq} failed: {e}");
        }
        *count += 1;
        Injection::Injected
    }

    /// A line of `zone` dropped (the guest acknowledged every status bit).
    pub fn release(&mut self, zone: u32) {
        if let Some(count) = self.asserted.get_mut(&zone) {
            *count = count.saturating_sub(1);
        }
    }

    /// How many lines of `zone` are asserted.
    pub fn asserted(&self, zone: u32) -> usize {
        self.asserted.get(&zone).copied().unwrap_or(0)
    }
}
