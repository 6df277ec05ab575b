//! The vhost-user side of the console: features, configuration space, and moving bytes
//! between the virtqueues and the [`ConsoleDevice`]'s hosts.
//!
//! Nothing is dropped in either direction:
//! - host to guest, input is read from a host only into a receive buffer the guest has
//!   already posted. With none posted the host is not read, so its input waits in the
//!   kernel (and, for a socket, in the client), and the guest's next buffer resumes it;
//! - guest to host, a transmit chain is completed only once the host took all of its bytes.
//!   When the host would block, the chain goes back to the queue with a note of how much of
//!   it was written, and the host's next readiness event resumes it.
//!
//! Queue layout: receive 0 and transmit 1 for port 0; with MULTIPORT, control receive 2 and
//! control transmit 3, then receive and transmit of port N at 2 + 2N and 3 + 2N.
//!
//! Console size: the configuration space reports port 0's terminal size. A pty tells nobody
//! but its controlling process group when it is resized, so the size is looked at again after
//! every event the worker handles (host input or output readiness, guest kicks) and on
//! SIGWINCH ([`VhostUserConsoleBackend::refresh_window_size`]). A change is signalled on
//! [`VhostUserConsoleBackend::config_change_event`], for the frontend to be told.

use std::io::{self, Read, Write};

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::console::{ConsoleDevice, WindowSize};
use crate::virtio_console::{
    ConsoleConfig, ControlHeader, CONFIG_SPACE_SIZE, VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
};

/// Largest queue the backend accepts.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Ports are limited so that every queue fits one worker's 64-bit queue mask.
pub const MAX_PORTS: usize = 31;

const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;
/// Bytes moved per host read or write.
const CHUNK: usize = 64 * 1024;

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Event {0} is neither a queue nor the host event")]
    UnknownEvent(u16),
    #[error("Port count {0} is not between 1 and {MAX_PORTS}")]
    InvalidPorts(usize),
    #[error("Cannot access the virtqueue")]
    Queue(#[source] virtio_queue::Error),
    #[error("Cannot notify the frontend")]
    Notify(#[source] io::Error),
    #[error("Cannot poll the console hosts")]
    HostEvents(#[source] io::Error),
    #[error("Cannot create the configuration change event")]
    ConfigEvent(#[source] io::Error),
}

impl From<Error> for io::Error {
    fn from(error: Error) -> Self {
        io::Error::other(error)
    }
}

/// Number of virtqueues for `ports` ports.
pub fn queue_count(ports: usize) -> usize {
    if ports > 1 {
        4 + 2 * (ports - 1)
    } else {
        2
    }
}

/// The receive queue of `port`; its transmit queue follows it.
pub fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 + 2 * port
    }
}

/// A vhost-user console backend. It outlives frontend connections: the hosts, and output
/// kept for absent clients, carry over to the next frontend.
#[derive(Debug)]
pub struct VhostUserConsoleBackend {
    device: ConsoleDevice,
    queue_size: u16,
    mem: Option<GuestMemory>,
    acked_features: u64,
    /// Per port: bytes of the transmit chain at the head of its queue already written.
    tx_written: Vec<usize>,
    /// Per port: the host's output failed last time (logged once per failure streak).
    output_failing: Vec<bool>,
    chunk: Vec<u8>,
    /// The console size the configuration space reported when last looked at.
    window: WindowSize,
    /// Written when `window` changes: the frontend should re-read the configuration.
    config_changed: EventFd,
    /// Bit per queue whose available ring is corrupt (see [`next_chain`]): left alone until
    /// the driver restarts it or resets the device.
    broken_queues: u64,
}

impl VhostUserConsoleBackend {
    pub fn new(device: ConsoleDevice, queue_size: u16) -> Result<Self, Error> {
        let ports = device.num_ports();
        if !(1..=MAX_PORTS).contains(&ports) {
            return Err(Error::InvalidPorts(ports));
        }
        let window = device.window_size();
        Ok(VhostUserConsoleBackend {
            device,
            queue_size,
            mem: None,
            acked_features: 0,
            tx_written: vec![0; ports],
            output_failing: vec![false; ports],
            chunk: vec![0; CHUNK],
            window,
            config_changed: EventFd::new(EFD_NONBLOCK).map_err(Error::ConfigEvent)?,
            broken_queues: 0,
        })
    }

    /// Readable (a counter above zero) after the console size changed; read it to reset.
    pub fn config_change_event(&self) -> &EventFd {
        &self.config_changed
    }

    /// Looks at port 0's terminal size again. When it differs from what the configuration
    /// space said before, records it, signals [`Self::config_change_event`] and returns true.
    pub fn refresh_window_size(&mut self) -> bool {
        let window = self.device.window_size();
        if window == self.window {
            return false;
        }
        info!(
            "Console size changed from {}x{} to {}x{}",
            self.window.cols, self.window.rows, window.cols, window.rows
        );
        self.window = window;
        if let Err(e) = self.config_changed.write(1) {
            warn!("Cannot signal the console size change: {e}");
        }
        true
    }

    /// The event number under which [`ConsoleDevice::event_fd`] must be registered with the
    /// daemon's worker: the first one above the queues and the exit event.
    pub fn host_event(&self) -> u16 {
        queue_count(self.device.num_ports()) as u16 + 1
    }

    /// The descriptor to register as [`VhostUserConsoleBackend::host_event`].
    pub fn host_event_fd(&self) -> std::os::fd::RawFd {
        self.device.event_fd()
    }

    pub fn device(&mut self) -> &mut ConsoleDevice {
        &mut self.device
    }

    /// Forgets the frontend that went away: its memory, features and driver state.
    pub fn disconnected(&mut self) {
        self.mem = None;
        self.acked_features = 0;
        self.tx_written.fill(0);
        self.broken_queues = 0;
        self.device.reset();
    }

    fn multiport(&self) -> bool {
        self.device.num_ports() > 1
    }

    fn negotiated(&self, feature: u32) -> bool {
        self.acked_features & (1 << feature) != 0
    }

    fn config(&self) -> ConsoleConfig {
        let size = self.device.window_size();
        ConsoleConfig {
            cols: size.cols.to_le(),
            rows: size.rows.to_le(),
            max_nr_ports: (self.device.num_ports() as u32).to_le(),
            emerg_wr: 0,
        }
    }

    /// Whether `queue` is set up, enabled and not known to be corrupt.
    fn usable(&self, queue: usize, state: &VringState<GuestMemory>) -> bool {
        live(state) && self.broken_queues & (1 << queue) == 0
    }

    /// Stops serving `queue` until the driver restarts it or resets the device.
    fn mark_broken(&mut self, queue: usize, error: virtio_queue::Error) {
        warn!("Queue {queue} is corrupt ({error}): ignoring it until the driver resets it");
        self.broken_queues |= 1 << queue;
    }

    /// Moves everything that can move now: control messages from the driver first (they
    /// may open ports), then each port's output and input, then control messages out.
    fn process(&mut self, vrings: &[VringRwLock]) -> Result<(), Error> {
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let multiport = self.negotiated(VIRTIO_CONSOLE_F_MULTIPORT);
        if multiport {
            if let Some(vring) = vrings.get(CONTROL_TX) {
                self.process_control_tx(vring, &mem)?;
            }
        }
        let ports = if multiport {
            self.device.num_ports()
        } else {
            1
        };
        for port in 0..ports {
            let queue = rx_queue(port);
            if let Some(tx) = vrings.get(queue + 1) {
                self.process_tx(port, tx, &mem)?;
            }
            // Without MULTIPORT the console is always open. With it, a port the guest has
            // not opened would discard what it received, so its input waits.
            let open = !multiport || self.device.port(port).is_some_and(|p| p.guest_open());
            if let (true, Some(rx)) = (open, vrings.get(queue)) {
                self.process_rx(port, rx, &mem)?;
            }
        }
        if multiport {
            if let Some(vring) = vrings.get(CONTROL_RX) {
                self.process_control_rx(vring, &mem)?;
            }
        }
        Ok(())
    }

    /// Guest output of `port` to its host.
    fn process_tx(
        &mut self,
        port: usize,
        vring: &VringRwLock,
        mem: &GuestMemory,
    ) -> Result<(), Error> {
        let queue = rx_queue(port) + 1;
        let mut state = vring.get_mut();
        if !self.usable(queue, &state) {
            return Ok(());
        }
        let mut completed = false;
        loop {
            state.disable_notification().map_err(Error::Queue)?;
            let blocked = match self.drain_tx(port, &mut state, mem, &mut completed) {
                Ok(blocked) => blocked,
                Err(e) => {
                    self.mark_broken(queue, e);
                    break;
                }
            };
            // Blocked on the host: its readiness event, not a kick, resumes the queue.
            if blocked || !state.enable_notification().map_err(Error::Queue)? {
                break;
            }
        }
        signal_if_needed(&mut state, completed)
    }

    /// Writes transmit chains until the queue is empty (false) or the host blocks (true).
    fn drain_tx(
        &mut self,
        port: usize,
        state: &mut VringState<GuestMemory>,
        mem: &GuestMemory,
        completed: &mut bool,
    ) -> Result<bool, virtio_queue::Error> {
        let guard = mem.memory();
        let Some(host_port) = self.device.port(port) else {
            return Ok(false);
        };
        let host = host_port.host();
        while let Some(chain) = next_chain(state, &guard)? {
            let head = chain.head_index();
            let written = &mut self.tx_written[port];
            let remaining =
                chain
                    .reader(&*guard)
                    .map_err(|e| e.to_string())
                    .and_then(|mut reader| {
                        let skip = (*written).min(reader.available_bytes());
                        reader.split_at(skip).map_err(|e| e.to_string())
                    });
            let mut reader = match remaining {
                Ok(reader) => reader,
                Err(e) => {
                    warn!("Port {port}: returning a bad transmit chain: {e}");
                    *written = 0;
                    complete(state, head, 0, completed);
                    continue;
                }
            };
            loop {
                let count = match reader.read(&mut self.chunk) {
                    Ok(count) => count,
                    Err(e) => {
                        warn!("Port {port}: cannot read a transmit chain: {e}");
                        0
                    }
                };
                if count == 0 {
                    *written = 0;
                    complete(state, head, 0, completed);
                    break;
                }
                let failing = &mut self.output_failing[port];
                match write_chunk(host, &self.chunk[..count]) {
                    Ok(done) => {
                        if std::mem::take(failing) {
                            info!("Port {port}: output works again");
                        }
                        *written += done;
                        if done < count {
                            state.get_queue_mut().go_to_previous_position();
                            return Ok(true);
                        }
                    }
                    Err(e) => {
                        // Holding the chain would stall the guest for good: no readiness
                        // event follows a broken output.
                        if !std::mem::replace(failing, true) {
                            warn!("Port {port}: output failed, dropping it until it works: {e}");
                        }
                        *written = 0;
                        complete(state, head, 0, completed);
                        break;
                    }
                }
            }
        }
        Ok(false)
    }

    /// Host input of `port` into the guest's receive buffers.
    fn process_rx(
        &mut self,
        port: usize,
        vring: &VringRwLock,
        mem: &GuestMemory,
    ) -> Result<(), Error> {
        let queue = rx_queue(port);
        let mut state = vring.get_mut();
        if !self.usable(queue, &state) {
            return Ok(());
        }
        let guard = mem.memory();
        let Some(host_port) = self.device.port(port) else {
            return Ok(());
        };
        let host = host_port.host();
        // No kicks while buffers are there; they are asked for again when they run out.
        state.disable_notification().map_err(Error::Queue)?;
        let mut completed = false;
        let mut corrupt = None;
        loop {
            let chain = match next_chain(&mut state, &guard) {
                Ok(Some(chain)) => chain,
                // Out of buffers: the host is not read until the driver adds one.
                Ok(None) if state.enable_notification().map_err(Error::Queue)? => continue,
                Ok(None) => break,
                Err(e) => {
                    corrupt = Some(e);
                    break;
                }
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&*guard) {
                Ok(writer) if writer.available_bytes() > 0 => writer,
                Ok(_) => {
                    warn!("Port {port}: returning a receive chain with no writable bytes");
                    complete(&mut state, head, 0, &mut completed);
                    continue;
                }
                Err(e) => {
                    warn!("Port {port}: returning a bad receive chain: {e}");
                    complete(&mut state, head, 0, &mut completed);
                    continue;
                }
            };
            let want = writer.available_bytes().min(self.chunk.len());
            match host.read(&mut self.chunk[..want]) {
                Ok(count) if count > 0 => {
                    // `count` fits: the writer has at least `want` bytes of room.
                    let stored = writer.write(&self.chunk[..count]).unwrap_or(0);
                    complete(&mut state, head, stored as u32, &mut completed);
                }
                Ok(_) => {
                    state.get_queue_mut().go_to_previous_position();
                    break;
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        warn!("Port {port}: input failed: {e}");
                    }
                    state.get_queue_mut().go_to_previous_position();
                    break;
                }
            }
        }
        if let Some(e) = corrupt {
            self.mark_broken(queue, e);
        }
        signal_if_needed(&mut state, completed)
    }

    /// Control messages from the driver.
    fn process_control_tx(&mut self, vring: &VringRwLock, mem: &GuestMemory) -> Result<(), Error> {
        let mut state = vring.get_mut();
        if !self.usable(CONTROL_TX, &state) {
            return Ok(());
        }
        let guard = mem.memory();
        let mut completed = false;
        loop {
            state.disable_notification().map_err(Error::Queue)?;
            loop {
                let chain = match next_chain(&mut state, &guard) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        self.mark_broken(CONTROL_TX, e);
                        return signal_if_needed(&mut state, completed);
                    }
                };
                let head = chain.head_index();
                let header = chain
                    .reader(&*guard)
                    .map_err(|e| io::Error::other(e.to_string()))
                    .and_then(|mut reader| reader.read_obj::<ControlHeader>());
                match header {
                    Ok(header) => self.device.handle_control(header.to_native()),
                    Err(e) => warn!("Returning a bad control message: {e}"),
                }
                complete(&mut state, head, 0, &mut completed);
            }
            if !state.enable_notification().map_err(Error::Queue)? {
                break;
            }
        }
        signal_if_needed(&mut state, completed)
    }

    /// Control messages to the driver, as far as it posted buffers for them.
    fn process_control_rx(&mut self, vring: &VringRwLock, mem: &GuestMemory) -> Result<(), Error> {
        let mut state = vring.get_mut();
        if !self.usable(CONTROL_RX, &state) {
            return Ok(());
        }
        let guard = mem.memory();
        state.disable_notification().map_err(Error::Queue)?;
        let mut completed = false;
        while let Some(message) = self.device.next_control() {
            let chain = match next_chain(&mut state, &guard) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    self.device.unsend_control(message);
                    if state.enable_notification().map_err(Error::Queue)? {
                        continue;
                    }
                    break;
                }
                Err(e) => {
                    self.device.unsend_control(message);
                    self.mark_broken(CONTROL_RX, e);
                    break;
                }
            };
            let head = chain.head_index();
            let stored = match chain.writer(&*guard) {
                Ok(mut writer) => {
                    if writer.available_bytes() < message.len() {
                        warn!(
                            "Control buffer of {} bytes truncates a {}-byte message",
                            writer.available_bytes(),
                            message.len()
                        );
                    }
                    writer.write(&message).unwrap_or(0)
                }
                Err(e) => {
                    warn!("Returning a bad control buffer, and the message with it: {e}");
                    0
                }
            };
            complete(&mut state, head, stored as u32, &mut completed);
        }
        signal_if_needed(&mut state, completed)
    }
}

/// The next chain the driver made available, if any. An error means the available ring is
/// corrupt (its index claims more entries than the queue holds): it stays so until the
/// driver restarts the queue, so retrying would spin, and looking for more
/// (`enable_notification`) would keep saying there is some.
fn next_chain<'m>(
    state: &mut VringState<GuestMemory>,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(state.get_queue_mut().iter(mem)?.next())
}

/// Whether the queue is set up and enabled.
fn live(state: &VringState<GuestMemory>) -> bool {
    state.is_enabled() && state.get_queue().ready()
}

fn complete(state: &mut VringState<GuestMemory>, head: u16, len: u32, completed: &mut bool) {
    match state.add_used(head, len) {
        Ok(()) => *completed = true,
        Err(e) => warn!("Cannot complete chain {head}: {e}"),
    }
}

fn signal_if_needed(state: &mut VringState<GuestMemory>, completed: bool) -> Result<(), Error> {
    if completed && state.needs_notification().map_err(Error::Queue)? {
        state.signal_used_queue().map_err(Error::Notify)?;
    }
    Ok(())
}

/// Offers `data` to the host until it takes all of it or would block; returns the bytes
/// taken. Errors only when the output is broken.
fn write_chunk(host: &mut dyn crate::console::ConsoleHost, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match host.write(&data[done..]) {
            Ok(0) => break,
            Ok(count) => done += count.min(data.len() - done),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl VhostUserBackendMut for VhostUserConsoleBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        queue_count(self.device.num_ports())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_CONSOLE_F_SIZE
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.multiport() {
            features |= 1 << VIRTIO_CONSOLE_F_MULTIPORT;
        }
        features
    }

    fn acked_features(&mut self, features: u64) {
        // Features are set when a driver starts: whatever the last one left is stale.
        self.acked_features = features;
        self.tx_written.fill(0);
        self.broken_queues = 0;
        self.device.reset();
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: the front door carries configuration changes (a resize) back.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn reset_device(&mut self) {
        self.acked_features = 0;
        self.tx_written.fill(0);
        self.broken_queues = 0;
        self.device.reset();
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // VUB configures each queue's event index itself; processing is the same either way.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Bytes past the fields read as zero; VUB limits offset + size to 4 KiB.
        let (Ok(offset), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        if offset.checked_add(size).is_none_or(|end| end > 0x1000) {
            return Vec::new();
        }
        let config = self.config();
        let fields = &config.as_slice()[..CONFIG_SPACE_SIZE];
        let mut out = vec![0u8; size];
        if offset < fields.len() {
            let count = size.min(fields.len() - offset);
            out[..count].copy_from_slice(&fields[offset..offset + count]);
        }
        out
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing is writable without EMERG_WRITE, which is not offered. Ignored rather than
        // refused: VUB ends the connection when this fails.
        debug!(
            "Ignoring a write to configuration bytes {offset:#x}+{}",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemory) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker for every queue and the hosts: the ports share the control queues.
        let queues = self.num_queues() as u32;
        vec![u64::MAX >> (64 - queues)]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // VUB registers the consumer by raw fd and never closes it: one descriptor per
        // connection is leaked, as in the block backend.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("Cannot create the worker's exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        // A stopped ring restarts from wherever the frontend says; a partly written chain
        // is then either gone or new.
        let index = queue_index as usize;
        if index < 64 {
            self.broken_queues &= !(1 << index);
        }
        let port = match index {
            1 => Some(0),
            i if i > CONTROL_TX && i % 2 == 1 => Some((i - 2) / 2),
            _ => None,
        };
        if let Some(written) = port.and_then(|port| self.tx_written.get_mut(port)) {
            *written = 0;
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if device_event == self.host_event() {
            self.device
                .dispatch_host_events()
                .map_err(Error::HostEvents)?;
        } else if usize::from(device_event) >= vrings.len() {
            return Err(Error::UnknownEvent(device_event).into());
        }
        // Whatever woke us, retry everything: a kick on one queue, or a host becoming
        // ready, can unblock any port.
        self.process(vrings)?;
        // Activity on either side is when a resize of the pty can be noticed.
        self.refresh_window_size();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::console::mock::MockHost;
    use crate::console::{Port, WindowSize};
    use crate::virtio_console::{event, CONTROL_HEADER_LEN};

    const QUEUE_SIZE: u16 = 16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    /// Each queue gets 64 KiB of guest memory: rings first, then buffers.
    const QUEUE_SPAN: u64 = 0x1_0000;
    const BUFFERS: u64 = 0x1000;

    fn backend(ports: usize) -> (VhostUserConsoleBackend, Vec<MockHost>) {
        let hosts: Vec<MockHost> = (0..ports).map(|_| MockHost::default()).collect();
        let device = ConsoleDevice::new(
            hosts
                .iter()
                .enumerate()
                .map(|(i, host)| Port::new(format!("port{i}"), Box::new(host.clone())))
                .collect(),
        )
        .unwrap();
        (VhostUserConsoleBackend::new(device, 128).unwrap(), hosts)
    }

    /// Guest memory and one started vring per queue, each with a call eventfd.
    struct Rig {
        mem: GuestMemoryMmap,
        vrings: Vec<VringRwLock>,
        calls: Vec<EventConsumer>,
        /// Descriptor table, avail ring and used ring of each queue.
        rings: Vec<(GuestAddress, GuestAddress, GuestAddress)>,
        /// Next free descriptor of each queue.
        next_desc: Vec<u16>,
    }

    impl Rig {
        fn new(backend: &mut VhostUserConsoleBackend, features: u64) -> Self {
            let queues = backend.num_queues();
            let size = QUEUE_SPAN * queues as u64;
            let mem =
                GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            backend.update_memory(atomic.clone()).unwrap();
            backend.acked_features(features);
            let mut vrings = Vec::new();
            let mut calls = Vec::new();
            let mut rings = Vec::new();
            for queue in 0..queues {
                let base = GuestAddress(QUEUE_SPAN * queue as u64);
                // Lays the rings out in guest memory; the vring gets the same addresses.
                let mock = MockSplitQueue::create(&mem, base, QUEUE_SIZE);
                let vring = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
                vring
                    .set_queue_info(
                        mock.desc_table_addr().raw_value(),
                        mock.avail_addr().raw_value(),
                        mock.used_addr().raw_value(),
                    )
                    .unwrap();
                vring.set_queue_size(QUEUE_SIZE);
                vring.set_queue_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                let (call, notifier) =
                    new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
                // SAFETY: `into_raw_fd` hands over sole ownership of a valid eventfd.
                vring.set_call(Some(unsafe { File::from_raw_fd(notifier.into_raw_fd()) }));
                vrings.push(vring);
                calls.push(call);
                rings.push((mock.desc_table_addr(), mock.avail_addr(), mock.used_addr()));
            }
            Rig {
                mem,
                vrings,
                calls,
                rings,
                next_desc: vec![0; queues],
            }
        }

        /// Where buffer `n` of `queue` lives.
        fn buffer(&self, queue: usize, n: u16) -> u64 {
            QUEUE_SPAN * queue as u64 + BUFFERS + 0x400 * u64::from(n)
        }

        /// Offers a chain of `(addr, len, flags)` descriptors, linked in order.
        fn offer(&mut self, queue: usize, descs: &[(u64, u32, u16)]) -> u16 {
            let first = self.next_desc[queue];
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let last = i + 1 == descs.len();
                    let index = first + i as u16;
                    let flags = if last { flags } else { flags | NEXT };
                    RawDescriptor::from(Descriptor::new(addr, len, flags, index + 1))
                })
                .collect();
            self.next_desc[queue] += descs.len() as u16;
            let (table, avail, _) = self.rings[queue];
            for (i, desc) in raw.iter().enumerate() {
                let addr = table.unchecked_add(16 * (u64::from(first) + i as u64));
                self.mem.write_obj(*desc, addr).unwrap();
            }
            let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
            let slot = avail.unchecked_add(4 + 2 * u64::from(idx % QUEUE_SIZE));
            self.mem.write_obj(first, slot).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
                .unwrap();
            first
        }

        /// Offers a transmit buffer holding `data`.
        fn offer_tx(&mut self, queue: usize, data: &[u8]) -> u16 {
            let addr = self.buffer(queue, self.next_desc[queue]);
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
            self.offer(queue, &[(addr, data.len() as u32, 0)])
        }

        /// Offers a receive buffer of `len` bytes.
        fn offer_rx(&mut self, queue: usize, len: u32) -> u16 {
            let addr = self.buffer(queue, self.next_desc[queue]);
            self.offer(queue, &[(addr, len, W)])
        }

        fn used(&self, queue: usize) -> Vec<(u32, u32)> {
            let used = self.rings[queue].2;
            let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
            (0..u64::from(idx))
                .map(|i| {
                    let elem = used.unchecked_add(4 + 8 * i);
                    (
                        self.mem.read_obj(elem).unwrap(),
                        self.mem.read_obj(elem.unchecked_add(4)).unwrap(),
                    )
                })
                .collect()
        }

        fn read(&self, addr: u64, len: u32) -> Vec<u8> {
            let mut data = vec![0u8; len as usize];
            self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
            data
        }

        fn notified(&self, queue: usize) -> bool {
            self.calls[queue].consume().is_ok()
        }

        /// The host event: some host became ready.
        fn host_ready(&self, backend: &mut VhostUserConsoleBackend) {
            let event = backend.host_event();
            backend
                .handle_event(event, EventSet::IN, &self.vrings, 0)
                .unwrap();
        }

        fn kick(&self, backend: &mut VhostUserConsoleBackend, queue: usize) {
            backend
                .handle_event(queue as u16, EventSet::IN, &self.vrings, 0)
                .unwrap();
        }
    }

    const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn features_and_queues_follow_the_port_count() {
        let (single, _) = backend(1);
        assert_eq!(single.num_queues(), 2);
        assert_eq!(single.features() & (1 << VIRTIO_CONSOLE_F_MULTIPORT), 0);
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_CONSOLE_F_SIZE,
        ] {
            assert_ne!(single.features() & (1 << bit), 0, "bit {bit}");
        }
        assert!(single.protocol_features().contains(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::BACKEND_REQ
        ));
        assert_eq!(single.queues_per_thread(), vec![0b11]);
        let (multi, _) = backend(3);
        assert_eq!(multi.num_queues(), 8);
        assert_ne!(multi.features() & (1 << VIRTIO_CONSOLE_F_MULTIPORT), 0);
        assert_eq!(multi.queues_per_thread(), vec![0xff]);
        assert_eq!(multi.host_event(), 9);
        let (widest, _) = backend(MAX_PORTS);
        assert_eq!(widest.num_queues(), 64);
        assert_eq!(widest.queues_per_thread(), vec![u64::MAX]);
        assert_eq!((rx_queue(0), rx_queue(1), rx_queue(2)), (0, 4, 6));
    }

    #[test]
    fn config_space_holds_size_and_ports_and_is_bounds_checked() {
        let (backend, hosts) = backend(2);
        assert_eq!(
            backend.get_config(0, 12),
            [80, 0, 25, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
        hosts[0].state().size = Some(WindowSize {
            cols: 300,
            rows: 70,
        });
        assert_eq!(backend.get_config(0, 4), [44, 1, 70, 0]);
        assert_eq!(backend.get_config(2, 1), [70]);
        assert_eq!(backend.get_config(10, 6), [0; 6]);
        assert_eq!(backend.get_config(0x800, 4), [0; 4]);
        assert!(backend.get_config(0xfff, 2).is_empty());
        assert!(backend.get_config(u32::MAX, 1).is_empty());
        assert!(backend.get_config(4, u32::MAX).is_empty());
    }

    /// Whether the configuration change event fired, resetting it.
    fn config_change_signalled(backend: &VhostUserConsoleBackend) -> bool {
        match backend.config_change_event().read() {
            Ok(count) => count > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("config change event: {e}"),
        }
    }

    #[test]
    fn a_resize_is_noticed_once_and_signalled() {
        let (mut backend, hosts) = backend(1);
        assert!(!backend.refresh_window_size(), "nothing changed yet");
        assert!(!config_change_signalled(&backend));
        hosts[0].state().size = Some(WindowSize {
            cols: 132,
            rows: 43,
        });
        assert!(backend.refresh_window_size());
        assert!(config_change_signalled(&backend));
        assert_eq!(backend.get_config(0, 4), [132, 0, 43, 0]);
        // The same size again is no change.
        assert!(!backend.refresh_window_size());
        assert!(!config_change_signalled(&backend));
        // Losing the terminal size falls back to the default, which is a change too.
        hosts[0].state().size = None;
        assert!(backend.refresh_window_size());
        assert!(config_change_signalled(&backend));
        assert_eq!(backend.get_config(0, 4), [80, 0, 25, 0]);
    }

    #[test]
    fn any_event_looks_at_the_console_size() {
        let (mut backend, hosts) = backend(2);
        let mut rig = Rig::new(&mut backend, FEATURES);
        let resize = |cols, rows| hosts[0].state().size = Some(WindowSize { cols, rows });
        // Host readiness (a keystroke, a drained pty).
        resize(100, 30);
        rig.host_ready(&mut backend);
        assert!(config_change_signalled(&backend));
        // A guest kick (output, new receive buffers).
        resize(101, 30);
        rig.offer_tx(1, b"x");
        rig.kick(&mut backend, 1);
        assert!(config_change_signalled(&backend));
        // Only port 0's terminal is the console's size.
        hosts[1].state().size = Some(WindowSize { cols: 7, rows: 7 });
        rig.host_ready(&mut backend);
        assert!(!config_change_signalled(&backend));
        assert_eq!(backend.get_config(0, 4), [101, 0, 30, 0]);
    }

    #[test]
    fn output_reaches_the_host_and_completes() {
        let (mut backend, hosts) = backend(1);
        let mut rig = Rig::new(&mut backend, FEATURES);
        let first = rig.offer_tx(1, b"hello ");
        let second = rig.offer_tx(1, b"world");
        rig.kick(&mut backend, 1);
        assert_eq!(hosts[0].state().output, b"hello world");
        assert_eq!(rig.used(1), [(u32::from(first), 0), (u32::from(second), 0)]);
        assert!(rig.notified(1));
    }

    #[test]
    fn output_waits_while_the_host_would_block() {
        let (mut backend, hosts) = backend(1);
        let mut rig = Rig::new(&mut backend, FEATURES);
        hosts[0].state().output_room = Some(4);
        let first = rig.offer_tx(1, b"0123456789");
        let second = rig.offer_tx(1, b"abc");
        rig.kick(&mut backend, 1);
        // Four bytes went out; the chain is kept, nothing completes.
        assert_eq!(hosts[0].state().output, b"0123");
        assert!(rig.used(1).is_empty());
        assert!(!rig.notified(1));
        // A spurious wakeup with the host still full changes nothing.
        rig.kick(&mut backend, 1);
        assert!(rig.used(1).is_empty());
        // The host drains a little: the same chain resumes where it stopped.
        hosts[0].state().output_room = Some(3);
        rig.host_ready(&mut backend);
        assert_eq!(hosts[0].state().output, b"0123456");
        assert!(rig.used(1).is_empty());
        hosts[0].state().output_room = None;
        rig.host_ready(&mut backend);
        assert_eq!(hosts[0].state().output, b"0123456789abc");
        assert_eq!(rig.used(1), [(u32::from(first), 0), (u32::from(second), 0)]);
        assert!(rig.notified(1));
    }

    #[test]
    fn broken_output_completes_rather_than_hanging_the_guest() {
        let (mut backend, hosts) = backend(1);
        let mut rig = Rig::new(&mut backend, FEATURES);
        hosts[0].state().broken = true;
        let head = rig.offer_tx(1, b"lost");
        rig.kick(&mut backend, 1);
        assert_eq!(rig.used(1), [(u32::from(head), 0)]);
    }

    #[test]
    fn input_waits_for_receive_buffers() {
        let (mut backend, hosts) = backend(1);
        let mut rig = Rig::new(&mut backend, FEATURES);
        hosts[0].state().input.extend(b"typed early");
        // No buffers: the host is not even read.
        rig.host_ready(&mut backend);
        assert_eq!(hosts[0].state().reads, 0);
        assert_eq!(hosts[0].state().input.len(), 11);
        assert!(rig.used(0).is_empty());
        // Buffers arrive: the input lands in them, split as they allow.
        let small = rig.offer_rx(0, 5);
        let large = rig.offer_rx(0, 64);
        rig.kick(&mut backend, 0);
        assert_eq!(rig.used(0), [(u32::from(small), 5), (u32::from(large), 6)]);
        assert_eq!(rig.read(rig.buffer(0, 0), 5), b"typed");
        assert_eq!(rig.read(rig.buffer(0, 1), 6), b" early");
        assert!(rig.notified(0));
        // With buffers left and no input, nothing completes.
        rig.offer_rx(0, 64);
        rig.kick(&mut backend, 0);
        assert_eq!(rig.used(0).len(), 2);
        // Input later goes into the buffer that waited.
        hosts[0].state().input.extend(b"!");
        rig.host_ready(&mut backend);
        assert_eq!(rig.used(0).len(), 3);
        assert_eq!(rig.read(rig.buffer(0, 2), 1), b"!");
    }

    #[test]
    fn starved_receive_queue_asks_for_a_kick_with_event_idx() {
        let (mut backend, hosts) = backend(1);
        let mut rig = Rig::new(&mut backend, FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX);
        rig.offer_rx(0, 4);
        hosts[0].state().input.extend(b"abcdef");
        rig.host_ready(&mut backend);
        assert_eq!(rig.used(0), [(0, 4)]);
        // The device ran out of buffers with input left: avail_event asks for a kick at the
        // next buffer (avail index 1).
        let avail_event = rig.rings[0].2.unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));
        assert_eq!(rig.mem.read_obj::<u16>(avail_event).unwrap(), 1);
        assert_eq!(hosts[0].state().input.len(), 2);
    }

    #[test]
    fn malformed_chains_are_returned_empty() {
        let (mut backend, hosts) = backend(1);
        let mut rig = Rig::new(&mut backend, FEATURES);
        hosts[0].state().input.extend(b"data");
        let outside = QUEUE_SPAN * 8;
        // Receive: a read-only buffer, then one outside guest memory, then a good one.
        let read_only = rig.offer(0, &[(rig.buffer(0, 0), 16, 0)]);
        let out_of_range = rig.offer(0, &[(outside, 16, W)]);
        let good = rig.offer_rx(0, 16);
        // Transmit: a buffer outside guest memory, then a good one.
        let bad_tx = rig.offer(1, &[(outside, 16, 0)]);
        let good_tx = rig.offer_tx(1, b"ok");
        rig.kick(&mut backend, 0);
        assert_eq!(
            rig.used(0),
            [
                (u32::from(read_only), 0),
                (u32::from(out_of_range), 0),
                (u32::from(good), 4)
            ]
        );
        assert_eq!(
            rig.used(1),
            [(u32::from(bad_tx), 0), (u32::from(good_tx), 0)]
        );
        assert_eq!(hosts[0].state().output, b"ok");
    }

    #[test]
    fn transmit_chain_spanning_descriptors_is_written_in_order() {
        let (mut backend, hosts) = backend(1);
        let mut rig = Rig::new(&mut backend, FEATURES);
        let a = rig.buffer(1, 0);
        let b = rig.buffer(1, 5);
        rig.mem.write_slice(b"first-", GuestAddress(a)).unwrap();
        rig.mem.write_slice(b"second", GuestAddress(b)).unwrap();
        // A trailing device-writable descriptor is ignored for output.
        let head = rig.offer(1, &[(a, 6, 0), (b, 6, 0), (rig.buffer(1, 9), 8, W)]);
        rig.kick(&mut backend, 1);
        assert_eq!(hosts[0].state().output, b"first-second");
        assert_eq!(rig.used(1), [(u32::from(head), 0)]);
    }

    /// Control messages the device wrote into control receive buffers.
    fn control_messages(rig: &Rig) -> Vec<(ControlHeader, Vec<u8>)> {
        rig.used(CONTROL_RX)
            .iter()
            .map(|&(head, len)| {
                let data = rig.read(rig.buffer(CONTROL_RX, head as u16), len);
                let mut header = ControlHeader::default();
                header
                    .as_mut_slice()
                    .copy_from_slice(&data[..CONTROL_HEADER_LEN]);
                (header.to_native(), data[CONTROL_HEADER_LEN..].to_vec())
            })
            .collect()
    }

    fn send_control(rig: &mut Rig, id: u32, event: u16, value: u16) {
        let header = ControlHeader::new(id, event, value).to_le();
        rig.offer_tx(CONTROL_TX, header.as_slice());
    }

    const MULTIPORT: u64 = FEATURES | 1 << VIRTIO_CONSOLE_F_MULTIPORT;

    #[test]
    fn multiport_handshake_through_the_control_queues() {
        let (mut backend, _) = backend(2);
        let mut rig = Rig::new(&mut backend, MULTIPORT);
        for _ in 0..8 {
            rig.offer_rx(CONTROL_RX, 256);
        }
        send_control(&mut rig, 0, event::DEVICE_READY, 1);
        rig.kick(&mut backend, CONTROL_TX);
        assert_eq!(rig.used(CONTROL_TX).len(), 1);
        let header = |id, event, value| ControlHeader::new(id, event, value);
        assert_eq!(
            control_messages(&rig),
            [
                (header(0, event::DEVICE_ADD, 1), vec![]),
                (header(1, event::DEVICE_ADD, 1), vec![])
            ]
        );
        assert!(rig.notified(CONTROL_RX));
        send_control(&mut rig, 1, event::PORT_READY, 1);
        rig.kick(&mut backend, CONTROL_TX);
        assert_eq!(
            control_messages(&rig)[2..],
            [
                (header(1, event::PORT_NAME, 1), b"port1".to_vec()),
                (header(1, event::PORT_OPEN, 1), vec![])
            ]
        );
    }

    #[test]
    fn control_messages_wait_for_control_buffers() {
        let (mut backend, _) = backend(3);
        let mut rig = Rig::new(&mut backend, MULTIPORT);
        send_control(&mut rig, 0, event::DEVICE_READY, 1);
        rig.kick(&mut backend, CONTROL_TX);
        assert!(rig.used(CONTROL_RX).is_empty());
        rig.offer_rx(CONTROL_RX, 64);
        rig.kick(&mut backend, CONTROL_RX);
        assert_eq!(control_messages(&rig).len(), 1);
        rig.offer_rx(CONTROL_RX, 64);
        rig.offer_rx(CONTROL_RX, 64);
        rig.kick(&mut backend, CONTROL_RX);
        let ids: Vec<u32> = control_messages(&rig).iter().map(|(h, _)| h.id).collect();
        assert_eq!(ids, [0, 1, 2], "in order, none lost");
    }

    #[test]
    fn short_control_message_is_returned_and_ignored() {
        let (mut backend, _) = backend(2);
        let mut rig = Rig::new(&mut backend, MULTIPORT);
        rig.offer_rx(CONTROL_RX, 64);
        let short = rig.offer_tx(CONTROL_TX, &[0, 0, 0, 0, 0, 0]);
        rig.kick(&mut backend, CONTROL_TX);
        assert_eq!(rig.used(CONTROL_TX), [(u32::from(short), 0)]);
        assert!(rig.used(CONTROL_RX).is_empty());
    }

    #[test]
    fn multiport_input_waits_until_the_guest_opens_the_port() {
        let (mut backend, hosts) = backend(2);
        let mut rig = Rig::new(&mut backend, MULTIPORT);
        let port1_rx = rx_queue(1);
        hosts[1].state().input.extend(b"for port 1");
        rig.offer_rx(port1_rx, 64);
        rig.kick(&mut backend, port1_rx);
        assert!(rig.used(port1_rx).is_empty(), "the guest would discard it");
        assert_eq!(hosts[1].state().reads, 0);
        send_control(&mut rig, 1, event::PORT_OPEN, 1);
        rig.kick(&mut backend, CONTROL_TX);
        assert_eq!(rig.used(port1_rx), [(0, 10)]);
        assert_eq!(rig.read(rig.buffer(port1_rx, 0), 10), b"for port 1");
        // Output on port 1 goes to port 1's host only.
        rig.offer_tx(port1_rx + 1, b"out1");
        rig.kick(&mut backend, port1_rx + 1);
        assert_eq!(hosts[1].state().output, b"out1");
        assert!(hosts[0].state().output.is_empty());
    }

    #[test]
    fn without_multiport_negotiated_only_port_zero_runs() {
        let (mut backend, hosts) = backend(2);
        let mut rig = Rig::new(&mut backend, FEATURES);
        hosts[0].state().input.extend(b"in");
        rig.offer_rx(0, 8);
        rig.offer_tx(rx_queue(1) + 1, b"ignored");
        rig.kick(&mut backend, 0);
        assert_eq!(rig.used(0), [(0, 2)], "port 0 is open without PORT_OPEN");
        assert!(rig.used(rx_queue(1) + 1).is_empty());
        assert!(hosts[1].state().output.is_empty());
    }

    #[test]
    fn disconnect_forgets_the_driver_but_not_the_hosts() {
        let (mut backend, hosts) = backend(2);
        let mut rig = Rig::new(&mut backend, MULTIPORT);
        send_control(&mut rig, 1, event::PORT_OPEN, 1);
        rig.kick(&mut backend, CONTROL_TX);
        assert!(backend.device().port(1).unwrap().guest_open());
        backend.disconnected();
        assert!(!backend.device().port(1).unwrap().guest_open());
        // No memory: events are accepted and do nothing.
        hosts[0].state().input.extend(b"x");
        rig.kick(&mut backend, 0);
        assert_eq!(hosts[0].state().reads, 0);
    }

    #[test]
    fn corrupt_available_rings_are_left_alone_instead_of_spun_on() {
        let (mut backend, hosts) = backend(2);
        let mut rig = Rig::new(&mut backend, MULTIPORT);
        hosts[0].state().input.extend(b"typed");
        send_control(&mut rig, 1, event::PORT_OPEN, 1);
        rig.offer_tx(1, b"out");
        // A driver (or a crashed guest) claims far more entries than the queues hold.
        for queue in [0, 1, CONTROL_RX, CONTROL_TX] {
            let avail_idx = rig.rings[queue].1.unchecked_add(2);
            rig.mem.write_obj(1000u16, avail_idx).unwrap();
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            for queue in [0, 1, CONTROL_TX, CONTROL_RX] {
                rig.kick(&mut backend, queue);
            }
            rig.host_ready(&mut backend);
            done_tx.send(()).unwrap();
            (backend, rig)
        });
        // The old loop never came back from the first kick.
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the backend spins on a corrupt ring");
        let (mut backend, rig) = worker.join().unwrap();
        assert_eq!(hosts[0].state().reads, 0, "nothing read for a corrupt ring");
        assert!(hosts[0].state().output.is_empty());
        assert!(!backend.device().port(1).unwrap().guest_open());
        // The driver restarts the transmit queue: it is served again.
        backend.stop_vring(1).unwrap();
        rig.mem
            .write_obj(1u16, rig.rings[1].1.unchecked_add(2))
            .unwrap();
        rig.kick(&mut backend, 1);
        assert_eq!(hosts[0].state().output, b"out");
        assert_eq!(hosts[0].state().reads, 0, "the receive queue stays broken");
    }

    #[test]
    fn unknown_events_are_errors() {
        let (mut backend, _) = backend(1);
        let mut rig = Rig::new(&mut backend, FEATURES);
        let err = backend
            .handle_event(2, EventSet::IN, &rig.vrings, 0)
            .unwrap_err();
        assert!(err.to_string().contains("neither a queue"), "{err}");
        // Queue events for stopped rings are harmless.
        rig.vrings[1].set_enabled(false);
        rig.offer_tx(1, b"later");
        rig.kick(&mut backend, 1);
        assert!(rig.used(1).is_empty());
    }
}
