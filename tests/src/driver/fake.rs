//! An in-test virtio-mmio block device over a `Vec<u8>` guest RAM. It records every register
//! access, serves a RAM disk through the split ring synchronously on QueueNotify (or later, on
//! [`FakeBlk::release`]) and can be told to misbehave.

use std::cell::{RefCell, RefMut};
use std::ops::Range;
use std::time::Duration;

use super::blk::{feature, request_type};
use super::mmio::{reg, status, INTERRUPT_CONFIG, INTERRUPT_VRING, MAGIC_VALUE};
use super::virtqueue::{
    vring_need_event, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use super::{GuestMemory, Interrupts, MmioBus};

pub const RAM_BASE: u64 = 0x4000_0000;
pub const RAM_SIZE: usize = 16 << 20;
pub const MMIO_BASE: u64 = 0x0a00_0000;

/// Guest RAM at `base`. Out-of-range driver accesses panic: in a test they are driver bugs.
#[derive(Debug)]
pub struct VecMemory {
    base: u64,
    bytes: RefCell<Vec<u8>>,
}

impl VecMemory {
    pub fn new(base: u64, len: usize) -> Self {
        Self {
            base,
            bytes: RefCell::new(vec![0; len]),
        }
    }

    fn range(&self, gpa: u64, len: usize) -> Option<Range<usize>> {
        let start = usize::try_from(gpa.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.bytes.borrow().len()).then_some(start..end)
    }

    /// The device's view: false when the range is outside RAM.
    pub fn try_read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(range) = self.range(gpa, buf.len()) else {
            return false;
        };
        buf.copy_from_slice(&self.bytes.borrow()[range]);
        true
    }

    pub fn try_write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some(range) = self.range(gpa, data.len()) else {
            return false;
        };
        self.bytes.borrow_mut()[range].copy_from_slice(data);
        true
    }

    pub fn fill(&self, byte: u8) {
        self.bytes.borrow_mut().fill(byte);
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        let mut bytes = [0; 2];
        self.read(gpa, &mut bytes);
        u16::from_le_bytes(bytes)
    }

    pub fn write_u16(&self, gpa: u64, value: u16) {
        self.write(gpa, &value.to_le_bytes());
    }

    /// (addr, len, flags, next) of the descriptor at `gpa`.
    pub fn read_desc(&self, gpa: u64) -> (u64, u32, u16, u16) {
        let mut bytes = [0u8; 16];
        self.read(gpa, &mut bytes);
        (
            u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            u16::from_le_bytes([bytes[12], bytes[13]]),
            u16::from_le_bytes([bytes[14], bytes[15]]),
        )
    }
}

impl GuestMemory for VecMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) {
        assert!(
            self.try_read(gpa, buf),
            "driver read outside RAM at {gpa:#x}"
        );
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        assert!(
            self.try_write(gpa, data),
            "driver write outside RAM at {gpa:#x}"
        );
    }
}

/// One register access as the device saw it (offsets relative to the window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read { offset: u64, size: u8 },
    Write { offset: u64, size: u8, value: u64 },
}

#[derive(Clone, Copy, Debug, Default)]
pub struct FakeQueue {
    pub num_max: u32,
    pub num: u32,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub last_avail: u16,
    pub used_idx: u16,
}

/// Everything a test may inspect or change.
#[derive(Debug)]
pub struct DeviceState {
    pub device_id: u32,
    pub version: u32,
    pub offered: u64,
    pub acked: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub status: u32,
    /// Drop FEATURES_OK when the driver sets it.
    pub refuse_features: bool,
    pub queue_sel: u32,
    pub queues: Vec<FakeQueue>,
    pub interrupt_status: u32,
    /// Interrupt deliveries not yet consumed by `Interrupts::wait`.
    pub deliveries: u32,
    /// Raise this many more interrupts without delivering them (a lost interrupt).
    pub swallow_deliveries: u32,
    /// Completions the driver reported through `Interrupts::lost`.
    pub reported_lost: u64,
    pub config: Vec<u8>,
    pub generation: u32,
    /// Bump the generation on this many more ConfigGeneration reads.
    pub generation_churn: u32,
    pub accesses: Vec<Access>,
    pub notifies: u32,
    /// Leave the rings alone on QueueNotify until `release`.
    pub hold: bool,
    pub disk: Vec<u8>,
    pub serial: Vec<u8>,
    /// Report this id in the used ring instead of the real head.
    pub bad_used_id: Option<u32>,
    /// Added to every used length.
    pub used_len_bonus: u32,
    pub longest_chain: usize,
    pub longest_segment: u32,
    pub indirect_chains: u32,
}

/// The fake device; it is also the guest's RAM and interrupt line.
#[derive(Debug)]
pub struct FakeBlk {
    pub ram: VecMemory,
    state: RefCell<DeviceState>,
}

pub const FAKE_SERIAL: &str = "fake-blk-serial";

impl FakeBlk {
    /// A block device of `sectors` sectors offering `offered` features.
    pub fn new(sectors: u64, offered: u64) -> Self {
        let mut config = vec![0u8; 64];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
        config[12..16].copy_from_slice(&128u32.to_le_bytes());
        config[20..24].copy_from_slice(&512u32.to_le_bytes());
        config[34..36].copy_from_slice(&2u16.to_le_bytes());
        Self {
            ram: VecMemory::new(RAM_BASE, RAM_SIZE),
            state: RefCell::new(DeviceState {
                device_id: 2,
                version: 2,
                offered,
                acked: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                status: 0,
                refuse_features: false,
                queue_sel: 0,
                queues: vec![
                    FakeQueue {
                        num_max: 256,
                        ..FakeQueue::default()
                    };
                    2
                ],
                interrupt_status: 0,
                deliveries: 0,
                swallow_deliveries: 0,
                reported_lost: 0,
                config,
                generation: 0,
                generation_churn: 0,
                accesses: Vec::new(),
                notifies: 0,
                hold: false,
                disk: vec![0; usize::try_from(sectors).unwrap() * 512],
                serial: FAKE_SERIAL.as_bytes().to_vec(),
                bad_used_id: None,
                used_len_bonus: 0,
                longest_chain: 0,
                longest_segment: 0,
                indirect_chains: 0,
            }),
        }
    }

    pub fn state(&self) -> RefMut<'_, DeviceState> {
        self.state.borrow_mut()
    }

    pub fn set_config_u32(&self, offset: usize, value: u32) {
        self.state().config[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// Serves every queue now (after `hold`).
    pub fn release(&self) {
        let mut state = self.state();
        state.hold = false;
        for queue in 0..state.queues.len() {
            state.process(&self.ram, queue);
        }
    }

    /// Sets DEVICE_NEEDS_RESET and raises a config interrupt.
    pub fn fail_device(&self) {
        let mut state = self.state();
        state.status |= status::DEVICE_NEEDS_RESET;
        state.raise(INTERRUPT_CONFIG);
    }

    pub fn take_accesses(&self) -> Vec<Access> {
        std::mem::take(&mut self.state().accesses)
    }
}

impl DeviceState {
    fn raise(&mut self, bits: u32) {
        // A level line: one delivery per rising edge, as the bridge coalesces.
        if self.interrupt_status == 0 {
            if self.swallow_deliveries > 0 {
                self.swallow_deliveries -= 1;
            } else {
                self.deliveries += 1;
            }
        }
        self.interrupt_status |= bits;
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked = 0;
        self.interrupt_status = 0;
        for queue in &mut self.queues {
            *queue = FakeQueue {
                num_max: queue.num_max,
                ..FakeQueue::default()
            };
        }
    }

    fn read_register(&mut self, offset: u64, size: u8) -> u64 {
        if offset >= reg::CONFIG {
            let start = usize::try_from(offset - reg::CONFIG).unwrap_or(usize::MAX);
            let mut bytes = [0u8; 8];
            for (index, byte) in bytes.iter_mut().take(usize::from(size)).enumerate() {
                *byte = start
                    .checked_add(index)
                    .and_then(|at| self.config.get(at))
                    .copied()
                    .unwrap_or(0);
            }
            return u64::from_le_bytes(bytes);
        }
        let queue = self.queues.get(self.queue_sel as usize).copied();
        let value = match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => self.version,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => 0x454b_4146,
            reg::DEVICE_FEATURES => (self.offered >> (32 * self.device_features_sel.min(1))) as u32,
            reg::QUEUE_NUM_MAX => queue.map_or(0, |queue| queue.num_max),
            reg::QUEUE_READY => queue.map_or(0, |queue| u32::from(queue.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => {
                if self.generation_churn > 0 {
                    self.generation_churn -= 1;
                    self.generation += 1;
                }
                self.generation
            }
            _ => 0,
        };
        u64::from(value)
    }

    fn write_register(&mut self, ram: &VecMemory, offset: u64, value: u64) {
        let value32 = value as u32;
        let selected = self.queue_sel as usize;
        let set_half = |target: &mut u64, high: bool| {
            let shift = if high { 32 } else { 0 };
            *target = (*target & !(0xffff_ffffu64 << shift)) | (u64::from(value32) << shift);
        };
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value32,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value32,
            reg::DRIVER_FEATURES => {
                let high = self.driver_features_sel == 1;
                set_half(&mut self.acked, high);
            }
            reg::QUEUE_SEL => self.queue_sel = value32,
            reg::INTERRUPT_ACK => self.interrupt_status &= !value32,
            reg::STATUS if value32 == 0 => self.reset(),
            reg::STATUS => {
                let mut new = value32;
                if self.refuse_features {
                    new &= !status::FEATURES_OK;
                }
                self.status = new;
            }
            reg::QUEUE_NOTIFY => {
                self.notifies += 1;
                if !self.hold {
                    self.process(ram, value32 as usize);
                }
            }
            _ => {
                let Some(queue) = self.queues.get_mut(selected) else {
                    return;
                };
                match offset {
                    reg::QUEUE_NUM => queue.num = value32,
                    reg::QUEUE_READY => queue.ready = value32 == 1,
                    reg::QUEUE_DESC_LOW => set_half(&mut queue.desc, false),
                    reg::QUEUE_DESC_HIGH => set_half(&mut queue.desc, true),
                    reg::QUEUE_DRIVER_LOW => set_half(&mut queue.driver, false),
                    reg::QUEUE_DRIVER_HIGH => set_half(&mut queue.driver, true),
                    reg::QUEUE_DEVICE_LOW => set_half(&mut queue.device, false),
                    reg::QUEUE_DEVICE_HIGH => set_half(&mut queue.device, true),
                    _ => {}
                }
            }
        }
    }

    fn process(&mut self, ram: &VecMemory, queue_index: usize) {
        let Some(mut queue) = self.queues.get(queue_index).copied() else {
            return;
        };
        if !queue.ready || queue.num == 0 {
            return;
        }
        let num = queue.num as u16;
        let old_used = queue.used_idx;
        let avail_idx = ram.read_u16(queue.driver + 2);
        while queue.last_avail != avail_idx {
            let slot = u64::from(queue.last_avail % num);
            let head = ram.read_u16(queue.driver + 4 + 2 * slot);
            queue.last_avail = queue.last_avail.wrapping_add(1);
            let written = self.execute(ram, &queue, head);
            let used_slot = u64::from(queue.used_idx % num);
            let id = self.bad_used_id.unwrap_or(u32::from(head));
            let len = written.wrapping_add(self.used_len_bonus);
            ram.write(queue.device + 4 + 8 * used_slot, &id.to_le_bytes());
            ram.write(queue.device + 8 + 8 * used_slot, &len.to_le_bytes());
            queue.used_idx = queue.used_idx.wrapping_add(1);
            ram.write_u16(queue.device + 2, queue.used_idx);
        }
        let event_idx = self.acked & VIRTIO_F_EVENT_IDX != 0;
        if event_idx {
            ram.write_u16(queue.device + 4 + 8 * u64::from(num), queue.last_avail);
        }
        self.queues[queue_index] = queue;
        if queue.used_idx == old_used {
            return;
        }
        let wants_interrupt = if event_idx {
            let used_event = ram.read_u16(queue.driver + 4 + 2 * u64::from(num));
            vring_need_event(used_event, queue.used_idx, old_used)
        } else {
            ram.read_u16(queue.driver) & 1 == 0
        };
        if wants_interrupt {
            self.raise(INTERRUPT_VRING);
        }
    }

    /// Follows the chain at `head` (with a loop guard) and returns its descriptors.
    fn walk_chain(&mut self, ram: &VecMemory, queue: &FakeQueue, head: u16) -> Option<Vec<Desc>> {
        let num = queue.num as u16;
        if head >= num {
            return None;
        }
        let first = read_desc(ram, queue.desc + 16 * u64::from(head))?;
        let (table, entries, mut index) = if first.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if self.acked & VIRTIO_F_INDIRECT_DESC == 0 || first.len % 16 != 0 {
                return None;
            }
            self.indirect_chains += 1;
            (first.addr, (first.len / 16) as u16, 0)
        } else {
            (queue.desc, num, head)
        };
        let mut chain = Vec::new();
        loop {
            if index >= entries || chain.len() >= usize::from(entries) {
                return None;
            }
            let desc = read_desc(ram, table + 16 * u64::from(index))?;
            chain.push(desc);
            if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            index = desc.next;
        }
        self.longest_chain = self.longest_chain.max(chain.len());
        Some(chain)
    }

    /// Serves one request; returns the bytes written into the chain.
    fn execute(&mut self, ram: &VecMemory, queue: &FakeQueue, head: u16) -> u32 {
        let Some(chain) = self.walk_chain(ram, queue, head) else {
            return 0;
        };
        let (Some(header_desc), Some(status_desc)) = (chain.first(), chain.last()) else {
            return 0;
        };
        if chain.len() < 2 || status_desc.flags & VIRTQ_DESC_F_WRITE == 0 || status_desc.len < 1 {
            return 0;
        }
        let mut header = [0u8; 16];
        if header_desc.len < 16 || !ram.try_read(header_desc.addr, &mut header) {
            return 0;
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data = &chain[1..chain.len() - 1];
        for desc in data {
            self.longest_segment = self.longest_segment.max(desc.len);
        }
        let mut written = 0u32;
        let status = match kind {
            request_type::IN | request_type::OUT => {
                let to_guest = kind == request_type::IN;
                let mut offset = sector
                    .checked_mul(512)
                    .and_then(|o| usize::try_from(o).ok());
                let mut ok = true;
                for desc in data {
                    let len = desc.len as usize;
                    let range = offset.and_then(|start| {
                        let end = start.checked_add(len)?;
                        (end <= self.disk.len()).then_some(start..end)
                    });
                    let writable = desc.flags & VIRTQ_DESC_F_WRITE != 0;
                    let Some(range) = range.filter(|_| writable == to_guest) else {
                        ok = false;
                        break;
                    };
                    ok = if to_guest {
                        written += desc.len;
                        ram.try_write(desc.addr, &self.disk[range.clone()])
                    } else {
                        ram.try_read(desc.addr, &mut self.disk[range.clone()])
                    };
                    if !ok {
                        break;
                    }
                    offset = Some(range.end);
                }
                if ok {
                    0
                } else {
                    1
                }
            }
            request_type::FLUSH if self.acked & feature::FLUSH != 0 => 0,
            request_type::GET_ID => match data.first() {
                Some(desc) if desc.len >= 20 => {
                    let mut id = [0u8; 20];
                    id[..self.serial.len()].copy_from_slice(&self.serial);
                    ram.try_write(desc.addr, &id);
                    written += 20;
                    0
                }
                _ => 1,
            },
            request_type::WRITE_ZEROES | request_type::DISCARD => {
                let mut range = [0u8; 16];
                match data.first() {
                    Some(desc) if ram.try_read(desc.addr, &mut range) => {
                        let start = u64::from_le_bytes(range[0..8].try_into().unwrap());
                        let sectors = u32::from_le_bytes(range[8..12].try_into().unwrap());
                        let bytes =
                            (start * 512) as usize..((start + u64::from(sectors)) * 512) as usize;
                        match self.disk.get_mut(bytes) {
                            Some(bytes) => {
                                bytes.fill(0);
                                0
                            }
                            None => 1,
                        }
                    }
                    _ => 1,
                }
            }
            _ => 2,
        };
        ram.try_write(status_desc.addr, &[status]);
        written + 1
    }
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(ram: &VecMemory, gpa: u64) -> Option<Desc> {
    let mut bytes = [0u8; 16];
    if !ram.try_read(gpa, &mut bytes) {
        return None;
    }
    Some(Desc {
        addr: u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
        len: u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        flags: u16::from_le_bytes([bytes[12], bytes[13]]),
        next: u16::from_le_bytes([bytes[14], bytes[15]]),
    })
}

impl MmioBus for FakeBlk {
    fn read(&self, addr: u64, size: u8) -> u64 {
        let offset = addr.wrapping_sub(MMIO_BASE);
        let mut state = self.state();
        state.accesses.push(Access::Read { offset, size });
        state.read_register(offset, size)
    }

    fn write(&self, addr: u64, size: u8, value: u64) {
        let offset = addr.wrapping_sub(MMIO_BASE);
        let mut state = self.state();
        state.accesses.push(Access::Write {
            offset,
            size,
            value,
        });
        state.write_register(&self.ram, offset, value);
    }
}

impl GuestMemory for FakeBlk {
    fn read(&self, gpa: u64, buf: &mut [u8]) {
        self.ram.read(gpa, buf);
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.ram.write(gpa, data);
    }
}

impl Interrupts for FakeBlk {
    fn wait(&self, _timeout: Duration) -> bool {
        // Deliveries only come from register writes on this thread, so none can arrive while
        // waiting: answer at once.
        let mut state = self.state();
        if state.deliveries == 0 {
            return false;
        }
        state.deliveries -= 1;
        true
    }

    fn lost(&self, completions: u64) {
        self.state().reported_lost += completions;
    }
}
