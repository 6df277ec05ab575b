//! The bridge configuration: hvisor-tool's `virtio_cfg.json`, accepted unchanged, plus an
//! optional per-device backend section.
//!
//! Numbers may be JSON numbers or strings parsed like C's `strtoumax(s, NULL, 0)`
//! (`0x` hex, leading-`0` octal, else decimal), exactly as hvisor-tool reads them.
//! Every invalid field is rejected with one line naming the zone, the device and the field.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use hvisor_hsm::abi::{MAX_CPUS, MAX_DEVS};
use serde_json::{Map, Value};

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
            write!(f, "zone {zone}: ")?;
        }
        if let Some(device) = &self.device {
            write!(f, "device {device}: ")?;
        }
        write!(f, "field `{}`: {}", self.field, self.reason)
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
    },
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
}

impl Config {
    /// Reads and validates a config file. Relative `img` and `socket` paths are resolved
    /// against the file's directory, as a user editing the file expects.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            zone: None,
            device: None,
            field: "<file>".into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, base)
    }

    /// Parses and validates config text; `base_dir` resolves relative paths.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|e| ConfigError {
            zone: None,
            device: None,
            field: "<json>".into(),
            reason: format!("invalid JSON: {e}"),
        })?;
        let parser = Parser { base_dir };
        parser.config(&root)
    }

    /// All enabled devices with their zone.
    pub fn devices(&self) -> impl Iterator<Item = (&ZoneConfig, &DeviceConfig)> {
        self.zones
            .iter()
            .flat_map(|z| z.devices.iter().map(move |d| (z, d)))
    }
}

struct Parser<'a> {
    base_dir: &'a Path,
}

/// Error-building context: which zone and device we are in.
#[derive(Clone)]
struct Ctx {
    zone: Option<String>,
    device: Option<String>,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            zone: self.zone.clone(),
            device: self.device.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Parses a number the way hvisor-tool does: a JSON integer, or a string for `strtoumax(.., 0)`.
pub fn parse_number(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a non-negative integer")),
        Value::String(s) => parse_c_integer(s),
        other => Err(format!(
            "expected a number or a numeric string, got {other}"
        )),
    }
}

fn parse_c_integer(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let (digits, radix) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (hex, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() {
        return Err(format!("\"{text}\" is not a number"));
    }
    u64::from_str_radix(digits, radix).map_err(|e| format!("\"{text}\" is not a number ({e})"))
}

const ZONE_KEYS: &[&str] = &["id", "memory_region", "devices", "virtio_windows"];
const DEVICE_KEYS: &[&str] = &[
    "type",
    "device_id",
    "addr",
    "len",
    "irq",
    "status",
    "img",
    "tap",
    "mac",
    "width",
    "height",
    "socket",
    "queue_size",
    "num_queues",
    "read_only",
    "serial",
    "direct",
    "backend",
];
const BACKEND_KEYS: &[&str] = &[
    "socket",
    "queue_size",
    "num_queues",
    "read_only",
    "serial",
    "direct",
];

impl Parser<'_> {
    fn config(&self, root: &Value) -> Result<Config, ConfigError> {
        let top = Ctx {
            zone: None,
            device: None,
        };
        let obj = root
            .as_object()
            .ok_or_else(|| top.err("<root>", "expected a JSON object with `zones`"))?;
        let zones = obj
            .get("zones")
            .ok_or_else(|| top.err("zones", "missing"))?
            .as_array()
            .ok_or_else(|| top.err("zones", "expected an array"))?;
        if zones.is_empty() {
            return Err(top.err("zones", "no zones"));
        }
        if zones.len() > MAX_CPUS {
            return Err(top.err("zones", format!("at most {MAX_CPUS} zones")));
        }
        let mut config = Config::default();
        let mut ids = BTreeSet::new();
        for (zi, zone) in zones.iter().enumerate() {
            let z = self.zone(zi, zone)?;
            if !ids.insert(z.id) {
                let ctx = Ctx {
                    zone: Some(z.id.to_string()),
                    device: None,
                };
                return Err(ctx.err("id", "duplicate zone id"));
            }
            config.zones.push(z);
        }
        let total: usize = config.zones.iter().map(|z| z.devices.len()).sum();
        if total > MAX_DEVS {
            return Err(top.err(
                "devices",
                format!("{total} enabled devices; hvisor allows at most {MAX_DEVS}"),
            ));
        }
        Ok(config)
    }

    fn zone(&self, index: usize, value: &Value) -> Result<ZoneConfig, ConfigError> {
        let mut ctx = Ctx {
            zone: Some(format!("#{index}")),
            device: None,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| ctx.err("<zone>", "expected an object"))?;
        check_keys(obj, ZONE_KEYS, &ctx)?;
        let id = required_number(obj, "id", &ctx)?;
        if id >= MAX_CPUS as u64 {
            return Err(ctx.err("id", format!("{id} is out of range (0..{MAX_CPUS})")));
        }
        let id = id as u32;
        ctx.zone = Some(id.to_string());

        let regions = obj
            .get("memory_region")
            .ok_or_else(|| ctx.err("memory_region", "missing"))?
            .as_array()
            .ok_or_else(|| ctx.err("memory_region", "expected an array"))?;
        if regions.is_empty() {
            return Err(ctx.err("memory_region", "no RAM regions"));
        }
        let mut memory_regions = Vec::new();
        for (ri, region) in regions.iter().enumerate() {
            memory_regions.push(self.region(ri, region, &ctx)?);
        }
        check_region_overlap(&memory_regions, &ctx)?;

        let devices_value = obj
            .get("devices")
            .map(|d| {
                d.as_array()
                    .ok_or_else(|| ctx.err("devices", "expected an array"))
            })
            .transpose()?;
        let mut devices = Vec::new();
        for (di, dev) in devices_value.into_iter().flatten().enumerate() {
            if let Some(d) = self.device(di, dev, &ctx)? {
                devices.push(d);
            }
        }
        check_device_overlap(&devices, &ctx)?;

        let windows = match obj.get("virtio_windows") {
            Some(w) => self.windows(w, &ctx)?,
            None => devices
                .iter()
                .map(|d| Window {
                    base: d.addr,
                    size: d.len,
                })
                .collect(),
        };
        for d in &devices {
            let dctx = Ctx {
                zone: ctx.zone.clone(),
                device: Some(device_name(d.index, d.device_type.name)),
            };
            if !windows
                .iter()
                .any(|w| d.addr >= w.base && d.addr - w.base + d.len <= w.size)
            {
                return Err(dctx.err("addr", "device is outside every virtio window of the zone"));
            }
            if memory_regions.iter().any(|r| {
                d.addr < r.zonex_ipa.saturating_add(r.size) && r.zonex_ipa < d.addr + d.len
            }) {
                return Err(dctx.err("addr", "device window overlaps zone RAM"));
            }
        }
        Ok(ZoneConfig {
            id,
            memory_regions,
            devices,
            windows,
        })
    }

    fn region(&self, index: usize, value: &Value, ctx: &Ctx) -> Result<MemoryRegion, ConfigError> {
        let field = |name: &str| format!("memory_region[{index}].{name}");
        let obj = value
            .as_object()
            .ok_or_else(|| ctx.err(format!("memory_region[{index}]"), "expected an object"))?;
        let get = |name: &str| -> Result<u64, ConfigError> {
            let v = obj
                .get(name)
                .ok_or_else(|| ctx.err(field(name), "missing"))?;
            parse_number(v).map_err(|r| ctx.err(field(name), r))
        };
        let region = MemoryRegion {
            zone0_ipa: get("zone0_ipa")?,
            zonex_ipa: get("zonex_ipa")?,
            size: get("size")?,
        };
        if region.size == 0 {
            return Err(ctx.err(field("size"), "must be nonzero"));
        }
        let page = 4096;
        if !region.size.is_multiple_of(page)
            || !region.zone0_ipa.is_multiple_of(page)
            || !region.zonex_ipa.is_multiple_of(page)
        {
            return Err(ctx.err(field("size"), "addresses and size must be 4 KiB aligned"));
        }
        if region.zone0_ipa == 0 {
            // /dev/hvisor offset 0 is the bridge page, so RAM at physical 0 cannot be mapped.
            return Err(ctx.err(
                field("zone0_ipa"),
                "must be nonzero (offset 0 is the bridge page)",
            ));
        }
        if region.zone0_ipa.checked_add(region.size).is_none()
            || region.zonex_ipa.checked_add(region.size).is_none()
        {
            return Err(ctx.err(field("size"), "region wraps around the address space"));
        }
        Ok(region)
    }

    fn windows(&self, value: &Value, ctx: &Ctx) -> Result<Vec<Window>, ConfigError> {
        let arr = value
            .as_array()
            .ok_or_else(|| ctx.err("virtio_windows", "expected an array"))?;
        let mut out = Vec::new();
        for (i, w) in arr.iter().enumerate() {
            let obj = w
                .as_object()
                .ok_or_else(|| ctx.err(format!("virtio_windows[{i}]"), "expected an object"))?;
            let get = |name: &str| -> Result<u64, ConfigError> {
                let f = format!("virtio_windows[{i}].{name}");
                let v = obj.get(name).ok_or_else(|| ctx.err(&f, "missing"))?;
                parse_number(v).map_err(|r| ctx.err(&f, r))
            };
            let window = Window {
                base: get("base")?,
                size: get("size")?,
            };
            if window.size == 0 || window.base.checked_add(window.size).is_none() {
                return Err(ctx.err(format!("virtio_windows[{i}].size"), "invalid size"));
            }
            out.push(window);
        }
        Ok(out)
    }

    fn device(
        &self,
        index: usize,
        value: &Value,
        zone: &Ctx,
    ) -> Result<Option<DeviceConfig>, ConfigError> {
        let mut ctx = Ctx {
            zone: zone.zone.clone(),
            device: Some(format!("#{index}")),
        };
        let obj = value
            .as_object()
            .ok_or_else(|| ctx.err("<device>", "expected an object"))?;

        let status = match obj.get("status") {
            None => "enable",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(ctx.err("status", "expected \"enable\" or \"disable\"")),
        };
        let info = match (obj.get("type"), obj.get("device_id")) {
            (Some(Value::String(name)), None) => type_by_name(name).ok_or_else(|| {
                ctx.err(
                    "type",
                    format!("unknown device type \"{name}\"; use `device_id` for others"),
                )
            })?,
            (None, Some(id)) | (Some(Value::String(_)), Some(id)) => {
                let id = parse_number(id).map_err(|r| ctx.err("device_id", r))?;
                let id = u32::try_from(id)
                    .ok()
                    .filter(|&i| i != 0)
                    .ok_or_else(|| ctx.err("device_id", "must be a nonzero virtio device id"))?;
                if let Some(Value::String(name)) = obj.get("type") {
                    if type_by_name(name).is_some_and(|t| t.id != id) {
                        return Err(ctx.err("device_id", format!("contradicts type \"{name}\"")));
                    }
                }
                type_by_id(id)
            }
            (Some(_), _) => return Err(ctx.err("type", "expected a string")),
            (None, None) => return Err(ctx.err("type", "missing")),
        };
        ctx.device = Some(device_name(index, info.name));
        check_keys(obj, DEVICE_KEYS, &ctx)?;
        match status {
            "enable" => {}
            "disable" => return Ok(None),
            other => {
                return Err(ctx.err(
                    "status",
                    format!("\"{other}\" is neither \"enable\" nor \"disable\""),
                ))
            }
        }

        let addr = required_number(obj, "addr", &ctx)?;
        let len = required_number(obj, "len", &ctx)?;
        let irq = required_number(obj, "irq", &ctx)?;
        if addr == 0 {
            return Err(ctx.err("addr", "must be nonzero"));
        }
        if !addr.is_multiple_of(4) {
            return Err(ctx.err("addr", "must be 4-byte aligned"));
        }
        if !(MIN_DEVICE_LEN..=MAX_DEVICE_LEN).contains(&len) {
            return Err(ctx.err(
                "len",
                format!("must be between {MIN_DEVICE_LEN:#x} and {MAX_DEVICE_LEN:#x}"),
            ));
        }
        if addr.checked_add(len).is_none() {
            return Err(ctx.err("len", "window wraps around the address space"));
        }
        let irq = u32::try_from(irq)
            .ok()
            .filter(|&i| i != 0)
            .ok_or_else(|| ctx.err("irq", "must be a nonzero 32-bit interrupt id"))?;

        let backend_obj = match obj.get("backend") {
            None => None,
            Some(Value::Object(b)) => {
                check_keys(b, BACKEND_KEYS, &ctx)?;
                Some(b)
            }
            Some(_) => return Err(ctx.err("backend", "expected an object")),
        };
        // A field may be given at the device level (hvisor-tool style) or in `backend`, not both.
        let field = |name: &str| -> Result<Option<&Value>, ConfigError> {
            match (obj.get(name), backend_obj.and_then(|b| b.get(name))) {
                (Some(_), Some(_)) => {
                    Err(ctx.err(name, "given both in the device and in `backend`"))
                }
                (a, b) => Ok(a.or(b)),
            }
        };
        let num_queues = match field("num_queues")? {
            Some(v) => {
                let n = parse_number(v).map_err(|r| ctx.err("num_queues", r))?;
                if n == 0 || n > MAX_NUM_QUEUES {
                    return Err(ctx.err("num_queues", format!("must be 1..={MAX_NUM_QUEUES}")));
                }
                n as u16
            }
            None if info.num_queues == 0 => {
                return Err(ctx.err(
                    "num_queues",
                    "required for a device type without a known queue layout",
                ))
            }
            None => info.num_queues,
        };
        let queue_size = match field("queue_size")? {
            Some(v) => {
                let n = parse_number(v).map_err(|r| ctx.err("queue_size", r))?;
                if n == 0 || n > MAX_QUEUE_SIZE || !n.is_power_of_two() {
                    return Err(ctx.err(
                        "queue_size",
                        format!("must be a power of two, 1..={MAX_QUEUE_SIZE}"),
                    ));
                }
                n as u16
            }
            None => info.queue_size,
        };
        let bool_field = |name: &str| -> Result<bool, ConfigError> {
            match field(name)? {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(ctx.err(name, "expected true or false")),
            }
        };
        let read_only = bool_field("read_only")?;
        let direct = bool_field("direct")?;
        let serial = match field("serial")? {
            None => None,
            Some(Value::String(s)) if s.len() <= 20 => Some(s.clone()),
            Some(_) => return Err(ctx.err("serial", "expected a string of at most 20 bytes")),
        };
        let socket = match field("socket")? {
            None => None,
            Some(Value::String(s)) if !s.is_empty() => Some(self.resolve(s)),
            Some(_) => return Err(ctx.err("socket", "expected a non-empty path")),
        };
        let img = match obj.get("img") {
            None => None,
            Some(Value::String(s)) if !s.is_empty() => Some(self.resolve(s)),
            Some(_) => return Err(ctx.err("img", "expected a non-empty path")),
        };
        let tap = match obj.get("tap") {
            None => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() < 16 => Some(s.clone()),
            Some(_) => return Err(ctx.err("tap", "expected an interface name of 1..15 bytes")),
        };
        let mac = obj
            .get("mac")
            .map(|m| parse_mac(m).map_err(|r| ctx.err("mac", r)))
            .transpose()?;

        let backend = match (socket, info.name) {
            (Some(socket), _) => BackendSpec::External { socket },
            (None, "blk") => {
                let image = img.ok_or_else(|| {
                    ctx.err("img", "missing (or give `socket` for an external backend)")
                })?;
                if !image.exists() {
                    return Err(ctx.err("img", format!("{} does not exist", image.display())));
                }
                BackendSpec::SpawnBlk {
                    image,
                    read_only,
                    serial,
                    direct,
                }
            }
            (None, name) => {
                return Err(ctx.err(
                    "socket",
                    format!("a {name} device needs `socket` (a vhost-user backend to connect to)"),
                ))
            }
        };
        Ok(Some(DeviceConfig {
            index,
            device_type: DeviceType {
                id: info.id,
                name: info.name,
            },
            addr,
            len,
            irq,
            num_queues,
            queue_size,
            backend,
            tap,
            mac,
        }))
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

fn device_name(index: usize, type_name: &str) -> String {
    format!("#{index} ({type_name})")
}

fn required_number(obj: &Map<String, Value>, name: &str, ctx: &Ctx) -> Result<u64, ConfigError> {
    let v = obj.get(name).ok_or_else(|| ctx.err(name, "missing"))?;
    parse_number(v).map_err(|r| ctx.err(name, r))
}

fn check_keys(obj: &Map<String, Value>, allowed: &[&str], ctx: &Ctx) -> Result<(), ConfigError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ctx.err(k.as_str(), "unknown field")),
        None => Ok(()),
    }
}

fn parse_mac(value: &Value) -> Result<[u8; 6], String> {
    let items = value
        .as_array()
        .ok_or("expected an array of 6 numbers or strings")?;
    if items.len() != 6 {
        return Err(format!("expected 6 bytes, got {}", items.len()));
    }
    let mut mac = [0u8; 6];
    for (byte, item) in mac.iter_mut().zip(items) {
        let n = parse_number(item)?;
        *byte = u8::try_from(n).map_err(|_| format!("{n} is not a byte"))?;
    }
    Ok(mac)
}

fn check_region_overlap(regions: &[MemoryRegion], ctx: &Ctx) -> Result<(), ConfigError> {
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if a.zonex_ipa < b.zonex_ipa + b.size && b.zonex_ipa < a.zonex_ipa + a.size {
                return Err(ctx.err(format!("memory_region[{i}].zonex_ipa"), "regions overlap"));
            }
        }
    }
    Ok(())
}

fn check_device_overlap(devices: &[DeviceConfig], ctx: &Ctx) -> Result<(), ConfigError> {
    for (i, a) in devices.iter().enumerate() {
        for b in &devices[i + 1..] {
            let bctx = Ctx {
                zone: ctx.zone.clone(),
                device: Some(device_name(b.index, b.device_type.name)),
            };
            if a.addr < b.addr + b.len && b.addr < a.addr + a.len {
                return Err(bctx.err("addr", format!("window overlaps device #{}", a.index)));
            }
            if a.irq == b.irq {
                return Err(bctx.err(
                    "irq",
                    format!("irq {} is also used by device #{}", b.irq, a.index),
                ));
            }
        }
    }
    Ok(())
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
