//! Bringing a backend back after it hung up: respawn ours, or wait for an external one to
//! listen again. Runs on a thread of its own per restore; the event loop hands the new
//! connection to the device's control worker (see [`crate::control`]).

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;

use crate::config::{BackendSpec, DeviceConfig};
use crate::control::error_chain;
use crate::frontend;
use crate::supervisor::{SpawnedBackend, Supervisor};

/// How to get a device's backend back after it dies.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Starts our backends.
    pub supervisor: Supervisor,
    /// The device's zone.
    pub zone: u32,
    /// The device entry (backend kind, socket, geometry).
    pub device: DeviceConfig,
    /// Give up after this long.
    pub timeout: Duration,
}

/// Tells reconnect threads that the bridge is stopping, and wakes them from their back-off.
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    stopping: Mutex<bool>,
    changed: Condvar,
}

impl Cancel {
    pub(crate) fn cancel(&self) {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    fn is_cancelled(&self) -> bool {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps up to `delay`; true when the bridge is stopping.
    fn sleep(&self, delay: Duration) -> bool {
        let stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        let (stopping, _) = self
            .changed
            .wait_timeout_while(stopping, delay, |stopping| !*stopping)
            .unwrap_or_else(|p| p.into_inner());
        *stopping
    }
}

/// A reconnect thread's outcome.
pub(crate) struct Reconnected {
    pub(crate) index: usize,
    pub(crate) result: Result<(Frontend, Option<SpawnedBackend>), String>,
}

/// Brings a backend back: respawns ours, or waits for an external one, retrying with backoff
/// until `plan.timeout` or until the bridge stops.
pub(crate) fn reconnect(
    plan: &Reconnect,
    label: &str,
    cancel: &Cancel,
) -> Result<(Frontend, Option<SpawnedBackend>), String> {
    let deadline = Instant::now() + plan.timeout;
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        if cancel.is_cancelled() {
            return Err("the bridge is stopping".into());
        }
        attempt += 1;
        let outcome = match &plan.device.backend {
            BackendSpec::External { socket } => {
                frontend::connect(socket, plan.device.num_queues, Duration::ZERO)
                    .map_err(|e| error_chain(&e))
                    .and_then(|f| {
                        let checked = plan.supervisor.check_peer(&f, socket, None);
                        checked.map(|()| (f, None)).map_err(|e| error_chain(&e))
                    })
            }
            _ => plan
                .supervisor
                .spawn(plan.zone, &plan.device)
                .map_err(|e| error_chain(&e))
                .and_then(|spawned| {
                    let spawned = spawned.ok_or_else(|| "nothing to spawn".to_string())?;
                    frontend::connect(
                        spawned.socket(),
                        plan.device.num_queues,
                        Duration::from_secs(5),
                    )
                    .map_err(|e| error_chain(&e))
                    .and_then(|f| {
                        let checked =
                            plan.supervisor
                                .check_peer(&f, spawned.socket(), Some(&spawned));
                        checked
                            .map(|()| (f, Some(spawned)))
                            .map_err(|e| error_chain(&e))
                    })
                }),
        };
        match outcome {
            // Dropping the result stops a backend started just now.
            Ok(_) if cancel.is_cancelled() => return Err("the bridge is stopping".into()),
            Ok(done) => {
                if attempt > 1 {
                    log::info!("{label}: backend back after {attempt} attempts");
                }
                return Ok(done);
            }
            Err(e) => {
                if Instant::now() + delay > deadline {
                    return Err(format!("gave up after {attempt} attempts: {e}"));
                }
                if attempt == 1 || attempt.is_power_of_two() {
                    log::warn!(
                        "{label}: reconnect attempt {attempt} failed: {e}; retrying in {delay:?}"
                    );
                }
            }
        }
        if cancel.sleep(delay) {
            return Err("the bridge is stopping".into());
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
