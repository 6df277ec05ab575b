//! A minimal vhost-user frontend plus "guest driver" for exercising the backend without a VM.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

pub const QUEUE_SIZE: u16 = 256;
pub const GUEST_SIZE: usize = 0x10_0000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// How long a test waits for the backend before declaring it stuck.
const COMPLETION_TIMEOUT_MS: i32 = 10_000;

/// A unique socket path for this test process, computed at run time.
pub fn socket_path(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "vhost-user-blk-{tag}-{}-{n}.sock",
        std::process::id()
    ))
}

/// Shared guest RAM, a virtqueue in it, and the eventfds the backend uses.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    _backing: TempFile,
    pub kick: EventFd,
    pub call: EventFd,
    next_desc: u16,
    avail_idx: u16,
}

impl Guest {
    pub fn new() -> Self {
        let backing = TempFile::new().unwrap();
        backing.as_file().set_len(GUEST_SIZE as u64).unwrap();
        let file = backing.as_file().try_clone().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            GUEST_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        Guest {
            mem,
            _backing: backing,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn host_address(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// Connects, negotiates and returns the frontend plus the features the backend offered.
    pub fn negotiate(path: &Path) -> (Frontend, u64) {
        let mut frontend = Frontend::connect(path, 1).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let offered = frontend.get_protocol_features().unwrap();
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        assert!(offered.contains(wanted), "{offered:?}");
        frontend.set_protocol_features(wanted).unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        (frontend, features)
    }

    /// Reads `len` bytes of configuration space.
    pub fn config(frontend: &mut Frontend, offset: u32, len: u32) -> Vec<u8> {
        let (_, data) = frontend
            .get_config(
                offset,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0; len as usize],
            )
            .unwrap();
        data
    }

    /// Sends features, the memory table and queue 0, as a frontend does on DRIVER_OK.
    pub fn activate(&self, frontend: &mut Frontend, features: u64) {
        frontend.set_features(features).unwrap();
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        let regions = [VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()];
        frontend.set_mem_table(&regions).unwrap();
        frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        let rings = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.host_address(DESC_TABLE),
            used_ring_addr: self.host_address(USED_RING),
            avail_ring_addr: self.host_address(AVAIL_RING),
            log_addr: None,
        };
        frontend.set_vring_addr(0, &rings).unwrap();
        frontend.set_vring_base(0, 0).unwrap();
        frontend.set_vring_call(0, &self.call).unwrap();
        frontend.set_vring_kick(0, &self.kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
    }

    /// Queues a chain of `(guest address, length, device-writable)` buffers and kicks.
    pub fn submit(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_SIZE;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = Descriptor::new(addr, len, flags, (index + 1) % QUEUE_SIZE);
            self.mem
                .write_obj(
                    RawDescriptor::from(desc),
                    GuestAddress(DESC_TABLE + 16 * u64::from(index)),
                )
                .unwrap();
        }
        self.next_desc = (head + buffers.len() as u16) % QUEUE_SIZE;
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        // Ask for an interrupt for the next completion (EVENT_IDX used_event).
        let used_event = AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem
            .write_obj(self.used_idx(), GuestAddress(used_event))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
        self.kick.write(1).unwrap();
        head
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// The `(id, len)` of used-ring entry `index`.
    pub fn used_elem(&self, index: u16) -> (u32, u32) {
        let elem = GuestAddress(USED_RING + 4 + 8 * u64::from(index % QUEUE_SIZE));
        (
            self.mem.read_obj(elem).unwrap(),
            self.mem.read_obj(elem.unchecked_add(4)).unwrap(),
        )
    }

    /// Waits for call notifications until the used index reaches `idx`.
    pub fn wait_used(&self, idx: u16) {
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                self.call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let mut events = [EpollEvent::default(); 1];
        while self.used_idx() != idx {
            let ready = epoll.wait(COMPLETION_TIMEOUT_MS, &mut events).unwrap();
            assert_eq!(ready, 1, "no completion within {COMPLETION_TIMEOUT_MS} ms");
            self.call.read().unwrap();
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    pub fn write_header(&self, addr: u64, request_type: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(addr, &raw);
    }
}
