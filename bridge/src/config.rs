//! The bridge configuration: hvisor-tool's `virtio_cfg.json`, accepted unchanged, plus an
//! optional per-device backend section.
//!
//! Numbers may be JSON numbers or strings parsed like C's `strtoumax(s, NULL, 0)`
//! (`0x` hex, leading-`0` octal, else decimal), exactly as hvisor-tool reads them.
//! Every invalid field is rejected with one line naming the zone, the device and the field.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use hvisor_hsm::abi::{HvisorAbi, MAX_CPUS};
use serde_json::{Map, Value};

mod hvisor_tool;
mod parse;

pub use parse::parse_number;

/// The smallest device window: registers end at 0x100, where config space starts.
const MIN_DEVICE_LEN: u64 = 0x100;
/// The largest device window we accept; virtio-mmio config space never needs more.
const MAX_DEVICE_LEN: u64 = 0x1000;
/// Largest queue size a split virtqueue may have (virtio 1.x).
const MAX_QUEUE_SIZE: u64 = 32768;
/// Queue count cap; vhost-user's own limit is far higher, no real device needs more.
const MAX_NUM_QUEUES: u64 = 64;

/// Where in the configuration an error is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The zone id, when known, else the zone's index in `zones`.
    pub zone: Option<String>,
    /// The device's index and type, when the error is inside a device.
    pub device: Option<String>,
    /// The field, e.g. `irq` or `memory_region[1].size`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(zone) = &self.zone {
            write!(f, "zone {}: ", OneLine(zone))?;
        }
        if let Some(device) = &self.device {
            write!(f, "device {}: ", OneLine(device))?;
        }
        write!(
            f,
            "field `{}`: {}",
            OneLine(&self.field),
            OneLine(&self.reason)
        )
    }
}

/// Text from the config file (key names, paths, values) shown with control characters and
/// the Unicode line and paragraph separators escaped, so an error always stays on one line.
struct OneLine<'a>(&'a str);

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The virtio device type of a device entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceType {
    /// The virtio device id.
    pub id: u32,
    /// The short name used in logs and in `type`.
    pub name: &'static str,
}

/// Known names for `type`, with their virtio device ids and default queue geometry.
#[derive(Clone, Copy)]
struct TypeInfo {
    name: &'static str,
    id: u32,
    num_queues: u16,
    queue_size: u16,
}

const TYPES: &[TypeInfo] = &[
    TypeInfo {
        name: "net",
        id: 1,
        num_queues: 2,
        queue_size: 256,
    },
    TypeInfo {
        name: "blk",
        id: 2,
        num_queues: 1,
        queue_size: 256,
    },
    TypeInfo {
        name: "console",
        id: 3,
        num_queues: 2,
        queue_size: 128,
    },
    TypeInfo {
        name: "rng",
        id: 4,
        num_queues: 1,
        queue_size: 256,
    },
    TypeInfo {
        name: "scsi",
        id: 8,
        num_queues: 3,
        queue_size: 256,
    },
    TypeInfo {
        name: "gpu",
        id: 16,
        num_queues: 2,
        queue_size: 256,
    },
    TypeInfo {
        name: "input",
        id: 18,
        num_queues: 2,
        queue_size: 64,
    },
    TypeInfo {
        name: "vsock",
        id: 19,
        num_queues: 3,
        queue_size: 256,
    },
    TypeInfo {
        name: "sound",
        id: 25,
        num_queues: 4,
        queue_size: 64,
    },
    TypeInfo {
        name: "fs",
        id: 26,
        num_queues: 2,
        queue_size: 256,
    },
    TypeInfo {
        name: "scmi",
        id: 32,
        num_queues: 2,
        queue_size: 64,
    },
    TypeInfo {
        name: "i2c",
        id: 34,
        num_queues: 1,
        queue_size: 64,
    },
    TypeInfo {
        name: "can",
        id: 36,
        num_queues: 3,
        queue_size: 64,
    },
    TypeInfo {
        name: "gpio",
        id: 41,
        num_queues: 2,
        queue_size: 64,
    },
];

fn type_by_name(name: &str) -> Option<TypeInfo> {
    TYPES.iter().find(|t| t.name == name).copied()
}

/// The entry for a device id; an id without one gets a generic entry whose queue count
/// must then come from `num_queues`.
fn type_by_id(id: u32) -> TypeInfo {
    TYPES
        .iter()
        .find(|t| t.id == id)
        .copied()
        .unwrap_or(TypeInfo {
            name: "virtio",
            id,
            num_queues: 0,
            queue_size: 256,
        })
}

/// How the bridge reaches a device's vhost-user backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// Connect to a backend someone else runs.
    External {
        /// The backend's listening socket.
        socket: PathBuf,
    },
    /// Spawn our own `vhost-user-net` on a TAP interface (hvisor-tool's `tap` and `mac`).
    SpawnNet {
        /// The TAP interface, created if missing.
        tap: String,
        /// The guest's MAC address; the backend derives a stable one when absent.
        mac: Option<[u8; 6]>,
    },
    /// Spawn our own `vhost-user-console` on a new pty, as hvisor-tool does for a console
    /// entry with no other fields. The backend logs the pty's path.
    SpawnConsole,
    /// Spawn our own `vhost-user-blk` on a private socket.
    SpawnBlk {
        /// The image file or block device.
        image: PathBuf,
        /// Serve the image read-only.
        read_only: bool,
        /// The serial returned by GET_ID.
        serial: Option<String>,
        /// Open the image with O_DIRECT.
        direct: bool,
        /// How the backend moves data; `None` leaves the backend's default.
        io_engine: Option<BlkIoEngine>,
    },
}

/// The I/O engine of a spawned `vhost-user-blk` (its `--io-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkIoEngine {
    /// `preadv` and `pwritev`.
    Sync,
    /// READV and WRITEV on io_uring.
    IoUring,
}

impl BlkIoEngine {
    /// The value as `vhost-user-blk --io-engine` spells it.
    pub fn as_arg(self) -> &'static str {
        match self {
            BlkIoEngine::Sync => "sync",
            BlkIoEngine::IoUring => "io_uring",
        }
    }
}

/// One zone RAM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// The region's address as root Linux sees it (the `/dev/hvisor` mmap offset).
    pub zone0_ipa: u64,
    /// The region's guest-physical address inside the zone.
    pub zonex_ipa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// One virtio device of a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Index of the entry in the zone's `devices` array.
    pub index: usize,
    /// The virtio device type.
    pub device_type: DeviceType,
    /// Absolute guest-physical base of the virtio-mmio registers.
    pub addr: u64,
    /// Size of the register window.
    pub len: u64,
    /// Interrupt-controller id injected into the guest.
    pub irq: u32,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// QueueNumMax offered to the guest.
    pub queue_size: u16,
    /// How the backend is reached.
    pub backend: BackendSpec,
    /// hvisor-tool's net fields, kept for the net backend.
    pub tap: Option<String>,
    /// hvisor-tool's net MAC address.
    pub mac: Option<[u8; 6]>,
}

impl DeviceConfig {
    /// A short name for logs: `blk@0xa003c00`.
    pub fn label(&self) -> String {
        format!("{}@{:#x}", self.device_type.name, self.addr)
    }

    /// True if `address` falls inside this device's register window.
    pub fn contains(&self, address: u64) -> bool {
        address >= self.addr && address - self.addr < self.len
    }
}

/// A zone's virtio trap region, as hvisor's zone config lists it (`"type": "virtio"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Guest-physical base.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

/// One zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The zone id (hvisor's `src_zone`).
    pub id: u32,
    /// Zone RAM.
    pub memory_regions: Vec<MemoryRegion>,
    /// Enabled devices; disabled entries are dropped.
    pub devices: Vec<DeviceConfig>,
    /// The trap regions: from `virtio_windows` when given, else one per device.
    pub windows: Vec<Window>,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// Zones in file order.
    pub zones: Vec<ZoneConfig>,
    /// What the file asks for that is accepted but not served (e.g. hvisor-tool's gpu
    /// fields on a disabled device), one line each, naming zone, device and field.
    pub warnings: Vec<String>,
}

impl Config {
    /// All enabled devices with their zone.
    pub fn devices(&self) -> impl Iterator<Item = (&ZoneConfig, &DeviceConfig)> {
        self.zones
            .iter()
            .flat_map(|z| z.devices.iter().map(move |d| (z, d)))
    }
}

/// Bytes of config space for a virtio device id: the size of the spec's config struct, so
/// a backend that does not bounds-check GET_CONFIG is never asked for more.
pub fn config_space_len(device_id: u32) -> usize {
    match device_id {
        1 => 24,   // net: mac, status, max_virtqueue_pairs, mtu, speed, duplex, rss fields
        2 => 60,   // blk: through write_zeroes_may_unmap and its padding
        3 => 12,   // console: cols, rows, max_nr_ports, emerg_wr
        8 => 36,   // scsi
        16 => 16,  // gpu
        18 => 136, // input: select, subsel, size, reserved, union
        19 => 8,   // vsock: guest_cid
        25 => 16,  // sound: jacks, streams, chmaps, controls
        26 => 40,  // fs: tag[36], num_request_queues
        36 => 2,   // can: status
        41 => 8,   // gpio: ngpio, padding, gpio_names_size
        _ => 0,    // rng, i2c, scmi and unknown devices: none
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;

    /// The directory relative paths resolve against; `Cargo.toml` in it is an existing "image".
    fn manifest_dir() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// A private scratch directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "hvv-config-{tag}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("create scratch dir");
            TempDir(path)
        }

        fn touch(&self, name: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, b"").expect("create file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn blk(addr: u64, irq: u32) -> Value {
        json!({
            "type": "blk", "addr": format!("{addr:#x}"), "len": "0x200", "irq": irq,
            "img": "Cargo.toml", "status": "enable"
        })
    }

    /// A read-only blk device: several of them may share `Cargo.toml` as their image.
    fn blk_ro(addr: u64, irq: u32) -> Value {
        let mut dev = blk(addr, irq);
        dev["read_only"] = json!(true);
        dev
    }

    fn with_socket(type_name: &str, addr: u64, irq: u32) -> Value {
        json!({
            "type": type_name, "addr": format!("{addr:#x}"), "len": "0x200", "irq": irq,
            "socket": format!("{type_name}.sock"), "status": "enable"
        })
    }

    fn zone_with(id: u32, zone0_ipa: u64, devices: Vec<Value>) -> Value {
        json!({
            "id": id,
            "memory_region": [
                { "zone0_ipa": format!("{zone0_ipa:#x}"), "zonex_ipa": "0x50000000",
                  "size": "0x10000000" }
            ],
            "devices": devices
        })
    }

    /// One zone, 256 MiB of RAM at 0x5000_0000, one blk device at 0xa003c00 with irq 78.
    fn base() -> Value {
        json!({ "zones": [zone_with(1, 0x5000_0000, vec![blk(0xa003c00, 78)])] })
    }

    fn zone(c: &mut Value) -> &mut Value {
        &mut c["zones"][0]
    }

    fn dev(c: &mut Value) -> &mut Value {
        &mut c["zones"][0]["devices"][0]
    }

    fn region(c: &mut Value) -> &mut Value {
        &mut c["zones"][0]["memory_region"][0]
    }

    fn remove(v: &mut Value, key: &str) {
        v.as_object_mut().expect("an object").remove(key);
    }

    fn devices(c: &mut Value) -> &mut Vec<Value> {
        c["zones"][0]["devices"].as_array_mut().expect("devices")
    }

    fn set_windows(c: &mut Value, windows: Value) {
        zone(c)["virtio_windows"] = windows;
    }

    fn parse(config: &Value) -> Result<Config, ConfigError> {
        Config::parse(&config.to_string(), manifest_dir())
    }

    fn parse_ok(config: &Value) -> Config {
        parse(config).unwrap_or_else(|e| panic!("config rejected: {e}\n{config:#}"))
    }

    /// Checks the error's location and that its text is one line that names it.
    fn assert_error(
        what: &str,
        result: Result<Config, ConfigError>,
        zone: Option<&str>,
        device: Option<&str>,
        field: &str,
    ) {
        let err = match result {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e,
        };
        assert_eq!(
            (
                err.zone.as_deref(),
                err.device.as_deref(),
                err.field.as_str()
            ),
            (zone, device, field),
            "{what}: wrong location in \"{err}\""
        );
        let line = err.to_string();
        assert!(!line.contains('\n'), "{what}: not one line: {line:?}");
        if let Some(zone) = zone {
            assert!(
                line.starts_with(&format!("zone {zone}: ")),
                "{what}: {line}"
            );
        }
        if let Some(device) = device {
            assert!(
                line.contains(&format!("device {device}: ")),
                "{what}: {line}"
            );
        }
        assert!(
            line.contains(&format!("field `{field}`: ")),
            "{what}: {line}"
        );
        assert!(!err.reason.is_empty(), "{what}: no reason");
    }

    type Edit = fn(&mut Value);

    /// What the case is, the edit that breaks `base()`, and the zone, device and field the
    /// error must name.
    type BadConfig = (
        &'static str,
        Edit,
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
    );

    const BAD_CONFIGS: &[BadConfig] = &[
        // Top level.
        (
            "unknown top-level field",
            |c| c["version"] = json!(2),
            None,
            None,
            "version",
        ),
        (
            "more zones than MAX_CPUS",
            |c| {
                let one = c["zones"][0].clone();
                c["zones"] = Value::Array(vec![one; MAX_CPUS + 1]);
            },
            None,
            None,
            "zones",
        ),
        // Zones.
        (
            "zone not an object",
            |c| *zone(c) = json!(1),
            Some("#0"),
            None,
            "<zone>",
        ),
        (
            "zone id missing",
            |c| remove(zone(c), "id"),
            Some("#0"),
            None,
            "id",
        ),
        (
            "zone id not a number",
            |c| zone(c)["id"] = json!("one"),
            Some("#0"),
            None,
            "id",
        ),
        (
            "zone id >= 32",
            |c| zone(c)["id"] = json!(32),
            Some("#0"),
            None,
            "id",
        ),
        (
            "zone id 0x20",
            |c| zone(c)["id"] = json!("0x20"),
            Some("#0"),
            None,
            "id",
        ),
        (
            "duplicate zone id",
            |c| {
                let other = zone_with(1, 0x9000_0000, vec![]);
                c["zones"].as_array_mut().unwrap().push(other);
            },
            Some("1"),
            None,
            "id",
        ),
        (
            "unknown zone field",
            |c| zone(c)["colour"] = json!("red"),
            Some("#0"),
            None,
            "colour",
        ),
        (
            "zone name not a string",
            |c| zone(c)["name"] = json!(5),
            Some("1"),
            None,
            "name",
        ),
        (
            "devices not an array",
            |c| zone(c)["devices"] = json!({}),
            Some("1"),
            None,
            "devices",
        ),
        // RAM.
        (
            "memory_region missing",
            |c| remove(zone(c), "memory_region"),
            Some("1"),
            None,
            "memory_region",
        ),
        (
            "memory_region empty",
            |c| zone(c)["memory_region"] = json!([]),
            Some("1"),
            None,
            "memory_region",
        ),
        (
            "memory_region not an array",
            |c| zone(c)["memory_region"] = json!({}),
            Some("1"),
            None,
            "memory_region",
        ),
        (
            "region not an object",
            |c| *region(c) = json!("0x50000000"),
            Some("1"),
            None,
            "memory_region[0]",
        ),
        (
            "region size missing",
            |c| remove(region(c), "size"),
            Some("1"),
            None,
            "memory_region[0].size",
        ),
        (
            "region size 0",
            |c| region(c)["size"] = json!("0x0"),
            Some("1"),
            None,
            "memory_region[0].size",
        ),
        (
            "region size unaligned",
            |c| region(c)["size"] = json!("0x10000800"),
            Some("1"),
            None,
            "memory_region[0].size",
        ),
        (
            "region zonex_ipa unaligned",
            |c| region(c)["zonex_ipa"] = json!("0x50000800"),
            Some("1"),
            None,
            "memory_region[0].zonex_ipa",
        ),
        (
            "region zone0_ipa unaligned",
            |c| region(c)["zone0_ipa"] = json!("0x50000004"),
            Some("1"),
            None,
            "memory_region[0].zone0_ipa",
        ),
        (
            "region zone0_ipa 0",
            |c| region(c)["zone0_ipa"] = json!(0),
            Some("1"),
            None,
            "memory_region[0].zone0_ipa",
        ),
        (
            "region wraps",
            |c| region(c)["zone0_ipa"] = json!("0xfffffffffffff000"),
            Some("1"),
            None,
            "memory_region[0].size",
        ),
        (
            "unknown region field",
            |c| region(c)["type"] = json!("normal"),
            Some("1"),
            None,
            "memory_region[0].type",
        ),
        (
            "regions overlap in the guest",
            |c| {
                let r = json!({ "zone0_ipa": "0x70000000", "zonex_ipa": "0x5fff0000", "size": "0x10000" });
                zone(c)["memory_region"].as_array_mut().unwrap().push(r);
            },
            Some("1"),
            None,
            "memory_region[1].zonex_ipa",
        ),
        (
            "regions overlap in root memory",
            |c| {
                let r = json!({ "zone0_ipa": "0x50001000", "zonex_ipa": "0x80000000", "size": "0x1000" });
                zone(c)["memory_region"].as_array_mut().unwrap().push(r);
            },
            Some("1"),
            None,
            "memory_region[1].zone0_ipa",
        ),
        (
            "two zones share root memory",
            |c| {
                let other = zone_with(2, 0x5fff_0000, vec![]);
                c["zones"].as_array_mut().unwrap().push(other);
            },
            Some("2"),
            None,
            "memory_region[0].zone0_ipa",
        ),
        // Device identity.
        (
            "device not an object",
            |c| *dev(c) = json!("blk"),
            Some("1"),
            Some("#0"),
            "<device>",
        ),
        (
            "type unknown",
            |c| dev(c)["type"] = json!("floppy"),
            Some("1"),
            Some("#0"),
            "type",
        ),
        (
            "type not a string",
            |c| dev(c)["type"] = json!(2),
            Some("1"),
            Some("#0"),
            "type",
        ),
        (
            "type missing",
            |c| remove(dev(c), "type"),
            Some("1"),
            Some("#0"),
            "type",
        ),
        (
            "device_id 0",
            |c| {
                remove(dev(c), "type");
                dev(c)["device_id"] = json!(0);
            },
            Some("1"),
            Some("#0"),
            "device_id",
        ),
        (
            "device_id beyond u32",
            |c| {
                remove(dev(c), "type");
                dev(c)["device_id"] = json!("0x100000002");
            },
            Some("1"),
            Some("#0"),
            "device_id",
        ),
        (
            "device_id contradicts type",
            |c| dev(c)["device_id"] = json!(1),
            Some("1"),
            Some("#0"),
            "device_id",
        ),
        (
            "unknown type with device_id",
            |c| {
                dev(c)["type"] = json!("floppy");
                dev(c)["device_id"] = json!(2);
            },
            Some("1"),
            Some("#0"),
            "type",
        ),
        (
            "unknown device field",
            |c| dev(c)["colour"] = json!("red"),
            Some("1"),
            Some("#0 (blk)"),
            "colour",
        ),
        (
            "status neither enable nor disable",
            |c| dev(c)["status"] = json!("on"),
            Some("1"),
            Some("#0 (blk)"),
            "status",
        ),
        (
            "status not a string",
            |c| dev(c)["status"] = json!(true),
            Some("1"),
            Some("#0"),
            "status",
        ),
        // Registers and interrupt.
        (
            "addr missing",
            |c| remove(dev(c), "addr"),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "addr 0",
            |c| dev(c)["addr"] = json!("0x0"),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "addr unaligned",
            |c| dev(c)["addr"] = json!("0xa003c02"),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "addr negative string",
            |c| dev(c)["addr"] = json!("-1"),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "addr hex garbage",
            |c| dev(c)["addr"] = json!("0xa00zz"),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "addr bare 0x",
            |c| dev(c)["addr"] = json!("0x"),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "addr sign after 0x",
            |c| dev(c)["addr"] = json!("0x+a003c00"),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "addr empty string",
            |c| dev(c)["addr"] = json!(""),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "len 0",
            |c| dev(c)["len"] = json!(0),
            Some("1"),
            Some("#0 (blk)"),
            "len",
        ),
        (
            "len below the registers",
            |c| dev(c)["len"] = json!("0xff"),
            Some("1"),
            Some("#0 (blk)"),
            "len",
        ),
        (
            "len too big",
            |c| dev(c)["len"] = json!("0x1001"),
            Some("1"),
            Some("#0 (blk)"),
            "len",
        ),
        (
            "len cuts off config space",
            |c| dev(c)["len"] = json!("0x100"),
            Some("1"),
            Some("#0 (blk)"),
            "len",
        ),
        (
            "len a float",
            |c| dev(c)["len"] = json!(512.5),
            Some("1"),
            Some("#0 (blk)"),
            "len",
        ),
        (
            "len wraps",
            |c| dev(c)["addr"] = json!("0xfffffffffffffe00"),
            Some("1"),
            Some("#0 (blk)"),
            "len",
        ),
        (
            "irq 0",
            |c| dev(c)["irq"] = json!(0),
            Some("1"),
            Some("#0 (blk)"),
            "irq",
        ),
        (
            "irq beyond u32",
            |c| dev(c)["irq"] = json!(4_294_967_296u64),
            Some("1"),
            Some("#0 (blk)"),
            "irq",
        ),
        (
            "irq negative",
            |c| dev(c)["irq"] = json!(-1),
            Some("1"),
            Some("#0 (blk)"),
            "irq",
        ),
        (
            "irq bad octal",
            |c| dev(c)["irq"] = json!("09"),
            Some("1"),
            Some("#0 (blk)"),
            "irq",
        ),
        (
            "irq a bool",
            |c| dev(c)["irq"] = json!(true),
            Some("1"),
            Some("#0 (blk)"),
            "irq",
        ),
        (
            "duplicate irq in a zone",
            |c| devices(c).push(blk(0xa003e00, 78)),
            Some("1"),
            Some("#1 (blk)"),
            "irq",
        ),
        (
            "overlapping device windows",
            |c| devices(c).push(blk(0xa003d00, 79)),
            Some("1"),
            Some("#1 (blk)"),
            "addr",
        ),
        (
            "device window overlaps zone RAM",
            |c| dev(c)["addr"] = json!("0x5ffffe00"),
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        // virtio_windows.
        (
            "device outside every window",
            |c| {
                set_windows(c, json!([{ "base": "0xa000000", "size": "0x1000" }]));
            },
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "device straddles a window end",
            |c| {
                set_windows(c, json!([{ "base": "0xa003000", "size": "0xd00" }]));
            },
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "device spans two adjacent windows",
            |c| {
                set_windows(
                    c,
                    json!([
                        { "base": "0xa003c00", "size": "0x100" },
                        { "base": "0xa003d00", "size": "0x100" }
                    ]),
                );
            },
            Some("1"),
            Some("#0 (blk)"),
            "addr",
        ),
        (
            "windows overlap",
            |c| {
                set_windows(
                    c,
                    json!([
                        { "base": "0xa000000", "size": "0x4000" },
                        { "base": "0xa003000", "size": "0x1000" }
                    ]),
                );
            },
            Some("1"),
            None,
            "virtio_windows[1].base",
        ),
        (
            "window overlaps zone RAM",
            |c| {
                set_windows(
                    c,
                    json!([
                        { "base": "0xa000000", "size": "0x4000" },
                        { "base": "0x4ffff000", "size": "0x2000" }
                    ]),
                );
            },
            Some("1"),
            None,
            "virtio_windows[1].base",
        ),
        (
            "window size 0",
            |c| set_windows(c, json!([{ "base": "0xa000000", "size": 0 }])),
            Some("1"),
            None,
            "virtio_windows[0].size",
        ),
        (
            "window wraps",
            |c| {
                set_windows(
                    c,
                    json!([{ "base": "0xfffffffffffff000", "size": "0x2000" }]),
                );
            },
            Some("1"),
            None,
            "virtio_windows[0].size",
        ),
        (
            "window base missing",
            |c| set_windows(c, json!([{ "size": "0x4000" }])),
            Some("1"),
            None,
            "virtio_windows[0].base",
        ),
        (
            "unknown window field",
            |c| {
                set_windows(
                    c,
                    json!([{ "base": "0xa000000", "size": "0x4000", "type": "virtio" }]),
                );
            },
            Some("1"),
            None,
            "virtio_windows[0].type",
        ),
        (
            "virtio_windows not an array",
            |c| set_windows(c, json!({})),
            Some("1"),
            None,
            "virtio_windows",
        ),
        // Backends.
        (
            "blk without img or socket",
            |c| remove(dev(c), "img"),
            Some("1"),
            Some("#0 (blk)"),
            "img",
        ),
        (
            "img does not exist",
            |c| dev(c)["img"] = json!("no-such-image.img"),
            Some("1"),
            Some("#0 (blk)"),
            "img",
        ),
        (
            "img not a string",
            |c| dev(c)["img"] = json!(1),
            Some("1"),
            Some("#0 (blk)"),
            "img",
        ),
        (
            "net without socket nor tap",
            |c| {
                *dev(c) = with_socket("net", 0xa003c00, 78);
                remove(dev(c), "socket");
            },
            Some("1"),
            Some("#0 (net)"),
            "tap",
        ),
        (
            "rng without socket",
            |c| {
                *dev(c) = with_socket("rng", 0xa003c00, 78);
                remove(dev(c), "socket");
            },
            Some("1"),
            Some("#0 (rng)"),
            "socket",
        ),
        (
            "socket in the device and in backend",
            |c| {
                dev(c)["socket"] = json!("a.sock");
                dev(c)["backend"] = json!({ "socket": "b.sock" });
            },
            Some("1"),
            Some("#0 (blk)"),
            "socket",
        ),
        (
            "socket empty",
            |c| dev(c)["socket"] = json!(""),
            Some("1"),
            Some("#0 (blk)"),
            "socket",
        ),
        (
            "read_only with an external backend",
            |c| {
                dev(c)["socket"] = json!("qsd.sock");
                dev(c)["read_only"] = json!(true);
            },
            Some("1"),
            Some("#0 (blk)"),
            "read_only",
        ),
        (
            "serial with an external backend",
            |c| {
                dev(c)["backend"] = json!({ "socket": "qsd.sock", "serial": "disk0" });
            },
            Some("1"),
            Some("#0 (blk)"),
            "serial",
        ),
        (
            "backend not an object",
            |c| dev(c)["backend"] = json!("qsd.sock"),
            Some("1"),
            Some("#0 (blk)"),
            "backend",
        ),
        (
            "unknown backend field",
            |c| dev(c)["backend"] = json!({ "img": "Cargo.toml" }),
            Some("1"),
            Some("#0 (blk)"),
            "backend.img",
        ),
        (
            "queue_size not a power of two",
            |c| dev(c)["queue_size"] = json!(100),
            Some("1"),
            Some("#0 (blk)"),
            "queue_size",
        ),
        (
            "queue_size 0",
            |c| dev(c)["backend"] = json!({ "queue_size": 0 }),
            Some("1"),
            Some("#0 (blk)"),
            "queue_size",
        ),
        (
            "queue_size too big",
            |c| dev(c)["queue_size"] = json!("0x10000"),
            Some("1"),
            Some("#0 (blk)"),
            "queue_size",
        ),
        (
            "num_queues 0",
            |c| dev(c)["num_queues"] = json!(0),
            Some("1"),
            Some("#0 (blk)"),
            "num_queues",
        ),
        (
            "num_queues too big",
            |c| dev(c)["backend"] = json!({ "num_queues": 65 }),
            Some("1"),
            Some("#0 (blk)"),
            "num_queues",
        ),
        (
            "unknown device_id without num_queues",
            |c| {
                *dev(c) = with_socket("x", 0xa003c00, 78);
                remove(dev(c), "type");
                dev(c)["device_id"] = json!(77);
            },
            Some("1"),
            Some("#0 (virtio)"),
            "num_queues",
        ),
        (
            "serial too long",
            |c| dev(c)["serial"] = json!("123456789012345678901"),
            Some("1"),
            Some("#0 (blk)"),
            "serial",
        ),
        (
            "serial not a string",
            |c| dev(c)["serial"] = json!(7),
            Some("1"),
            Some("#0 (blk)"),
            "serial",
        ),
        (
            "read_only not a bool",
            |c| dev(c)["read_only"] = json!("yes"),
            Some("1"),
            Some("#0 (blk)"),
            "read_only",
        ),
        (
            "direct not a bool",
            |c| dev(c)["backend"] = json!({ "direct": 1 }),
            Some("1"),
            Some("#0 (blk)"),
            "direct",
        ),
        (
            "io_engine unknown",
            |c| dev(c)["io_engine"] = json!("aio"),
            Some("1"),
            Some("#0 (blk)"),
            "io_engine",
        ),
        (
            "io_engine with an external backend",
            |c| dev(c)["backend"] = json!({ "socket": "qsd.sock", "io_engine": "sync" }),
            Some("1"),
            Some("#0 (blk)"),
            "io_engine",
        ),
        (
            "read_only on a spawned net device",
            |c| {
                *dev(c) = with_socket("net", 0xa003c00, 78);
                remove(dev(c), "socket");
                dev(c)["tap"] = json!("tap0");
                dev(c)["read_only"] = json!(true);
            },
            Some("1"),
            Some("#0 (net)"),
            "read_only",
        ),
        // Images.
        (
            "one image served writable twice",
            |c| {
                let mut second = blk(0xa003e00, 79);
                second["img"] = json!("./Cargo.toml");
                devices(c).push(second);
            },
            Some("1"),
            Some("#1 (blk)"),
            "img",
        ),
        (
            "one image writable in one zone, read-only in another",
            |c| {
                let other = zone_with(2, 0x9000_0000, vec![blk_ro(0xa003c00, 78)]);
                c["zones"].as_array_mut().unwrap().push(other);
            },
            Some("2"),
            Some("#0 (blk)"),
            "img",
        ),
        // Net fields.
        (
            "mac of 5 items",
            |c| {
                *dev(c) = with_socket("net", 0xa003c00, 78);
                dev(c)["mac"] = json!(["0x00", "0x16", "0x3e", "0x10", "0x10"]);
            },
            Some("1"),
            Some("#0 (net)"),
            "mac",
        ),
        (
            "mac byte 256",
            |c| {
                *dev(c) = with_socket("net", 0xa003c00, 78);
                dev(c)["mac"] = json!(["0x00", "0x16", "0x3e", "0x10", "0x10", 256]);
            },
            Some("1"),
            Some("#0 (net)"),
            "mac",
        ),
        (
            "mac item not a number",
            |c| {
                *dev(c) = with_socket("net", 0xa003c00, 78);
                dev(c)["mac"] = json!(["0x00", "0x16", "0x3e", "0x10", "0x10", null]);
            },
            Some("1"),
            Some("#0 (net)"),
            "mac",
        ),
        (
            "mac as a string",
            |c| {
                *dev(c) = with_socket("net", 0xa003c00, 78);
                dev(c)["mac"] = json!("00:16:3e:10:10:10");
            },
            Some("1"),
            Some("#0 (net)"),
            "mac",
        ),
        (
            "tap name too long",
            |c| {
                *dev(c) = with_socket("net", 0xa003c00, 78);
                dev(c)["tap"] = json!("a-very-long-tap0");
            },
            Some("1"),
            Some("#0 (net)"),
            "tap",
        ),
        // hvisor's device limit counts all zones.
        (
            "nine devices in one zone",
            |c| {
                *devices(c) = (0..9)
                    .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
                    .collect();
            },
            Some("1"),
            Some("#8 (blk)"),
            "status",
        ),
        (
            "nine devices over two zones",
            |c| {
                *devices(c) = (0..5)
                    .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
                    .collect();
                let four = (0..4)
                    .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
                    .collect();
                c["zones"]
                    .as_array_mut()
                    .unwrap()
                    .push(zone_with(2, 0x9000_0000, four));
            },
            Some("2"),
            Some("#3 (blk)"),
            "status",
        ),
        // hvisor's pending-IRQ list per CPU holds MAX_DEVS - 1, and a zone's IRQs share one CPU.
        (
            "eight device irqs in one zone",
            |c| {
                *devices(c) = (0..8)
                    .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
                    .collect();
            },
            Some("1"),
            None,
            "devices",
        ),
    ];

    #[test]
    fn base_config_is_valid() {
        let config = parse_ok(&base());
        let (zone, dev) = config.devices().next().expect("one device");
        assert_eq!(zone.id, 1);
        assert_eq!(dev.label(), "blk@0xa003c00");
        assert_eq!(
            dev.backend,
            BackendSpec::SpawnBlk {
                image: manifest_dir().join("Cargo.toml"),
                read_only: false,
                serial: None,
                direct: false,
                io_engine: None,
            }
        );
    }

    #[test]
    fn every_bad_config_names_zone_device_and_field() {
        assert!(BAD_CONFIGS.len() >= 25);
        for &(what, edit, zone, device, field) in BAD_CONFIGS {
            let mut config = base();
            edit(&mut config);
            assert_error(what, parse(&config), zone, device, field);
        }
    }

    #[test]
    fn bad_documents_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("invalid JSON", r#"{"zones": ["#, "<json>"),
            ("trailing garbage", r#"{"zones": []} x"#, "<json>"),
            ("root not an object", "[]", "<root>"),
            ("zones missing", "{}", "zones"),
            ("zones not an array", r#"{"zones": {"id": 1}}"#, "zones"),
            ("zones empty", r#"{"zones": []}"#, "zones"),
        ];
        for &(what, text, field) in cases {
            assert_error(what, Config::parse(text, manifest_dir()), None, None, field);
        }
    }

    #[test]
    fn control_characters_in_the_file_stay_on_one_line() {
        let mut config = base();
        dev(&mut config)["bad\nkey"] = json!(1);
        dev(&mut config)["img"] = json!("line1\nline2");
        let err = parse(&config).expect_err("unknown key");
        assert_eq!(err.field, "bad\nkey");
        assert!(err.to_string().contains("field `bad\\nkey`"), "{err}");

        remove(dev(&mut config), "bad\nkey");
        let err = parse(&config).expect_err("missing image");
        assert_eq!(err.field, "img");
        let line = err.to_string();
        assert!(
            !line.contains('\n') && line.contains("line1\\nline2"),
            "{line}"
        );
    }

    #[test]
    fn hvisor_tool_style_example_is_accepted() {
        let dir = TempDir::new("example");
        dir.touch("rootfs2.ext4");
        // The shape of hvisor-tool's documented example: hex strings, numeric irqs, a MAC as
        // strings, a disabled net device, a second zone whose RAM sits elsewhere in root
        // memory. The consoles get external vhost-user sockets here; without one the bridge
        // spawns our console backend on a pty (checked at the end).
        let text = r#"{
          "zones": [
            {
              "id": 1,
              "memory_region": [
                { "zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000", "size": "0x30000000" }
              ],
              "devices": [
                { "type": "blk", "addr": "0xa003c00", "len": "0x200", "irq": 78,
                  "img": "rootfs2.ext4", "status": "enable" },
                { "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76,
                  "socket": "console1.sock", "status": "enable" },
                { "type": "net", "addr": "0xa003600", "len": "0x200", "irq": 75,
                  "tap": "tap0", "mac": ["0x00", "0x16", "0x3e", "0x10", "0x10", "0x10"],
                  "status": "disable" }
              ]
            },
            {
              "id": 2,
              "memory_region": [
                { "zone0_ipa": "0x90000000", "zonex_ipa": "0x40000000", "size": "0x10000000" },
                { "zone0_ipa": "0x100000000", "zonex_ipa": "0x100000000", "size": "0x40000000" }
              ],
              "devices": [
                { "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76,
                  "socket": "console2.sock", "status": "enable" }
              ]
            }
          ]
        }"#;
        let config = Config::parse(text, &dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.zones.len(), 2);
        let z1 = &config.zones[0];
        assert_eq!(z1.id, 1);
        assert_eq!(
            z1.memory_regions,
            [MemoryRegion {
                zone0_ipa: 0x5000_0000,
                zonex_ipa: 0x5000_0000,
                size: 0x3000_0000
            }]
        );
        assert_eq!(z1.devices.len(), 2, "the disabled net device is dropped");
        let blk = &z1.devices[0];
        assert_eq!(
            (blk.device_type.id, blk.addr, blk.len, blk.irq),
            (2, 0xa003c00, 0x200, 78)
        );
        assert_eq!(
            blk.backend,
            BackendSpec::SpawnBlk {
                image: dir.0.join("rootfs2.ext4"),
                read_only: false,
                serial: None,
                direct: false,
                io_engine: None,
            }
        );
        let console = &z1.devices[1];
        assert_eq!(
            (console.index, console.device_type.id, console.irq),
            (1, 3, 76)
        );
        assert_eq!(
            console.backend,
            BackendSpec::External {
                socket: dir.0.join("console1.sock")
            }
        );
        assert_eq!(
            z1.windows,
            [
                Window {
                    base: 0xa003c00,
                    size: 0x200
                },
                Window {
                    base: 0xa003800,
                    size: 0x200
                }
            ],
            "without virtio_windows every device is its own trap window"
        );
        let z2 = &config.zones[1];
        assert_eq!(z2.id, 2);
        assert_eq!(z2.memory_regions.len(), 2);
        assert_eq!(z2.memory_regions[0].zone0_ipa, 0x9000_0000);
        assert_eq!(z2.memory_regions[0].zonex_ipa, 0x4000_0000);
        // The same address and irq as zone 1's console: zones are separate guests.
        assert_eq!((z2.devices[0].addr, z2.devices[0].irq), (0xa003800, 76));

        // Exactly as hvisor-tool writes it, the console gets our backend on a pty.
        let without_socket = text.replace(r#""socket": "console1.sock", "#, "");
        let config = Config::parse(&without_socket, &dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.zones[0].devices[1].backend,
            BackendSpec::SpawnConsole
        );
    }

    #[test]
    fn hvisor_tool_only_fields_are_accepted_and_ignored() {
        let mut config = base();
        zone(&mut config)["name"] = json!("linux");
        let mut scmi = with_socket("scmi", 0xa003e00, 79);
        scmi["allowed_list"] = json!({ "reset_ids": [0], "clock_ids": ["*"] });
        scmi["reset_map"] = json!({ "0": 523 });
        let mut gpu = with_socket("gpu", 0xa004000, 80);
        gpu["width"] = json!(1280);
        gpu["height"] = json!(800);
        devices(&mut config).extend([scmi, gpu]);
        let config = parse_ok(&config);
        let names: Vec<_> = config.devices().map(|(_, d)| d.device_type.name).collect();
        assert_eq!(names, ["blk", "scmi", "gpu"]);
        // With a backend of their own, hvisor-tool's fields do nothing: said once per device.
        assert_eq!(
            config.warnings,
            [
                "zone 1: device #1 (scmi): field `allowed_list`: hvisor-tool's field, ignored: \
                 configure the backend instead",
                "zone 1: device #2 (gpu): field `height`: hvisor-tool's field, ignored: configure \
                 the backend instead",
            ]
        );
    }

    /// hvisor-tool's in-process gpu and scmi, as its examples write them.
    fn tool_gpu(status: &str) -> Value {
        json!({
            "type": "gpu", "addr": "0xa003400", "len": "0x200", "irq": 74,
            "status": status, "width": 1280, "height": 800
        })
    }

    #[test]
    fn a_disabled_in_process_device_is_accepted_with_a_warning() {
        let mut config = base();
        let mut scmi = json!({ "type": "scmi", "status": "disable", "clock_ids": [1] });
        scmi["scmi_phandle"] = json!(5);
        devices(&mut config).extend([tool_gpu("disable"), scmi]);
        let config = parse_ok(&config);
        assert_eq!(config.devices().count(), 1);
        assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
        assert!(
            config.warnings[0].starts_with("zone 1: device #1 (gpu): field `status`: disabled;")
                && config.warnings[0].contains("vhost-device-gpu"),
            "{}",
            config.warnings[0]
        );
        assert!(
            config.warnings[1].starts_with("zone 1: device #2 (scmi): field `status`: disabled;")
                && config.warnings[1].contains("vhost-device-scmi"),
            "{}",
            config.warnings[1]
        );
    }

    #[test]
    fn hvisor_tool_fields_on_another_disabled_device_get_a_warning() {
        let mut config = base();
        let mut net = json!({ "type": "net", "status": "disable" });
        net["width"] = json!(1);
        devices(&mut config).push(net);
        assert_eq!(
            parse_ok(&config).warnings,
            ["zone 1: device #1 (net): field `width`: disabled device: hvisor-tool's fields ignored"]
        );
    }

    #[test]
    fn an_enabled_in_process_device_says_what_to_use_instead() {
        for (device, instead) in [
            (tool_gpu("enable"), "vhost-device-gpu"),
            (
                json!({ "type": "scmi", "addr": "0xa003400", "len": "0x200", "irq": 74 }),
                "vhost-device-scmi",
            ),
        ] {
            let mut config = base();
            devices(&mut config).push(device);
            let err = parse(&config).expect_err("an in-process device without socket");
            assert_eq!(err.field, "socket", "{err}");
            assert!(
                err.reason.contains(instead) && err.reason.contains("\"status\": \"disable\""),
                "{err}"
            );
        }
    }

    #[test]
    fn a_plain_config_has_no_warnings() {
        assert_eq!(parse_ok(&base()).warnings, Vec::<String>::new());
    }

    #[test]
    fn disabled_devices_are_dropped_but_keep_indexes() {
        let mut config = base();
        // A disabled entry needs no addr, irq or backend, as in hvisor-tool.
        devices(&mut config).insert(0, json!({ "type": "net", "status": "disable" }));
        let config = parse_ok(&config);
        let devices = &config.zones[0].devices;
        assert_eq!(devices.len(), 1);
        assert_eq!((devices[0].index, devices[0].device_type.name), (1, "blk"));
    }

    #[test]
    fn status_defaults_to_enable() {
        let mut config = base();
        remove(dev(&mut config), "status");
        assert_eq!(parse_ok(&config).devices().count(), 1);
    }

    #[test]
    fn relative_paths_resolve_against_the_base_dir() {
        let mut config = base();
        dev(&mut config)["img"] = json!("src/config.rs");
        let mut console = with_socket("console", 0xa003e00, 79);
        console["socket"] = json!("run/console.sock");
        let mut absolute = with_socket("rng", 0xa004000, 80);
        absolute["socket"] = json!("/run/hvisor-vhost/rng.sock");
        devices(&mut config).extend([console, absolute]);
        let config = parse_ok(&config);
        let backends: Vec<_> = config.devices().map(|(_, d)| d.backend.clone()).collect();
        assert_eq!(
            backends,
            [
                BackendSpec::SpawnBlk {
                    image: manifest_dir().join("src/config.rs"),
                    read_only: false,
                    serial: None,
                    direct: false,
                    io_engine: None,
                },
                BackendSpec::External {
                    socket: manifest_dir().join("run/console.sock")
                },
                BackendSpec::External {
                    socket: PathBuf::from("/run/hvisor-vhost/rng.sock")
                },
            ]
        );
    }

    #[test]
    fn from_file_resolves_paths_against_the_file_directory() {
        let dir = TempDir::new("from-file");
        let image = dir.touch("disk.img");
        let mut config = base();
        dev(&mut config)["img"] = json!("disk.img");
        let path = dir.0.join("virtio_cfg.json");
        std::fs::write(&path, config.to_string()).expect("write config");
        let parsed = Config::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let (_, dev) = parsed.devices().next().expect("one device");
        assert!(
            matches!(&dev.backend, BackendSpec::SpawnBlk { image: i, .. } if *i == image),
            "{:?}",
            dev.backend
        );

        let missing = dir.0.join("absent.json");
        assert_error(
            "missing file",
            Config::from_file(&missing),
            None,
            None,
            "<file>",
        );
    }

    #[test]
    fn backend_section_fields_land_in_the_device() {
        let mut config = base();
        dev(&mut config)["backend"] = json!({
            "serial": "zone1-disk0", "read_only": true, "direct": true,
            "io_engine": "io_uring", "queue_size": "0x80", "num_queues": 4
        });
        let parsed = parse_ok(&config);
        let (_, d) = parsed.devices().next().expect("one device");
        assert_eq!((d.num_queues, d.queue_size), (4, 128));
        assert_eq!(
            d.backend,
            BackendSpec::SpawnBlk {
                image: manifest_dir().join("Cargo.toml"),
                read_only: true,
                serial: Some("zone1-disk0".into()),
                direct: true,
                io_engine: Some(BlkIoEngine::IoUring),
            }
        );

        // The same fields at the device level, hvisor-tool style, mean the same.
        let mut flat = base();
        for (k, v) in [
            ("serial", json!("zone1-disk0")),
            ("read_only", json!(true)),
            ("direct", json!(true)),
            ("io_engine", json!("io_uring")),
            ("queue_size", json!(128)),
            ("num_queues", json!("4")),
        ] {
            dev(&mut flat)[k] = v;
        }
        assert_eq!(parse_ok(&flat), parsed);

        // A socket in `backend` selects the external backend; `img` is then not used.
        let mut external = base();
        dev(&mut external)["img"] = json!("not-needed.img");
        dev(&mut external)["backend"] = json!({ "socket": "qsd/blk0.sock", "num_queues": 2 });
        let parsed = parse_ok(&external);
        let (_, d) = parsed.devices().next().expect("one device");
        assert_eq!(d.num_queues, 2);
        assert_eq!(
            d.backend,
            BackendSpec::External {
                socket: manifest_dir().join("qsd/blk0.sock")
            }
        );
    }

    #[test]
    fn device_id_names_any_virtio_type() {
        // A type we have no table entry for needs its queue count.
        let mut config = base();
        *dev(&mut config) = with_socket("x", 0xa003c00, 78);
        remove(dev(&mut config), "type");
        dev(&mut config)["device_id"] = json!(77);
        dev(&mut config)["num_queues"] = json!(3);
        let parsed = parse_ok(&config);
        let (_, d) = parsed.devices().next().expect("one device");
        assert_eq!(
            d.device_type,
            DeviceType {
                id: 77,
                name: "virtio"
            }
        );
        assert_eq!((d.num_queues, d.queue_size), (3, 256));

        // A known id takes that type's name and geometry.
        remove(dev(&mut config), "num_queues");
        dev(&mut config)["device_id"] = json!("0x13");
        let parsed = parse_ok(&config);
        let (_, d) = parsed.devices().next().expect("one device");
        assert_eq!(
            d.device_type,
            DeviceType {
                id: 19,
                name: "vsock"
            }
        );
        assert_eq!(d.num_queues, 3);

        // `type` and a matching `device_id` together are fine.
        let mut both = base();
        dev(&mut both)["device_id"] = json!(2);
        assert_eq!(parse_ok(&both), parse_ok(&base()));
    }

    #[test]
    fn default_queue_geometry_per_type() {
        let expected = [
            ("net", 1, 2, 256),
            ("blk", 2, 1, 256),
            ("console", 3, 2, 128),
            ("rng", 4, 1, 256),
            ("vsock", 19, 3, 256),
            ("fs", 26, 2, 256),
        ];
        for (name, id, num_queues, queue_size) in expected {
            let mut config = base();
            *dev(&mut config) = with_socket(name, 0xa003c00, 78);
            let parsed = parse_ok(&config);
            let (_, d) = parsed.devices().next().expect("one device");
            assert_eq!(
                (d.device_type.id, d.num_queues, d.queue_size),
                (id, num_queues, queue_size),
                "{name}"
            );
        }
    }

    #[test]
    fn len_must_cover_the_config_space() {
        // blk config space is 60 bytes: 0x100 + 0x3c.
        let mut config = base();
        dev(&mut config)["len"] = json!("0x13c");
        assert_eq!(parse_ok(&config).zones[0].devices[0].len, 0x13c);
        dev(&mut config)["len"] = json!("0x138");
        assert_error(
            "short blk window",
            parse(&config),
            Some("1"),
            Some("#0 (blk)"),
            "len",
        );
        // rng has no config space: the registers alone are enough.
        *dev(&mut config) = with_socket("rng", 0xa003c00, 78);
        dev(&mut config)["len"] = json!("0x100");
        assert_eq!(parse_ok(&config).zones[0].devices[0].len, 0x100);
    }

    #[test]
    fn numbers_as_json_numbers_and_as_strings_are_equal() {
        let strings = base();
        let mut numbers = base();
        *region(&mut numbers) = json!({
            "zone0_ipa": 0x5000_0000u64, "zonex_ipa": 0x5000_0000u64, "size": 0x1000_0000u64
        });
        dev(&mut numbers)["addr"] = json!(0xa003c00u64);
        dev(&mut numbers)["len"] = json!(512);
        dev(&mut numbers)["irq"] = json!("78");
        zone(&mut numbers)["id"] = json!("0x1");
        assert_eq!(parse_ok(&numbers), parse_ok(&strings));
    }

    #[test]
    fn octal_strings_parse_like_strtoumax() {
        let mut config = base();
        dev(&mut config)["irq"] = json!("010");
        assert_eq!(parse_ok(&config).zones[0].devices[0].irq, 8);
    }

    #[test]
    fn parse_number_follows_strtoumax_base_zero() {
        let good: &[(Value, u64)] = &[
            (json!(0), 0),
            (json!(4096), 4096),
            (json!(u64::MAX), u64::MAX),
            (json!("0"), 0),
            (json!("42"), 42),
            (json!("0x2A"), 42),
            (json!("0X2a"), 42),
            (json!("052"), 42),
            (json!(" 0x10 "), 16),
            (json!("0xffffffffffffffff"), u64::MAX),
        ];
        for (value, expected) in good {
            assert_eq!(parse_number(value), Ok(*expected), "{value}");
        }
        let bad = [
            json!(-1),
            json!(1.5),
            json!(null),
            json!(true),
            json!([1]),
            json!(""),
            json!("  "),
            json!("0x"),
            json!("-1"),
            json!("+1"),
            json!("0x-1"),
            json!("08"),
            json!("12abc"),
            json!("0x1g"),
            json!("0x10000000000000000"),
        ];
        for value in bad {
            assert!(parse_number(&value).is_err(), "{value} accepted");
        }
    }

    #[test]
    fn shared_window_holds_several_devices() {
        let mut config = base();
        let mut second = blk(0xa003e00, 79);
        second["img"] = json!("src/lib.rs");
        devices(&mut config).push(second);
        set_windows(
            &mut config,
            json!([
                { "base": "0xa000000", "size": "0x4000" },
                { "base": "0xb000000", "size": "0x200" }
            ]),
        );
        let parsed = parse_ok(&config);
        let zone = &parsed.zones[0];
        assert_eq!(zone.devices.len(), 2);
        assert_eq!(
            zone.windows,
            [
                Window {
                    base: 0xa00_0000,
                    size: 0x4000
                },
                Window {
                    base: 0xb00_0000,
                    size: 0x200
                }
            ]
        );
    }

    #[test]
    fn eight_devices_over_zones_are_allowed() {
        let mut config = base();
        *devices(&mut config) = (0..4)
            .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
            .collect();
        let four = (0..4)
            .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
            .collect();
        let mut disabled = blk(0xa001000, 60);
        disabled["status"] = json!("disable");
        let mut zone2 = zone_with(2, 0x9000_0000, four);
        zone2["devices"].as_array_mut().unwrap().push(disabled);
        config["zones"].as_array_mut().unwrap().push(zone2);
        let parsed = parse_ok(&config);
        assert_eq!(parsed.devices().count(), hvisor_hsm::abi::MAX_DEVS);
    }

    #[test]
    fn seven_device_irqs_in_one_zone_are_allowed() {
        let mut config = base();
        *devices(&mut config) = (0..7)
            .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
            .collect();
        assert_eq!(parse_ok(&config).devices().count(), 7);
    }

    #[test]
    fn zone_irq_limit_follows_the_stated_abi() {
        // hvisor branches built with MAX_DEVS 4 keep three pending IRQs per CPU.
        let small: HvisorAbi = "32/4/32".parse().unwrap();
        let mut config = base();
        *devices(&mut config) = (0..4)
            .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
            .collect();
        let text = config.to_string();
        assert_eq!(
            Config::parse_for(&text, manifest_dir(), HvisorAbi::CURRENT)
                .unwrap()
                .devices()
                .count(),
            4
        );
        let err = Config::parse_for(&text, manifest_dir(), small).expect_err("4 > 3");
        assert_eq!(
            (err.field.as_str(), err.zone.as_deref()),
            ("devices", Some("1"))
        );
        assert!(err.reason.contains("at most 3 pending"), "{err}");
    }

    #[test]
    fn too_many_zone_irqs_error_names_the_count_and_the_limit() {
        let mut config = base();
        *devices(&mut config) = (0..8)
            .map(|i| blk_ro(0xa000000 + i * 0x200, 40 + i as u32))
            .collect();
        let err = parse(&config).expect_err("eight irqs in one zone");
        let text = err.to_string();
        assert!(
            text.starts_with("zone 1: field `devices`: 8 distinct device IRQs")
                && text.contains("at most 7 pending"),
            "{text}"
        );
    }

    #[test]
    fn read_only_devices_may_share_an_image() {
        let mut config = base();
        *dev(&mut config) = blk_ro(0xa003c00, 78);
        let mut other = blk_ro(0xa003c00, 78);
        other["img"] = json!("src/../Cargo.toml");
        let zone2 = zone_with(2, 0x9000_0000, vec![other]);
        config["zones"].as_array_mut().unwrap().push(zone2);
        let parsed = parse_ok(&config);
        assert_eq!(parsed.devices().count(), 2);
    }

    #[test]
    fn devices_and_irqs_may_repeat_across_zones() {
        let mut config = base();
        let mut same_place = blk(0xa003c00, 78);
        same_place["img"] = json!("src/main.rs");
        let other = zone_with(2, 0x9000_0000, vec![same_place]);
        config["zones"].as_array_mut().unwrap().push(other);
        let parsed = parse_ok(&config);
        assert_eq!(parsed.devices().count(), 2);
    }

    #[test]
    fn config_space_sizes_match_the_spec_structs() {
        assert_eq!(config_space_len(2), 60);
        assert_eq!(config_space_len(1), 24);
        assert_eq!(config_space_len(4), 0);
        assert_eq!(config_space_len(1000), 0);
        // Every known type's config space fits the largest window after the registers.
        for t in TYPES {
            assert!(MIN_DEVICE_LEN + config_space_len(t.id) as u64 <= MAX_DEVICE_LEN);
        }
    }
}
