//! The ring thread's side of the control plane: what it does when a backend hangs up, when
//! a reconnect thread or a control worker reports back, and when a control operation
//! outlives its bound. Nothing here waits on a backend either: it queues work for the
//! device's worker ([`crate::control`]) or a reconnect thread ([`crate::reconnect`]).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent};

use super::{
    Bridge, BACKEND_REQ_EVENTS, DEVICE_BACKEND_REQ_SLOT, DEVICE_SOCKET_SLOT, SOCKET_EVENTS,
    TOKEN_DEVICE_BASE,
};
use crate::control::{dup_event, ControlDone, ControlOp, OpKind, Outcome};
use crate::reconnect::{reconnect, Reconnected};

impl Bridge {
    /// A backend hung up: stop watching its fds, then restore it in the background, or fail
    /// the device when there is no way to.
    pub(super) fn backend_gone(&mut self, index: usize) {
        let dev = &mut self.devices[index];
        let handle = dev.transport.backend();
        for fd in [handle.socket_fd(), handle.backend_req_fd()]
            .into_iter()
            .flatten()
        {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        dev.transport
            .backend_mut()
            .queue(ControlOp::MarkDisconnected);
        let label = dev.transport.backend().label().to_string();
        if self.stopping {
            log::info!("{label}: backend hung up while the bridge is stopping");
            return;
        }
        let Some(plan) = dev.reconnect.clone() else {
            log::error!("{label}: backend hung up; the device needs a reset");
            if dev.transport.fail() {
                self.raise(index);
            }
            return;
        };
        dev.transport.backend_mut().queue(ControlOp::BeginRestore);
        if dev.reconnecting {
            return;
        }
        dev.reconnecting = true;
        let mut dead = dev.process.take();
        let hung = std::mem::take(&mut dev.hung);
        match &mut dead {
            Some(p) if hung => {
                log::error!(
                    "{label}: backend (pid {}) hung; killing and restarting it",
                    p.pid()
                );
                p.kill();
            }
            Some(p) => log::error!("{label}: backend (pid {}) hung up; restarting it", p.pid()),
            None => log::error!("{label}: backend hung up; waiting for it to come back"),
        }
        let tx = self.reconnect_tx.clone();
        // The event fd is shared: the thread writes it once its result is queued.
        let wake = dup_event(&self.reconnect_event);
        let cancel = Arc::clone(&self.cancel);
        let spawned = std::thread::Builder::new()
            .name(format!("reconnect-{index}"))
            .spawn(move || {
                // Reap the dead process first: its socket path is about to be reused.
                drop(dead);
                let result = reconnect(&plan, &label, &cancel);
                let _ = tx.send(Reconnected { index, result });
                if let Ok(wake) = wake {
                    let _ = wake.write(1);
                }
            });
        match spawned {
            Ok(thread) => self.reconnect_threads.push(thread),
            Err(e) => {
                log::error!("cannot start a reconnect thread: {e}");
                let dev = &mut self.devices[index];
                dev.reconnecting = false;
                dev.transport.backend_mut().queue(ControlOp::EndRestore);
                if dev.transport.fail() {
                    self.raise(index);
                }
            }
        }
    }

    /// A reconnect thread is done: hand the new connection to the device's worker, which
    /// replays the device's state on it (see `finish_control` for the rest).
    pub(super) fn finish_reconnect(&mut self, done: Reconnected) {
        self.reconnect_threads.retain(|t| !t.is_finished());
        let index = done.index;
        let Some(dev) = self.devices.get_mut(index) else {
            return;
        };
        dev.reconnecting = false;
        // A restore that fails from here on fails the device, even an activation that was
        // waiting for it; one that is retried begins again in `backend_gone`.
        dev.transport.backend_mut().queue(ControlOp::EndRestore);
        match done.result {
            Ok((frontend, process)) => {
                dev.process = process;
                dev.transport
                    .backend_mut()
                    .queue(ControlOp::Reattach(frontend));
            }
            Err(e) => {
                let label = dev.transport.backend().label();
                log::error!("{label}: cannot restore the backend: {e}; the device needs a reset");
                if dev.transport.fail() {
                    self.raise(index);
                }
            }
        }
    }

    /// A control worker finished an operation: apply its outcome on the ring thread, then
    /// answer the guest accesses that waited for it.
    pub(super) fn finish_control(&mut self, mut done: ControlDone) {
        let index = done.index;
        let Some(dev) = self.devices.get_mut(index) else {
            return;
        };
        // A channel that changed is unwatched before its duplicate is dropped.
        if done.backend_req.is_some() {
            if let Some(old) = dev.transport.backend().backend_req_fd() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    old.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        dev.transport.backend_mut().complete(&mut done);
        let label = dev.transport.backend().label().to_string();
        match (done.kind, done.outcome) {
            (OpKind::BackendRequest, Outcome::Done { config_changed }) => {
                self.rearm_backend_req(index);
                if config_changed {
                    log::info!("{label}: backend reported a config change");
                    if self.devices[index].transport.signal_config_change() {
                        self.raise(index);
                    } else {
                        self.owe_reinjection(index);
                    }
                }
            }
            (OpKind::Reattach, Outcome::Done { config_changed }) => {
                self.stats.reconnects += 1;
                self.watch_connection(index);
                log::info!(
                    "{label}: backend restored; its queues resume where the guest left them"
                );
                // The old backend may have published used entries and died before its call
                // (inside its interrupt-coalescing window, say); the new one starts from the
                // guest's used index and has nothing to announce. An interrupt now tells the
                // driver about them; a spurious one costs the driver one empty look.
                let transport = &mut self.devices[index].transport;
                let mut raise = transport.signal_used_buffer();
                if config_changed {
                    log::warn!("{label}: the restored backend's config differs; telling the guest");
                    raise |= transport.signal_config_change();
                }
                if raise {
                    self.raise(index);
                }
            }
            // A backend that dies while it is being restored crashed like the first one: the
            // device can still be restored, by the next backend.
            (
                OpKind::Reattach,
                Outcome::Failed {
                    error,
                    connection_lost: true,
                },
            ) if self.devices[index].reconnect.is_some() => {
                log::error!("{label}: the backend died while being restored ({error})");
                self.backend_gone(index);
            }
            (OpKind::Reattach | OpKind::Activate, Outcome::Failed { error, .. }) => {
                let what = if done.kind == OpKind::Reattach {
                    // Negotiated, then refused (lost features, say): the new connection is
                    // the device's now, and its hang-up must still be seen.
                    if done.connected {
                        self.watch_connection(index);
                    }
                    "cannot restore the backend"
                } else {
                    "backend activation failed"
                };
                log::error!("{label}: {what}: {error}; the device needs a reset");
                if self.devices[index].transport.fail() {
                    self.raise(index);
                }
            }
            (OpKind::BackendRequest, Outcome::Failed { error, .. }) => {
                // A refresh that failed keeps the channel watched; a broken channel is gone
                // (the worker dropped it), and the socket still tells of a hang-up.
                log::warn!("{label}: backend request failed: {error}");
                self.rearm_backend_req(index);
            }
            (kind, Outcome::Failed { error, .. }) => {
                log::warn!("{label}: backend {} failed: {error}", kind.name());
            }
            (_, Outcome::Done { .. }) => {}
        }
        if !self.devices[index].transport.backend().holds_the_guest() {
            self.release(index);
        }
    }

    /// Watches device `index`'s (new) connection for hang-up and its backend-to-frontend
    /// channel for messages.
    pub(super) fn watch_connection(&mut self, index: usize) {
        let base = TOKEN_DEVICE_BASE * (index as u64 + 1);
        let handle = self.devices[index].transport.backend();
        if let Some(fd) = handle.socket_fd() {
            let event = EpollEvent::new(SOCKET_EVENTS, base + DEVICE_SOCKET_SLOT);
            let _ = self.epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), event);
        }
        if let Some(fd) = handle.backend_req_fd() {
            let event = EpollEvent::new(BACKEND_REQ_EVENTS, base + DEVICE_BACKEND_REQ_SLOT);
            let _ = self.epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), event);
        }
    }

    /// Watches the backend-to-frontend channel again after the worker read a message.
    pub(super) fn rearm_backend_req(&mut self, index: usize) {
        let base = TOKEN_DEVICE_BASE * (index as u64 + 1);
        if let Some(fd) = self.devices[index].transport.backend().backend_req_fd() {
            let event = EpollEvent::new(BACKEND_REQ_EVENTS, base + DEVICE_BACKEND_REQ_SLOT);
            let _ = self
                .epoll
                .ctl(ControlOperation::Modify, fd.as_raw_fd(), event);
        }
    }

    /// Answers the access that waited for the control worker, then serves the ones held
    /// behind it, in order, until one waits again.
    pub(super) fn release(&mut self, index: usize) {
        if let Some(req) = self.devices[index].waiting.take() {
            self.reply(&req, 0);
        }
        while self.devices[index].waiting.is_none() {
            let Some(req) = self.devices[index].held.pop_front() else {
                break;
            };
            self.serve(index, &req);
        }
    }

    /// Cuts off every control operation that outlived the control timeout: the device
    /// needs a reset, and its backend is treated as hung up (the socket, shut down under
    /// the worker, reports the hang-up to the loop).
    pub(super) fn cut_off_overdue(&mut self, now: Instant) {
        let bound = self.options.control_timeout;
        for index in 0..self.devices.len() {
            let dev = &mut self.devices[index];
            let Some(kind) = dev.transport.backend_mut().cut_off_overdue(now, bound) else {
                continue;
            };
            self.stats.control_timeouts += 1;
            dev.hung = true;
            log::error!(
                "{}: the backend did not complete a {} within {bound:?}; treating it as hung",
                dev.transport.backend().label(),
                kind.name()
            );
            if dev.transport.fail() {
                self.raise(index);
            }
        }
    }

    /// How long until the oldest control operation of some device outlives its bound.
    pub(super) fn next_control_deadline(&self, now: Instant) -> Option<Duration> {
        let bound = self.options.control_timeout;
        self.devices
            .iter()
            .filter_map(|d| d.transport.backend().deadline(bound))
            .min()
            .map(|due| due.saturating_duration_since(now))
    }

    /// The guest reset a device whose backend is gone and whose restore gave up (it timed
    /// out, say): the reset is its way of asking for the device back, so try again.
    pub(super) fn restore_again(&mut self, index: usize) {
        let dev = &self.devices[index];
        if dev.reconnect.is_none() || dev.reconnecting || !dev.transport.backend().is_disconnected()
        {
            return;
        }
        log::info!(
            "{}: the guest reset the device; restoring its backend again",
            dev.transport.backend().label()
        );
        self.backend_gone(index);
    }
}
