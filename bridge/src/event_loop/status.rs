//! The ring thread's side of [`crate::status`]: building the snapshot it publishes, and
//! logging it on SIGUSR1.

use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{Bridge, BridgeDevice, LoopError, TOKEN_STATUS};
use crate::status::{DeviceState, DeviceStatus, QueueStatus, Snapshot, StatusBoard};
use crate::transport::VirtioBackend;

/// The DEVICE_NEEDS_RESET bit of the Status register.
const NEEDS_RESET: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

impl Bridge {
    /// Publishes the bridge's status on `board` from now on: when the ring thread goes to
    /// sleep (at most every [`crate::status::REFRESH_PERIOD`]) and whenever a reader asks.
    pub fn publish_status(&mut self, board: Arc<StatusBoard>) -> Result<(), LoopError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                board.request_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STATUS),
            )
            .map_err(LoopError::Epoll)?;
        board.publish(self.snapshot());
        self.status = Some(board);
        self.status_published = Instant::now();
        Ok(())
    }

    /// The bridge as it is now.
    pub fn snapshot(&self) -> Snapshot {
        let mut zones: Vec<u32> = self.devices.iter().map(|d| d.zone).collect();
        zones.sort_unstable();
        zones.dedup();
        Snapshot {
            pid: std::process::id(),
            zones,
            devices: self.devices.iter().map(device_status).collect(),
            counters: self.stats,
        }
    }

    /// Publishes a new snapshot: at once when `asked`, else only if the last one is older
    /// than the refresh period.
    pub(super) fn refresh_status(&mut self, now: Instant, asked: bool) {
        let Some(board) = &self.status else {
            return;
        };
        if asked {
            board.take_request();
        } else if now.saturating_duration_since(self.status_published)
            < crate::status::REFRESH_PERIOD
        {
            return;
        }
        board.publish(self.snapshot());
        self.status_published = now;
    }

    /// SIGUSR1: the status table in the log.
    pub(super) fn log_status(&self) {
        for line in crate::status::render(&self.snapshot()).lines() {
            log::info!("status: {line}");
        }
    }
}

fn device_status(dev: &BridgeDevice) -> DeviceStatus {
    let handle = dev.transport.backend();
    let driver_status = dev.transport.status();
    let state = if driver_status & NEEDS_RESET != 0 {
        DeviceState::NeedsReset
    } else if dev.reconnecting {
        DeviceState::Restoring
    } else if handle.is_disconnected() {
        DeviceState::Disconnected
    } else {
        DeviceState::Running
    };
    DeviceStatus {
        zone: dev.zone,
        label: handle.label().to_string(),
        base: dev.base,
        irq: dev.irq,
        device_id: handle.device_id(),
        backend_pid: dev.process.as_ref().map(|p| p.pid()),
        state,
        driver_status,
        features: dev.transport.acked_features(),
        queues: dev
            .transport
            .queues()
            .map(|q| QueueStatus {
                size: q.size,
                ready: q.ready,
            })
            .collect(),
        notify_to_call: dev.notify_to_call,
    }
}
