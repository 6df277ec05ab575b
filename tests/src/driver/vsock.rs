//! A virtio-vsock driver for stream sockets, modelled on Linux's `virtio_transport.c` and
//! `virtio_transport_common.c`: receive (queue 0), transmit (queue 1) and event (queue 2)
//! queues, each packet a 44-byte header and its payload in one descriptor, and a guest-side
//! connection with credit accounting.

use std::collections::VecDeque;
use std::time::Duration;

use super::generic::{DeviceSpec, GenericDevice};
use super::mmio::VIRTIO_F_VERSION_1;
use super::virtqueue::{BufferSegment, GuestAllocator};
use super::{DriverError, GuestMemory, Interrupts, MmioBus, Result};

pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// `virtio_vsock_hdr` on the wire.
pub const HEADER_LEN: usize = 44;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: no more receives, no more sends.
pub const SHUTDOWN_BOTH: u32 = 3;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
const QUEUE_SIZE: u16 = 64;
/// Payload room of each receive buffer (Linux uses 4 KiB too).
const RX_PAYLOAD: usize = 4096;
const RX_BUFFERS: usize = 16;
/// `virtio_vsock_event` is one le32.
const EVENT_LEN: u32 = 4;
const EVENT_BUFFERS: usize = 4;
/// The receive space this guest advertises per connection.
const BUF_ALLOC: u32 = 64 * 1024;

/// One vsock packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub payload: Vec<u8>,
}

impl Packet {
    /// The header and payload as the device reads them.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.src_cid.to_le_bytes());
        out.extend_from_slice(&self.dst_cid.to_le_bytes());
        out.extend_from_slice(&self.src_port.to_le_bytes());
        out.extend_from_slice(&self.dst_port.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&self.op.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.buf_alloc.to_le_bytes());
        out.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parses what the device wrote; a header whose `len` runs past the written bytes is a
    /// device error.
    pub fn decode(bytes: &[u8]) -> Result<Packet> {
        let header = bytes.get(..HEADER_LEN).ok_or(DriverError::MalformedReply(
            "vsock packet shorter than its header",
        ))?;
        let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let len = u32_at(24) as usize;
        let payload = bytes
            .get(HEADER_LEN..HEADER_LEN.saturating_add(len))
            .ok_or(DriverError::MalformedReply(
                "vsock payload runs past the buffer",
            ))?;
        Ok(Packet {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
            payload: payload.to_vec(),
        })
    }
}

/// A guest-side stream connection to a host port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub local_port: u32,
    pub peer_port: u32,
    /// Payload bytes this side consumed (reported to the peer as `fwd_cnt`).
    received: u32,
    /// Payload bytes this side sent.
    sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Connection {
    /// Bytes the peer can still take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.sent.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A virtio-vsock device with posted receive buffers and one transmit buffer.
#[derive(Debug)]
pub struct VsockDriver<'a, B: MmioBus, M: GuestMemory, I: Interrupts> {
    dev: GenericDevice<'a, B, M, I>,
    mem: &'a M,
    guest_cid: u64,
    /// Receive buffers, and the one behind each in-flight head.
    rx_buffers: Vec<u64>,
    rx_owner: Vec<Option<usize>>,
    tx_buffer: u64,
    /// Packets received for no connection this driver waits on yet.
    backlog: VecDeque<Packet>,
    timeout: Duration,
}

impl<'a, B: MmioBus, M: GuestMemory, I: Interrupts> VsockDriver<'a, B, M, I> {
    /// Initialises the device at `base`, reads the guest CID and posts receive and event
    /// buffers.
    pub fn new(
        bus: &'a B,
        base: u64,
        mem: &'a M,
        irq: &'a I,
        alloc: &mut GuestAllocator,
        timeout: Duration,
    ) -> Result<Self> {
        let spec = DeviceSpec {
            device_id: VIRTIO_ID_VSOCK,
            features: VIRTIO_F_VERSION_1,
            queue_sizes: &[QUEUE_SIZE; 3],
        };
        let dev = GenericDevice::new(bus, base, mem, irq, alloc, &spec)?;
        let guest_cid = dev.device().read_config_u64(0)?;
        let rx_len = (HEADER_LEN + RX_PAYLOAD) as u64;
        let rx_buffers = (0..RX_BUFFERS)
            .map(|_| alloc.alloc(rx_len, 64))
            .collect::<Result<Vec<_>>>()?;
        let tx_buffer = alloc.alloc(rx_len, 64)?;
        let mut driver = Self {
            rx_owner: vec![None; usize::from(dev.queue_size(RX_QUEUE)?)],
            dev,
            mem,
            guest_cid,
            rx_buffers,
            tx_buffer,
            backlog: VecDeque::new(),
            timeout,
        };
        for slot in 0..driver.rx_buffers.len() {
            driver.post_rx(slot)?;
        }
        driver.dev.kick(RX_QUEUE)?;
        for _ in 0..EVENT_BUFFERS {
            let event = alloc.alloc(u64::from(EVENT_LEN), 8)?;
            driver
                .dev
                .add(EVENT_QUEUE, &[BufferSegment::writable(event, EVENT_LEN)])?;
        }
        driver.dev.kick(EVENT_QUEUE)?;
        Ok(driver)
    }

    /// The CID the device's config space gives this guest.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    fn post_rx(&mut self, slot: usize) -> Result<()> {
        let segment =
            BufferSegment::writable(self.rx_buffers[slot], (HEADER_LEN + RX_PAYLOAD) as u32);
        let head = self.dev.add(RX_QUEUE, &[segment])?;
        self.rx_owner[usize::from(head)] = Some(slot);
        Ok(())
    }

    /// Sends one packet and waits until the device has consumed it.
    pub fn send(&mut self, packet: &Packet) -> Result<()> {
        if packet.payload.len() > RX_PAYLOAD {
            return Err(DriverError::InvalidOption("vsock payload above 4 KiB"));
        }
        let bytes = packet.encode();
        self.mem.write(self.tx_buffer, &bytes);
        self.dev.add(
            TX_QUEUE,
            &[BufferSegment::readable(self.tx_buffer, bytes.len() as u32)],
        )?;
        self.dev.kick(TX_QUEUE)?;
        self.dev.wait_used(TX_QUEUE, self.timeout)?;
        Ok(())
    }

    /// The next packet from the device.
    pub fn recv(&mut self) -> Result<Packet> {
        if let Some(packet) = self.backlog.pop_front() {
            return Ok(packet);
        }
        let used = self.dev.wait_used(RX_QUEUE, self.timeout)?;
        let slot = self.rx_owner[usize::from(used.id)]
            .take()
            .ok_or(DriverError::UsedIdNotInFlight(u32::from(used.id)))?;
        let mut bytes = vec![0u8; used.len as usize];
        self.mem.read(self.rx_buffers[slot], &mut bytes);
        self.post_rx(slot)?;
        self.dev.kick(RX_QUEUE)?;
        Packet::decode(&bytes)
    }

    fn packet(&self, conn: &Connection, op: u16, flags: u32, payload: &[u8]) -> Packet {
        Packet {
            src_cid: self.guest_cid,
            dst_cid: HOST_CID,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.received,
            payload: payload.to_vec(),
        }
    }

    /// Takes the next packet of `conn`, answering credit requests and keeping the peer's
    /// credit; packets of other connections wait in the backlog.
    fn recv_for(&mut self, conn: &mut Connection) -> Result<Packet> {
        let mut others = Vec::new();
        let result = loop {
            let packet = match self.recv() {
                Ok(packet) => packet,
                Err(error) => break Err(error),
            };
            let ours = packet.src_cid == HOST_CID
                && packet.dst_cid == self.guest_cid
                && packet.src_port == conn.peer_port
                && packet.dst_port == conn.local_port;
            if !ours {
                others.push(packet);
                continue;
            }
            conn.peer_buf_alloc = packet.buf_alloc;
            conn.peer_fwd_cnt = packet.fwd_cnt;
            match packet.op {
                op::CREDIT_UPDATE => continue,
                op::CREDIT_REQUEST => {
                    let update = self.packet(conn, op::CREDIT_UPDATE, 0, &[]);
                    if let Err(error) = self.send(&update) {
                        break Err(error);
                    }
                }
                _ => break Ok(packet),
            }
        };
        self.backlog.extend(others);
        result
    }

    /// Connects `local_port` to the host's `peer_port`: REQUEST, then RESPONSE (or RST,
    /// reported as [`DriverError::ConnectionRefused`]).
    pub fn connect(&mut self, local_port: u32, peer_port: u32) -> Result<Connection> {
        let mut conn = Connection {
            local_port,
            peer_port,
            received: 0,
            sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        };
        let request = self.packet(&conn, op::REQUEST, 0, &[]);
        self.send(&request)?;
        let reply = self.recv_for(&mut conn)?;
        match reply.op {
            op::RESPONSE => Ok(conn),
            op::RST => Err(DriverError::ConnectionRefused),
            _ => Err(DriverError::MalformedReply(
                "vsock connection request answered with neither RESPONSE nor RST",
            )),
        }
    }

    /// Sends `data` as one RW packet, within the peer's credit.
    pub fn write(&mut self, conn: &mut Connection, data: &[u8]) -> Result<()> {
        if data.len() > conn.peer_credit() as usize {
            return Err(DriverError::InvalidOption(
                "vsock write beyond the peer's credit",
            ));
        }
        let packet = self.packet(conn, op::RW, 0, data);
        self.send(&packet)?;
        conn.sent = conn.sent.wrapping_add(data.len() as u32);
        Ok(())
    }

    /// The payload of the next RW packet of `conn`; SHUTDOWN or RST from the peer is
    /// reported as [`DriverError::ConnectionReset`].
    pub fn read(&mut self, conn: &mut Connection) -> Result<Vec<u8>> {
        let packet = self.recv_for(conn)?;
        match packet.op {
            op::RW => {
                conn.received = conn.received.wrapping_add(packet.payload.len() as u32);
                Ok(packet.payload)
            }
            op::SHUTDOWN | op::RST => Err(DriverError::ConnectionReset),
            _ => Err(DriverError::MalformedReply("unexpected vsock packet")),
        }
    }

    /// Shuts both directions down and waits for the peer's RST.
    pub fn close(&mut self, mut conn: Connection) -> Result<()> {
        let shutdown = self.packet(&conn, op::SHUTDOWN, SHUTDOWN_BOTH, &[]);
        self.send(&shutdown)?;
        loop {
            let packet = self.recv_for(&mut conn)?;
            if packet.op == op::RST {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_and_bad_lengths_are_refused() {
        let packet = Packet {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 5000,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 7,
            payload: b"hello".to_vec(),
        };
        let bytes = packet.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 5);
        assert_eq!(Packet::decode(&bytes).unwrap(), packet);
        assert!(Packet::decode(&bytes[..HEADER_LEN + 4]).is_err());
        assert!(Packet::decode(&bytes[..HEADER_LEN - 1]).is_err());
    }
}
