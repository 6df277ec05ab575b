//! A minimal virtio-fs driver, modelled on Linux's `virtio_fs.c` and `fuse/file.c`: FUSE
//! requests on the request queue (queue 1), each a device-readable in-header and arguments
//! followed by a device-writable out-header and reply; FORGET on the high-priority queue
//! (queue 0), which carries no reply.

use std::time::Duration;

use super::generic::{DeviceSpec, GenericDevice};
use super::mmio::VIRTIO_F_VERSION_1;
use super::virtqueue::{BufferSegment, GuestAllocator};
use super::{DriverError, GuestMemory, Interrupts, MmioBus, Result};

pub const VIRTIO_ID_FS: u32 = 26;
/// The node id of the file system root.
pub const ROOT_ID: u64 = 1;
/// The FUSE protocol version this client speaks (7.31, as Linux 5.10).
pub const FUSE_MAJOR: u32 = 7;
pub const FUSE_MINOR: u32 = 31;

/// FUSE opcodes this client sends.
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const RELEASE: u32 = 18;
    pub const INIT: u32 = 26;
    pub const CREATE: u32 = 35;
}

const HIPRIO_QUEUE: u16 = 0;
const REQUEST_QUEUE: u16 = 1;
const QUEUE_SIZE: u16 = 64;
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// `fuse_entry_out`: node id, generation, validity times, then `fuse_attr`.
const ENTRY_OUT_LEN: usize = 128;
const ATTR_OFFSET: usize = 40;
const OPEN_OUT_LEN: usize = 16;
const INIT_OUT_LEN: usize = 64;
/// `tag[36]` then `num_request_queues`.
const TAG_LEN: usize = 36;

/// The configuration space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The tag the guest mounts by.
    pub tag: String,
    pub num_request_queues: u32,
}

/// What FUSE_INIT agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitReply {
    pub major: u32,
    pub minor: u32,
    pub max_write: u32,
}

/// The parts of `fuse_entry_out` this client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub nodeid: u64,
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
}

/// A virtio-fs device with one request in flight at a time.
#[derive(Debug)]
pub struct FsDriver<'a, B: MmioBus, M: GuestMemory, I: Interrupts> {
    dev: GenericDevice<'a, B, M, I>,
    mem: &'a M,
    config: FsConfig,
    /// Request (device-readable) and reply (device-writable) buffers of `buffer_len` bytes.
    request: u64,
    reply: u64,
    buffer_len: u32,
    next_unique: u64,
    max_write: u32,
    timeout: Duration,
}

impl<'a, B: MmioBus, M: GuestMemory, I: Interrupts> FsDriver<'a, B, M, I> {
    /// Initialises the device at `base` with the high-priority queue and one request queue;
    /// requests and replies carry at most `buffer_len` bytes. Call [`Self::init`] next.
    pub fn new(
        bus: &'a B,
        base: u64,
        mem: &'a M,
        irq: &'a I,
        alloc: &mut GuestAllocator,
        buffer_len: u32,
        timeout: Duration,
    ) -> Result<Self> {
        let spec = DeviceSpec {
            device_id: VIRTIO_ID_FS,
            features: VIRTIO_F_VERSION_1,
            queue_sizes: &[QUEUE_SIZE, QUEUE_SIZE],
        };
        let dev = GenericDevice::new(bus, base, mem, irq, alloc, &spec)?;
        let mut tag = [0u8; TAG_LEN];
        dev.device().read_config_bytes(0, &mut tag)?;
        let end = tag.iter().position(|&b| b == 0).unwrap_or(TAG_LEN);
        let config = FsConfig {
            tag: String::from_utf8_lossy(&tag[..end]).into_owned(),
            num_request_queues: dev.device().read_config_u32(TAG_LEN as u64),
        };
        let request = alloc.alloc(u64::from(buffer_len), 64)?;
        let reply = alloc.alloc(u64::from(buffer_len), 64)?;
        Ok(Self {
            dev,
            mem,
            config,
            request,
            reply,
            buffer_len,
            next_unique: 1,
            max_write: 0,
            timeout,
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The device underneath, for status and interrupts.
    pub fn device(&mut self) -> &mut GenericDevice<'a, B, M, I> {
        &mut self.dev
    }

    /// Writes a FUSE in-header and `args` into the request buffer; returns its length.
    fn put_request(&mut self, opcode: u32, nodeid: u64, args: &[&[u8]]) -> Result<(u32, u64)> {
        let args_len: usize = args.iter().map(|a| a.len()).sum();
        let len = IN_HEADER_LEN + args_len;
        if len > self.buffer_len as usize {
            return Err(DriverError::RequestTooLarge {
                len,
                max: self.buffer_len as usize,
            });
        }
        let unique = self.next_unique;
        self.next_unique += 1;
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(&(len as u32).to_le_bytes());
        bytes.extend_from_slice(&opcode.to_le_bytes());
        bytes.extend_from_slice(&unique.to_le_bytes());
        bytes.extend_from_slice(&nodeid.to_le_bytes());
        // uid, gid and pid of a root process; total_extlen and padding.
        bytes.extend_from_slice(&[0u8; 16]);
        for arg in args {
            bytes.extend_from_slice(arg);
        }
        self.mem.write(self.request, &bytes);
        Ok((len as u32, unique))
    }

    /// Sends one request with room for `reply_len` bytes of reply; returns the reply body.
    /// A negative `error` in the out-header becomes [`DriverError::Fuse`].
    fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: usize,
    ) -> Result<Vec<u8>> {
        let room = OUT_HEADER_LEN + reply_len;
        if room > self.buffer_len as usize {
            return Err(DriverError::RequestTooLarge {
                len: room,
                max: self.buffer_len as usize,
            });
        }
        let (len, unique) = self.put_request(opcode, nodeid, args)?;
        self.dev.add(
            REQUEST_QUEUE,
            &[
                BufferSegment::readable(self.request, len),
                BufferSegment::writable(self.reply, room as u32),
            ],
        )?;
        self.dev.kick(REQUEST_QUEUE)?;
        let used = self.dev.wait_used(REQUEST_QUEUE, self.timeout)?;
        let mut bytes = vec![0u8; used.len as usize];
        self.mem.read(self.reply, &mut bytes);
        let header = bytes
            .get(..OUT_HEADER_LEN)
            .ok_or(DriverError::MalformedReply(
                "FUSE reply shorter than its header",
            ))?;
        let out_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let error = i32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let reply_unique = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if reply_unique != unique {
            return Err(DriverError::MalformedReply(
                "FUSE reply for another request",
            ));
        }
        if out_len < OUT_HEADER_LEN || out_len > bytes.len() {
            return Err(DriverError::MalformedReply(
                "FUSE reply length disagrees with the used length",
            ));
        }
        if error != 0 {
            return Err(DriverError::Fuse(error.saturating_neg()));
        }
        Ok(bytes[OUT_HEADER_LEN..out_len].to_vec())
    }

    /// FUSE_INIT, asking for no optional capability.
    pub fn init(&mut self) -> Result<InitReply> {
        let mut args = Vec::new();
        for field in [FUSE_MAJOR, FUSE_MINOR, 0, 0] {
            args.extend_from_slice(&field.to_le_bytes());
        }
        let body = self.call(opcode::INIT, 0, &[&args], INIT_OUT_LEN)?;
        if body.len() < 24 {
            return Err(DriverError::MalformedReply("short FUSE_INIT reply"));
        }
        let reply = InitReply {
            major: le32(&body, 0),
            minor: le32(&body, 4),
            max_write: le32(&body, 20),
        };
        if reply.major != FUSE_MAJOR {
            return Err(DriverError::MalformedReply("FUSE major version mismatch"));
        }
        self.max_write = reply.max_write;
        Ok(reply)
    }

    /// FUSE_LOOKUP of `name` in directory `parent`.
    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<Entry> {
        let body = self.call(
            opcode::LOOKUP,
            parent,
            &[name.as_bytes(), &[0]],
            ENTRY_OUT_LEN,
        )?;
        parse_entry(&body)
    }

    /// FUSE_OPEN of `nodeid` with open(2) `flags`; returns the file handle.
    pub fn open(&mut self, nodeid: u64, flags: u32) -> Result<u64> {
        let mut args = flags.to_le_bytes().to_vec();
        args.extend_from_slice(&0u32.to_le_bytes());
        let body = self.call(opcode::OPEN, nodeid, &[&args], OPEN_OUT_LEN)?;
        parse_fh(&body)
    }

    /// FUSE_CREATE of `name` in `parent`, opened with `flags`; returns the entry and handle.
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: u32,
        mode: u32,
    ) -> Result<(Entry, u64)> {
        let mut args = Vec::new();
        for field in [flags, mode, 0o022, 0] {
            args.extend_from_slice(&field.to_le_bytes());
        }
        let body = self.call(
            opcode::CREATE,
            parent,
            &[&args, name.as_bytes(), &[0]],
            ENTRY_OUT_LEN + OPEN_OUT_LEN,
        )?;
        let entry = parse_entry(&body)?;
        let fh = parse_fh(body.get(ENTRY_OUT_LEN..).unwrap_or(&[]))?;
        Ok((entry, fh))
    }

    /// FUSE_READ of up to `size` bytes at `offset`.
    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let args = io_args(fh, offset, size);
        self.call(opcode::READ, nodeid, &[&args], size as usize)
    }

    /// FUSE_WRITE of `data` at `offset`; returns the bytes written.
    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        if self.max_write != 0 && data.len() > self.max_write as usize {
            return Err(DriverError::RequestTooLarge {
                len: data.len(),
                max: self.max_write as usize,
            });
        }
        let args = io_args(fh, offset, data.len() as u32);
        let body = self.call(opcode::WRITE, nodeid, &[&args, data], 8)?;
        if body.len() < 4 {
            return Err(DriverError::MalformedReply("short FUSE_WRITE reply"));
        }
        Ok(le32(&body, 0))
    }

    /// FUSE_RELEASE of a handle opened with `flags`.
    pub fn release(&mut self, nodeid: u64, fh: u64, flags: u32) -> Result<()> {
        let mut args = fh.to_le_bytes().to_vec();
        args.extend_from_slice(&flags.to_le_bytes());
        args.extend_from_slice(&[0u8; 12]); // release_flags, lock_owner
        self.call(opcode::RELEASE, nodeid, &[&args], 0)?;
        Ok(())
    }

    /// FUSE_FORGET of `nlookup` lookups of `nodeid`, on the high-priority queue. It has no
    /// reply; the device hands the buffer back with nothing written.
    pub fn forget(&mut self, nodeid: u64, nlookup: u64) -> Result<()> {
        let (len, _) = self.put_request(opcode::FORGET, nodeid, &[&nlookup.to_le_bytes()])?;
        self.dev
            .add(HIPRIO_QUEUE, &[BufferSegment::readable(self.request, len)])?;
        self.dev.kick(HIPRIO_QUEUE)?;
        let used = self.dev.wait_used(HIPRIO_QUEUE, self.timeout)?;
        if used.len != 0 {
            return Err(DriverError::MalformedReply("FORGET got a reply"));
        }
        Ok(())
    }
}

fn le32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

fn le64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}

/// `fuse_read_in` / `fuse_write_in`: fh, offset, size, flags, lock_owner, flags, padding.
fn io_args(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut args = Vec::with_capacity(40);
    args.extend_from_slice(&fh.to_le_bytes());
    args.extend_from_slice(&offset.to_le_bytes());
    args.extend_from_slice(&size.to_le_bytes());
    args.extend_from_slice(&[0u8; 20]);
    args
}

fn parse_entry(body: &[u8]) -> Result<Entry> {
    if body.len() < ENTRY_OUT_LEN {
        return Err(DriverError::MalformedReply("short fuse_entry_out"));
    }
    Ok(Entry {
        nodeid: le64(body, 0),
        ino: le64(body, ATTR_OFFSET),
        size: le64(body, ATTR_OFFSET + 8),
        mode: le32(body, ATTR_OFFSET + 60),
    })
}

fn parse_fh(body: &[u8]) -> Result<u64> {
    if body.len() < OPEN_OUT_LEN {
        return Err(DriverError::MalformedReply("short fuse_open_out"));
    }
    Ok(le64(body, 0))
}
