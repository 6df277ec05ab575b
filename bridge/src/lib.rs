//! hvisor-vhost bridge: consumes hvisor's virtio request ring, emulates virtio-mmio v2
//! registers, and serves each device through a vhost-user backend.
//!
//! - [`config`]: hvisor-tool's `virtio_cfg.json` plus backend fields.
//! - [`transport`]: the virtio-mmio register state machine (no I/O).
//! - [`config_space`]: per device type, which config fields are writable, live or a queue count.
//! - [`frontend`]: the vhost-user frontend of one device.
//! - [`control`]: the control plane: each device's worker thread, which makes its vhost-user
//!   round trips, and the handle the transport drives on the ring thread.
//! - [`reconnect`]: brings back a backend that hung up.
//! - [`irq`]: interrupt lines and hvisor's pending-IRQ limit.
//! - [`event_loop`]: the ring thread, which ties the ring, the devices and the backends
//!   without ever waiting on a backend.
//! - [`supervisor`]: spawns the in-repo backends a config implies.
//! - [`peer`]: checks the process at the other end of every vhost-user socket.
//! - [`affinity`]: pins the ring thread to the CPU that takes hvisor's interrupt.
//! - [`service`]: the readiness notification a service manager waits for.
//! - [`logging`]: `--log-target` and `--log-level`, and the spawned backends' lines.

use std::fs::File;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hvisor_hsm::Hsm;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

pub mod affinity;
pub mod backend_maps;
pub mod config;
pub mod config_space;
pub mod control;
pub mod event_loop;
pub mod frontend;
pub mod irq;
pub mod logging;
pub mod peer;
pub mod ratelimit;
pub mod reconnect;
pub mod service;
pub mod status;
pub mod supervisor;
pub mod transport;

use config::{BackendSpec, Config, ZoneConfig};
use control::{DeviceHandle, Watchdog};
use event_loop::{Bridge, BridgeDevice, LoopOptions};
use frontend::{DeviceSpec, VhostUserDevice};
use reconnect::Reconnect;
use supervisor::{BackendPolicy, BackendPrograms, Supervisor};
use transport::MmioTransport;

/// Errors while building the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The HSM refused a RAM region.
    #[error("Zone {zone}: cannot map RAM region {zone0_ipa:#x}")]
    Ram {
        /// Zone id.
        zone: u32,
        /// Region address as root Linux sees it.
        zone0_ipa: u64,
        /// Why.
        #[source]
        source: hvisor_hsm::HsmError,
    },
    /// The bridge could not map zone RAM.
    #[error("Zone {zone}: cannot map RAM")]
    Mmap {
        /// Zone id.
        zone: u32,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A RAM fd could not be duplicated.
    #[error("Zone {zone}: cannot duplicate a RAM fd")]
    DupFd {
        /// Zone id.
        zone: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The start-up watchdog of a device's negotiation could not be started.
    #[error("Zone {zone}: {device}: cannot start the watchdog of its negotiation")]
    Watchdog {
        /// Zone id.
        zone: u32,
        /// The device's label.
        device: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The runtime directory or the backend programs are not usable.
    #[error("Cannot prepare for the backends the bridge starts")]
    Supervisor(#[source] supervisor::SupervisorError),
    /// A backend could not be started.
    #[error("Zone {zone}, {device}: cannot start the backend")]
    Spawn {
        /// Zone id.
        zone: u32,
        /// Device label.
        device: String,
        /// Why.
        #[source]
        source: supervisor::SupervisorError,
    },
    /// A backend could not be reached or refused to negotiate.
    #[error("Zone {zone}, {device}: backend setup failed")]
    Backend {
        /// Zone id.
        zone: u32,
        /// Device label.
        device: String,
        /// Why.
        #[source]
        source: frontend::FrontendError,
    },
    /// The process serving a backend socket is not one the bridge may talk to.
    #[error("Zone {zone}, {device}: refusing the backend")]
    Peer {
        /// Zone id.
        zone: u32,
        /// Device label.
        device: String,
        /// Why.
        #[source]
        source: peer::PeerError,
    },
    /// The event loop could not be created.
    #[error("Cannot create the event loop")]
    Loop(#[source] event_loop::LoopError),
}

/// Knobs of [`build`].
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Where spawned backends' sockets go (made 0700).
    pub runtime_dir: PathBuf,
    /// The in-repo backend programs the bridge starts.
    pub programs: BackendPrograms,
    /// Whom the bridge lets serve it.
    pub backends: BackendPolicy,
    /// How long to wait for an external backend's socket.
    pub connect_timeout: Duration,
    /// How long to keep trying to restore a backend that hung up.
    pub reconnect_timeout: Duration,
    /// Event-loop tuning.
    pub loop_options: LoopOptions,
}

/// The bridge; it owns the backend processes it started and stops them when dropped.
#[derive(Debug)]
pub struct Running {
    /// The event loop.
    pub bridge: Bridge,
}

/// Maps each zone's RAM, starts or connects every device's backend, negotiates, and builds
/// the event loop.
pub fn build(
    config: &Config,
    hsm: Arc<dyn Hsm>,
    options: &BridgeOptions,
    stop: Option<BorrowedFd<'_>>,
    hsm_control: Option<BorrowedFd<'_>>,
) -> Result<Running, BridgeError> {
    let supervisor = options
        .programs
        .resolve_for(config)
        .and_then(|programs| {
            Supervisor::new(
                options.runtime_dir.clone(),
                programs,
                options.backends.clone(),
            )
        })
        .map_err(BridgeError::Supervisor)?;
    let mut devices = Vec::new();
    for zone in &config.zones {
        let memory = map_zone_ram(hsm.as_ref(), zone)?;
        for dev in &zone.devices {
            let label = format!("zone{}/{}", zone.id, dev.label());
            let spawned = supervisor
                .spawn(zone.id, dev)
                .map_err(|source| BridgeError::Spawn {
                    zone: zone.id,
                    device: label.clone(),
                    source,
                })?;
            let socket = match (&spawned, &dev.backend) {
                (Some(s), _) => s.socket().to_path_buf(),
                (None, BackendSpec::External { socket }) => socket.clone(),
                // The supervisor spawns every other kind; nothing else reaches here.
                (None, _) => continue,
            };
            let backend_err = |source| BridgeError::Backend {
                zone: zone.id,
                device: label.clone(),
                source,
            };
            let frontend = frontend::connect(&socket, dev.num_queues, options.connect_timeout)
                .map_err(backend_err)?;
            supervisor
                .check_peer(&frontend, &socket, spawned.as_ref())
                .map_err(|source| BridgeError::Peer {
                    zone: zone.id,
                    device: label.clone(),
                    source,
                })?;
            let spec = DeviceSpec {
                label: label.clone(),
                device_id: dev.device_type.id,
                num_queues: dev.num_queues,
                queue_size: dev.queue_size,
                config_len: config::config_space_len(dev.device_type.id),
            };
            // Negotiation is bounded like every later round trip: a backend that accepts
            // the connection and never answers must not hang the bridge's start.
            let bound = options.loop_options.control_timeout;
            let watchdog = Watchdog::arm(frontend_fd(&frontend), bound).map_err(|source| {
                BridgeError::Watchdog {
                    zone: zone.id,
                    device: label.clone(),
                    source,
                }
            })?;
            let device = VhostUserDevice::new(spec, frontend, memory.clone());
            let device = match (device, watchdog.disarm()) {
                (Ok(device), _) => device,
                (Err(_), true) => {
                    return Err(backend_err(frontend::FrontendError::Unresponsive(bound)))
                }
                (Err(e), false) => return Err(backend_err(e)),
            };
            let device = DeviceHandle::new(device).map_err(backend_err)?;
            let reconnect = Reconnect {
                supervisor: supervisor.clone(),
                zone: zone.id,
                device: dev.clone(),
                timeout: options.reconnect_timeout,
            };
            devices.push(
                BridgeDevice::new(
                    zone.id,
                    dev.addr,
                    dev.len,
                    dev.irq,
                    MmioTransport::with_label(device, label),
                )
                .with_backend(spawned, Some(reconnect)),
            );
        }
    }
    let bridge = Bridge::new(hsm, devices, options.loop_options, stop, hsm_control)
        .map_err(BridgeError::Loop)?;
    Ok(Running { bridge })
}

/// The connection's socket, for the start-up watchdog.
fn frontend_fd(frontend: &vhost::vhost_user::Frontend) -> BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd belongs to `frontend`, which outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(frontend.as_raw_fd()) }
}

fn map_zone_ram(hsm: &dyn Hsm, zone: &ZoneConfig) -> Result<GuestMemoryMmap, BridgeError> {
    let mut regions = zone.memory_regions.clone();
    regions.sort_by_key(|r| r.zonex_ipa);
    let mut ranges = Vec::new();
    for r in &regions {
        let ram = hsm
            .ram_region(r.zone0_ipa, r.size)
            .map_err(|source| BridgeError::Ram {
                zone: zone.id,
                zone0_ipa: r.zone0_ipa,
                source,
            })?;
        let fd = ram.fd.try_clone().map_err(|source| BridgeError::DupFd {
            zone: zone.id,
            source,
        })?;
        let file = File::from(fd);
        ranges.push((
            GuestAddress(r.zonex_ipa),
            r.size as usize,
            Some(FileOffset::new(file, ram.offset)),
        ));
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|source| BridgeError::Mmap {
        zone: zone.id,
        source,
    })
}
