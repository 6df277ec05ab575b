//! Fuzz-style property test of the virtio-mmio transport: arbitrary sequences of guest
//! register and config-space accesses (any offset, width and value, reads and writes) mixed
//! with device-side events, against a randomly shaped mock backend.
//!
//! After every access it checks that nothing panicked, that reads are masked to their width,
//! the status invariants, that acked features stay within what was offered, and that the
//! backend sees a valid activation at most once per reset and no notify before it.
//! `HVV_FUZZ_ITERS` and `HVV_FUZZ_SEED` control the run (see `fuzz_support`).

mod fuzz_support;

use fuzz_support::Rng;
use hvisor_bridge::transport::{BackendError, MmioTransport, QueueConfig, VirtioBackend};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_GUEST_PAGE_SIZE, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_ALIGN, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_PFN, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};

/// Executions in the bounded CI pass: about 15 s in a release build on the CI machine.
const CI_EXECUTIONS: u64 = 2_500_000;

const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const KNOWN_STATUS: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET | FAILED;
/// The driver's initialization bits, in the order it sets them.
const INIT_SEQUENCE: [u32; 4] = [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK];

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const NOTIFICATION_DATA: u64 = 1 << VIRTIO_F_NOTIFICATION_DATA;
/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user link bit that a guest must never see.
const PROTOCOL_FEATURES: u64 = 1 << 30;
const RING_RESET: u64 = 1 << VIRTIO_F_RING_RESET;
/// Bits the transport must never offer: it cannot do per-queue reset.
const NEVER_OFFERED: u64 = PROTOCOL_FEATURES | RING_RESET;

const CONFIG_SPACE: u64 = 0x100;
const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x4856_4953;
const DEVICE_ID: u32 = 2;
const INTERRUPT_BITS: u32 = 0b11;

/// Every register of the v2 layout plus the legacy and QueueReset ones.
const REGISTERS: [u32; 33] = [
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_GUEST_PAGE_SIZE,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_ALIGN,
    VIRTIO_MMIO_QUEUE_PFN,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_SHM_SEL,
    VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_SHM_BASE_HIGH,
    0x0c0, // QueueReset
    VIRTIO_MMIO_CONFIG_GENERATION,
    0x0f8, // unassigned
];

/// A backend of random shape that asserts the contract the transport promises it.
#[derive(Debug)]
struct FuzzBackend {
    features: u64,
    queue_max: Vec<u16>,
    config: Vec<u8>,
    refuse_activation: bool,
    refuse_reset: bool,
    refuse_config_write: bool,
    /// Set by `activate` and cleared by `reset`: at most one activation per reset.
    activate_called: bool,
    /// The queues of the activation that succeeded, until the next reset.
    active_queues: Option<Vec<QueueConfig>>,
    activations: u64,
    notifies: u64,
}

impl FuzzBackend {
    fn random(rng: &mut Rng) -> Self {
        let mut features = rng.next_u64() & rng.next_u64();
        if !rng.one_in(8) {
            features |= VERSION_1;
        }
        for bit in [PROTOCOL_FEATURES, RING_RESET, NOTIFICATION_DATA] {
            if rng.coin() {
                features |= bit;
            }
        }
        const MAX_SIZES: [u16; 10] = [0, 1, 2, 3, 16, 100, 256, 1024, 32768, 65535];
        let queue_max = (0..rng.below(5)).map(|_| *rng.pick(&MAX_SIZES)).collect();
        const CONFIG_LENS: [usize; 8] = [0, 1, 3, 8, 20, 60, 136, 256];
        let config = (0..*rng.pick(&CONFIG_LENS))
            .map(|_| rng.next_u32() as u8)
            .collect();
        FuzzBackend {
            features,
            queue_max,
            config,
            refuse_activation: rng.one_in(8),
            refuse_reset: rng.one_in(8),
            refuse_config_write: rng.one_in(8),
            activate_called: false,
            active_queues: None,
            activations: 0,
            notifies: 0,
        }
    }

    /// The features the guest may see and ack.
    fn visible_features(&self) -> u64 {
        self.features & !NEVER_OFFERED
    }
}

impl VirtioBackend for FuzzBackend {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn num_queues(&self) -> u16 {
        self.queue_max.len() as u16
    }

    fn queue_max_size(&self, queue: u16) -> u16 {
        self.queue_max.get(usize::from(queue)).copied().unwrap_or(0)
    }

    fn config_len(&self) -> usize {
        self.config.len()
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let source = offset
            .checked_add(data.len())
            .and_then(|end| self.config.get(offset..end))
            .unwrap_or_else(|| panic!("config read of {} at {offset} out of bounds", data.len()));
        data.copy_from_slice(source);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        let len = self.config.len();
        let target = offset
            .checked_add(data.len())
            .and_then(|end| self.config.get_mut(offset..end))
            .unwrap_or_else(|| panic!("config write of {} at {offset} past {len}", data.len()));
        if self.refuse_config_write {
            return Err(BackendError::new("config is read-only"));
        }
        target.copy_from_slice(data);
        Ok(())
    }

    fn activate(&mut self, acked: u64, queues: &[QueueConfig]) -> Result<(), BackendError> {
        assert!(!self.activate_called, "second activation without a reset");
        self.activate_called = true;
        self.activations += 1;
        assert_eq!(
            acked & !self.visible_features(),
            0,
            "activated with features that were not offered"
        );
        assert_ne!(acked & VERSION_1, 0, "activated without VERSION_1");
        assert_eq!(queues.len(), self.queue_max.len(), "queue count");
        for (index, queue) in queues.iter().enumerate() {
            assert_eq!(usize::from(queue.index), index, "queue order");
            if queue.ready {
                assert!(
                    queue.size.is_power_of_two() && queue.size <= self.queue_max[index],
                    "activated queue {index} with size {} (max {})",
                    queue.size,
                    self.queue_max[index]
                );
                assert_eq!(queue.desc % 16, 0, "descriptor table alignment");
                assert_eq!(queue.driver % 2, 0, "driver area alignment");
                assert_eq!(queue.device % 4, 0, "device area alignment");
            }
        }
        if self.refuse_activation {
            return Err(BackendError::new("refused"));
        }
        self.active_queues = Some(queues.to_vec());
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BackendError> {
        self.activate_called = false;
        self.active_queues = None;
        if self.refuse_reset {
            return Err(BackendError::new("reset failed"));
        }
        Ok(())
    }

    fn notify(&mut self, queue: u16) {
        let active = self
            .active_queues
            .as_ref()
            .unwrap_or_else(|| panic!("notify of queue {queue} before activation"));
        let started = active
            .get(usize::from(queue))
            .unwrap_or_else(|| panic!("notify of nonexistent queue {queue}"));
        assert!(
            started.ready,
            "notify of queue {queue}, not ready at activation"
        );
        self.notifies += 1;
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read { offset: u64, size: u8 },
    Write { offset: u64, size: u8, value: u64 },
    UsedBuffer,
    ConfigChange,
    Fail,
    LineAsserted,
}

/// Prints the access sequence when an assertion fails, so the failure reads without a replay.
struct TraceOnPanic<'a>(&'a [Op]);

impl Drop for TraceOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("accesses up to the failure ({}):", self.0.len());
            for (i, op) in self.0.iter().enumerate() {
                eprintln!("  {i:3}: {op:x?}");
            }
        }
    }
}

/// What the driver last selected, to know what a register access means.
#[derive(Debug, Default)]
struct DriverView {
    device_features_sel: u32,
    queue_sel: u32,
}

fn width_mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        8 => u64::MAX,
        _ => 0,
    }
}

fn register(offset: u32) -> u64 {
    u64::from(offset)
}

fn write32(offset: u32, value: u32) -> Op {
    Op::Write {
        offset: register(offset),
        size: 4,
        value: u64::from(value),
    }
}

/// An access size: usually a legal one, sometimes anything.
fn access_size(rng: &mut Rng) -> u8 {
    if rng.one_in(8) {
        rng.next_u32() as u8
    } else {
        *rng.pick(&[1, 2, 4, 8])
    }
}

/// A guest-physical ring address: usually aligned for every ring area, sometimes not.
fn ring_address(rng: &mut Rng) -> u64 {
    let address = rng.interesting_u64();
    if rng.one_in(4) {
        address
    } else {
        address & !0xf
    }
}

/// The next access, drawn with a bias towards the driver's initialization path so that
/// activation, notifies and interrupts are reached often.
fn next_op(rng: &mut Rng, t: &MmioTransport<FuzzBackend>) -> Op {
    let backend = t.backend();
    let queues = u64::from(backend.num_queues());
    match rng.below(20) {
        // Add the next initialization bit, as Linux's add_status does.
        0..=3 => {
            let status = t.status();
            let next = INIT_SEQUENCE
                .iter()
                .find(|&&bit| status & bit == 0)
                .copied()
                .unwrap_or(0);
            write32(VIRTIO_MMIO_STATUS, status | next)
        }
        4 => {
            let value = match rng.below(5) {
                0 => 0,
                1 => t.status() | *rng.pick(&[FAILED, NEEDS_RESET]),
                2 => t.status() & !(1 << rng.below(8)),
                3 => rng.next_u32() & KNOWN_STATUS,
                _ => rng.next_u32(),
            };
            write32(VIRTIO_MMIO_STATUS, value)
        }
        // Feature negotiation: select a half, ack offered bits and sometimes others.
        5 => write32(
            VIRTIO_MMIO_DRIVER_FEATURES_SEL,
            if rng.one_in(8) {
                rng.next_u32()
            } else {
                rng.below(2) as u32
            },
        ),
        6 => {
            let offered = backend.features;
            let half = if rng.coin() { offered } else { offered >> 32 };
            let mut value = half as u32;
            if rng.one_in(3) {
                value &= rng.next_u32();
            }
            if rng.one_in(4) {
                value |= rng.next_u32();
            }
            write32(VIRTIO_MMIO_DRIVER_FEATURES, value)
        }
        7 => write32(
            VIRTIO_MMIO_DEVICE_FEATURES_SEL,
            if rng.one_in(8) {
                rng.next_u32()
            } else {
                rng.below(2) as u32
            },
        ),
        // Queue programming.
        8 => write32(
            VIRTIO_MMIO_QUEUE_SEL,
            if rng.one_in(8) {
                rng.next_u32()
            } else {
                rng.below(queues + 1) as u32
            },
        ),
        9 => {
            let max = backend
                .queue_max
                .get(rng.index(backend.queue_max.len().max(1)))
                .copied()
                .unwrap_or(0);
            let value = match rng.below(4) {
                0 => u32::from(max),
                1 => u32::from(max) >> rng.below(16),
                2 => 1 << rng.below(17),
                _ => rng.next_u32(),
            };
            write32(VIRTIO_MMIO_QUEUE_NUM, value)
        }
        10 => {
            let area = *rng.pick(&[
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_USED_LOW,
            ]);
            let address = ring_address(rng);
            if rng.coin() {
                write32(area, address as u32)
            } else {
                write32(area + 4, (address >> 32) as u32)
            }
        }
        11 => write32(
            VIRTIO_MMIO_QUEUE_READY,
            if rng.one_in(8) {
                rng.next_u32()
            } else {
                rng.below(2) as u32
            },
        ),
        12 => {
            let queue = rng.below(queues + 1) as u32;
            let value = match rng.below(4) {
                0 => queue | (rng.next_u32() << 16),
                1 => rng.next_u32(),
                _ => queue,
            };
            write32(VIRTIO_MMIO_QUEUE_NOTIFY, value)
        }
        13 => write32(
            VIRTIO_MMIO_INTERRUPT_ACK,
            if rng.coin() {
                t.interrupt_status()
            } else {
                rng.next_u32()
            },
        ),
        // Config space, within and past its end.
        14 => {
            let offset = CONFIG_SPACE + rng.below(backend.config.len() as u64 + 16);
            let size = access_size(rng);
            if rng.coin() {
                Op::Read { offset, size }
            } else {
                Op::Write {
                    offset,
                    size,
                    value: rng.next_u64(),
                }
            }
        }
        15 => Op::Read {
            offset: register(*rng.pick(&REGISTERS)),
            size: 4,
        },
        // Anything: any offset, width and value.
        16 | 17 => {
            let offset = match rng.below(3) {
                0 => rng.below(0x200),
                1 => rng.interesting_u64(),
                _ => register(*rng.pick(&REGISTERS)) + rng.below(4),
            };
            let size = access_size(rng);
            if rng.coin() {
                Op::Read { offset, size }
            } else {
                Op::Write {
                    offset,
                    size,
                    value: rng.interesting_u64(),
                }
            }
        }
        18 => *rng.pick(&[Op::UsedBuffer, Op::ConfigChange, Op::LineAsserted]),
        _ => {
            if rng.one_in(4) {
                Op::Fail
            } else {
                write32(*rng.pick(&REGISTERS), rng.interesting_u64() as u32)
            }
        }
    }
}

/// The driver's full, valid initialization of every queue, so that most executions reach an
/// activation and then fuzz a running device.
fn linux_init(backend: &FuzzBackend, rng: &mut Rng) -> Vec<Op> {
    let mut ops = vec![
        write32(VIRTIO_MMIO_STATUS, 0),
        write32(VIRTIO_MMIO_STATUS, ACKNOWLEDGE),
        write32(VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER),
    ];
    let wanted = (backend.features & rng.next_u64()) | VERSION_1;
    for half in 0..2 {
        ops.push(write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, half));
        ops.push(write32(
            VIRTIO_MMIO_DRIVER_FEATURES,
            (wanted >> (32 * half)) as u32,
        ));
    }
    ops.push(write32(
        VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    ));
    for (index, &max) in backend.queue_max.iter().enumerate() {
        if max == 0 || rng.one_in(4) {
            continue;
        }
        let size = 1u32 << (31 - u32::from(max).leading_zeros()).min(rng.below(16) as u32);
        let base = (rng.next_u64() & 0xffff_ffff_f000) | 0x1000;
        ops.push(write32(VIRTIO_MMIO_QUEUE_SEL, index as u32));
        ops.push(write32(VIRTIO_MMIO_QUEUE_NUM, size));
        for (low, address) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, base),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x4000),
            (VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x8000),
        ] {
            ops.push(write32(low, address as u32));
            ops.push(write32(low + 4, (address >> 32) as u32));
        }
        ops.push(write32(VIRTIO_MMIO_QUEUE_READY, 1));
    }
    ops.push(write32(
        VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ));
    ops
}

/// Checks what must hold between any two accesses.
fn check_invariants(t: &MmioTransport<FuzzBackend>) {
    let status = t.status();
    let acked = t.acked_features();
    let backend = t.backend();
    assert_eq!(
        status & !KNOWN_STATUS,
        0,
        "unknown status bits in {status:#x}"
    );
    for pair in INIT_SEQUENCE.windows(2) {
        if status & pair[1] != 0 {
            assert_ne!(status & pair[0], 0, "status {status:#x} skipped a step");
        }
    }
    if status & NEEDS_RESET != 0 {
        assert_ne!(status & DRIVER_OK, 0, "DEVICE_NEEDS_RESET before DRIVER_OK");
    }
    if status & FEATURES_OK != 0 {
        assert_ne!(acked & VERSION_1, 0, "FEATURES_OK without VERSION_1");
    }
    assert_eq!(
        acked & !backend.visible_features(),
        0,
        "acked features {acked:#x} beyond those offered"
    );
    assert_eq!(
        t.is_activated(),
        backend.active_queues.is_some(),
        "transport and backend disagree on activation"
    );
    if t.is_activated() {
        assert_ne!(status & DRIVER_OK, 0, "activated without DRIVER_OK");
    }
    let interrupts = t.interrupt_status();
    assert_eq!(
        interrupts & !INTERRUPT_BITS,
        0,
        "InterruptStatus {interrupts:#x}"
    );
    if interrupts != 0 {
        assert_ne!(status & DRIVER_OK, 0, "interrupt pending before DRIVER_OK");
    }
}

/// The bytes a config read must return: config space, then zeroes past its end.
fn expected_config(config: &[u8], offset: u64, size: u8) -> u64 {
    let mut bytes = [0u8; 8];
    for (i, byte) in bytes.iter_mut().take(usize::from(size)).enumerate() {
        let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
        *byte = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
    }
    u64::from_le_bytes(bytes)
}

/// Applies `op` and checks what it must have done.
fn apply(t: &mut MmioTransport<FuzzBackend>, view: &mut DriverView, op: Op) {
    let before_status = t.status();
    let before_acked = t.acked_features();
    let before_activated = t.is_activated();
    let before_line = t.line_asserted();
    let before_activations = t.backend().activations;
    let before_notifies = t.backend().notifies;
    let before_config = t.backend().config.clone();
    match op {
        Op::Read { offset, size } => {
            let value = t.read(offset, size);
            assert_eq!(
                value & !width_mask(size),
                0,
                "read {value:#x} wider than {size}"
            );
            if offset >= CONFIG_SPACE {
                let expected = expected_config(&t.backend().config, offset - CONFIG_SPACE, size);
                assert_eq!(value, expected & width_mask(size), "config read");
            } else if size != 4 || offset % 4 != 0 {
                assert_eq!(value, 0, "illegal register access returned data");
            } else {
                check_register_read(t, view, offset as u32, value as u32);
            }
        }
        Op::Write {
            offset,
            size,
            value,
        } => {
            let effect = t.write(offset, size, value);
            if effect.inject_interrupt {
                assert_ne!(t.interrupt_status(), 0, "injection with nothing pending");
            }
            if offset >= CONFIG_SPACE {
                check_config_write(t, &before_config, offset - CONFIG_SPACE, size, value);
            } else {
                assert_eq!(
                    t.backend().config,
                    before_config,
                    "register write changed config"
                );
                if size == 4 && offset == register(VIRTIO_MMIO_DEVICE_FEATURES_SEL) {
                    view.device_features_sel = value as u32;
                }
                if size == 4 && offset == register(VIRTIO_MMIO_QUEUE_SEL) {
                    view.queue_sel = value as u32;
                }
                if size == 4 && offset == register(VIRTIO_MMIO_STATUS) && value as u32 == 0 {
                    assert_eq!(t.status(), 0, "status after reset");
                    assert_eq!(t.acked_features(), 0, "features survive reset");
                    assert_eq!(t.interrupt_status(), 0, "interrupts survive reset");
                    assert!(!t.is_activated(), "still activated after reset");
                    *view = DriverView::default();
                }
            }
            let status_write = size == 4 && offset == register(VIRTIO_MMIO_STATUS);
            if t.backend().activations != before_activations {
                assert!(
                    status_write && before_status & DRIVER_OK == 0 && value as u32 & DRIVER_OK != 0,
                    "activation outside a DRIVER_OK write"
                );
            }
            if before_status & FEATURES_OK != 0 && !(status_write && value as u32 == 0) {
                assert_eq!(
                    t.acked_features(),
                    before_acked,
                    "features changed after FEATURES_OK"
                );
            }
        }
        Op::UsedBuffer | Op::ConfigChange => {
            let inject = if matches!(op, Op::UsedBuffer) {
                t.signal_used_buffer()
            } else {
                t.signal_config_change()
            };
            if inject {
                assert!(!before_line, "second injection while the line is asserted");
                assert_ne!(t.interrupt_status(), 0, "injection with nothing pending");
            }
        }
        Op::Fail => {
            let inject = t.fail();
            if before_status & DRIVER_OK != 0 {
                assert_ne!(t.status() & NEEDS_RESET, 0, "fail() after DRIVER_OK");
            } else {
                assert_eq!(t.status(), before_status, "fail() before DRIVER_OK");
                assert!(!inject, "fail() before DRIVER_OK injects");
            }
        }
        Op::LineAsserted => t.mark_line_asserted(),
    }
    if t.backend().notifies != before_notifies {
        assert!(
            before_activated && before_status & NEEDS_RESET == 0,
            "notify forwarded while the device was not running (status {before_status:#x})"
        );
    }
    if !matches!(op, Op::Write { .. }) {
        assert_eq!(
            t.backend().activations,
            before_activations,
            "activation outside a write"
        );
    }
    check_invariants(t);
}

fn check_register_read(
    t: &MmioTransport<FuzzBackend>,
    view: &DriverView,
    register: u32,
    value: u32,
) {
    match register {
        VIRTIO_MMIO_MAGIC_VALUE => assert_eq!(value, MAGIC),
        VIRTIO_MMIO_VERSION => assert_eq!(value, 2),
        VIRTIO_MMIO_DEVICE_ID => assert_eq!(value, DEVICE_ID),
        VIRTIO_MMIO_VENDOR_ID => assert_eq!(value, VENDOR),
        VIRTIO_MMIO_STATUS => assert_eq!(value, t.status(), "Status register"),
        VIRTIO_MMIO_INTERRUPT_STATUS => assert_eq!(value, t.interrupt_status()),
        VIRTIO_MMIO_DEVICE_FEATURES => {
            let offered = t.backend().visible_features();
            let expected = match view.device_features_sel {
                0 => offered as u32,
                1 => (offered >> 32) as u32,
                _ => 0,
            };
            assert_eq!(
                value, expected,
                "DeviceFeatures (sel {})",
                view.device_features_sel
            );
        }
        VIRTIO_MMIO_QUEUE_NUM_MAX => {
            let max = usize::try_from(view.queue_sel)
                .ok()
                .and_then(|queue| t.backend().queue_max.get(queue))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                value,
                u32::from(max),
                "QueueNumMax of queue {}",
                view.queue_sel
            );
        }
        VIRTIO_MMIO_QUEUE_READY => assert!(value <= 1, "QueueReady reads {value}"),
        _ => {}
    }
}

fn check_config_write(
    t: &MmioTransport<FuzzBackend>,
    before: &[u8],
    offset: u64,
    size: u8,
    value: u64,
) {
    let after = &t.backend().config;
    let legal = matches!(size, 1 | 2 | 4 | 8);
    for (at, (&old, &new)) in before.iter().zip(after.iter()).enumerate() {
        let relative = (at as u64).wrapping_sub(offset);
        if legal && relative < u64::from(size) && !t.backend().refuse_config_write {
            assert_eq!(
                new,
                value.to_le_bytes()[relative as usize],
                "config byte {at}"
            );
        } else {
            assert_eq!(new, old, "config byte {at} outside the write changed");
        }
    }
}

/// How far executions got, so that a generator that stops reaching the deep states fails
/// the test instead of passing vacuously.
#[derive(Debug, Default)]
struct Reached {
    accesses: u64,
    activations: u64,
    refused_activations: u64,
    notifies: u64,
    needs_reset: u64,
}

fn execute(rng: &mut Rng, reached: &mut Reached) {
    let backend = FuzzBackend::random(rng);
    let mut ops = if rng.one_in(4) {
        Vec::new()
    } else {
        linux_init(&backend, rng)
    };
    let mut t = MmioTransport::with_label(backend, "fuzz");
    let mut view = DriverView::default();
    let extra = if rng.one_in(16) { 400 } else { rng.below(64) };
    let mut trace = Vec::with_capacity(ops.len() + extra as usize);
    check_invariants(&t);
    let planned = ops.len() as u64;
    ops.reverse();
    for _ in 0..planned + extra {
        let op = match ops.pop() {
            Some(op) if !rng.one_in(32) => op,
            _ => next_op(rng, &t),
        };
        trace.push(op);
        let _trace = TraceOnPanic(&trace);
        apply(&mut t, &mut view, op);
        if t.status() & NEEDS_RESET != 0 {
            reached.needs_reset += 1;
        }
    }
    let backend = t.backend();
    reached.accesses += trace.len() as u64;
    reached.notifies += backend.notifies;
    if backend.refuse_activation {
        reached.refused_activations += backend.activations;
    } else {
        reached.activations += backend.activations;
    }
}

#[test]
fn transport_survives_arbitrary_register_traffic() {
    let mut reached = Reached::default();
    let executions =
        fuzz_support::run("transport", CI_EXECUTIONS, |rng| execute(rng, &mut reached));
    println!("transport: reached {reached:?}");
    // Floors at about half of what the CI run reaches per execution (2.5 M executions:
    // 70 accesses, 0.57 activations, 0.08 refused activations, 0.10 forwarded notifies and
    // 10 accesses seen in DEVICE_NEEDS_RESET each), so that a generator which stops reaching
    // a state fails here. Short replays (HVV_FUZZ_ITERS below 10 000) skip them.
    if executions >= 10_000 {
        let floors = [
            ("accesses", reached.accesses, executions * 30),
            ("activations", reached.activations, executions / 4),
            (
                "refused activations",
                reached.refused_activations,
                executions / 25,
            ),
            ("forwarded notifies", reached.notifies, executions / 20),
            (
                "accesses in DEVICE_NEEDS_RESET",
                reached.needs_reset,
                executions,
            ),
        ];
        for (what, count, floor) in floors {
            assert!(count >= floor, "{what}: {count} < {floor}; {reached:?}");
        }
    }
}
