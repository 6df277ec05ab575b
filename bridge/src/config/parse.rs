//! Parsing and validating a config: hvisor-tool's keys, our backend keys, and the checks
//! across devices and zones (overlaps, shared images, IRQ limits).

use super::*;

impl Config {
    /// Reads and validates a config file. Relative `img` and `socket` paths are resolved
    /// against the file's directory, as a user editing the file expects.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Self::from_file_for(path, HvisorAbi::CURRENT)
    }

    /// [`Config::from_file`] for an hvisor built with `abi`'s limits (devices, pending IRQs).
    pub fn from_file_for(path: &Path, abi: HvisorAbi) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            zone: None,
            device: None,
            field: "<file>".into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        // `Path::new("cfg.json").parent()` is the empty path; an absolute base keeps the
        // resolved paths valid whatever the working directory of a spawned backend.
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        Self::parse_for(&text, &base, abi)
    }

    /// Parses and validates config text; `base_dir` resolves relative paths.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        Self::parse_for(text, base_dir, HvisorAbi::CURRENT)
    }

    /// [`Config::parse`] for an hvisor built with `abi`'s limits.
    pub fn parse_for(text: &str, base_dir: &Path, abi: HvisorAbi) -> Result<Config, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|e| ConfigError {
            zone: None,
            device: None,
            field: "<json>".into(),
            reason: format!("invalid JSON: {e}"),
        })?;
        let parser = Parser {
            base_dir,
            abi,
            warnings: Default::default(),
        };
        let mut config = parser.config(&root)?;
        config.warnings = parser.warnings.into_inner();
        Ok(config)
    }
}

pub(super) struct Parser<'a> {
    pub(super) base_dir: &'a Path,
    pub(super) abi: HvisorAbi,
    pub(super) warnings: std::cell::RefCell<Vec<String>>,
}

/// Error-building context: which zone and device we are in.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) zone: Option<String>,
    pub(super) device: Option<String>,
}

impl Ctx {
    pub(super) fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
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

pub(super) fn parse_c_integer(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let (digits, radix) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (hex, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    // `from_str_radix` would take a sign ("0x+10", "-1"); a sign is never meant here.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("\"{text}\" is not a number"));
    }
    u64::from_str_radix(digits, radix).map_err(|e| format!("\"{text}\" is not a number ({e})"))
}

pub(super) const ROOT_KEYS: &[&str] = &["zones"];
// `name` appears in hvisor-tool's LoongArch examples; it is only a label.
pub(super) const ZONE_KEYS: &[&str] = &["id", "name", "memory_region", "devices", "virtio_windows"];
pub(super) const REGION_KEYS: &[&str] = &["zone0_ipa", "zonex_ipa", "size"];
pub(super) const WINDOW_KEYS: &[&str] = &["base", "size"];
// hvisor-tool's device fields come first. Those of its in-process gpu and scmi are accepted
// besides these (see hvisor_tool.rs).
pub(super) const DEVICE_KEYS: &[&str] = &[
    "type",
    "device_id",
    "addr",
    "len",
    "irq",
    "status",
    "img",
    "tap",
    "mac",
    "socket",
    "queue_size",
    "num_queues",
    "read_only",
    "serial",
    "direct",
    "io_engine",
    "backend",
];
/// Fields that configure the `vhost-user-blk` the bridge spawns, and nothing else.
pub(super) const SPAWNED_BLK_KEYS: &[&str] = &["read_only", "serial", "direct", "io_engine"];
pub(super) const BACKEND_KEYS: &[&str] = &[
    "socket",
    "queue_size",
    "num_queues",
    "read_only",
    "serial",
    "direct",
    "io_engine",
];

impl Parser<'_> {
    pub(super) fn config(&self, root: &Value) -> Result<Config, ConfigError> {
        let top = Ctx {
            zone: None,
            device: None,
        };
        let obj = root
            .as_object()
            .ok_or_else(|| top.err("<root>", "expected a JSON object with `zones`"))?;
        check_keys(obj, ROOT_KEYS, "", &top)?;
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
        let mut enabled = 0;
        let mut images = Vec::new();
        for (zi, zone) in zones.iter().enumerate() {
            let z = self.zone(zi, zone)?;
            let ctx = Ctx {
                zone: Some(z.id.to_string()),
                device: None,
            };
            if !ids.insert(z.id) {
                return Err(ctx.err("id", "duplicate zone id"));
            }
            check_root_ram_overlap(&config.zones, &z, &ctx)?;
            // hvisor-tool's `vdevs[MAX_DEVS]` (and hvisor's per-CPU IRQ list) count devices of
            // all zones together.
            for d in &z.devices {
                enabled += 1;
                let max_devs = self.abi.max_devs;
                if enabled > max_devs {
                    let dctx = Ctx {
                        zone: ctx.zone.clone(),
                        device: Some(device_name(d.index, d.device_type.name)),
                    };
                    return Err(dctx.err(
                        "status",
                        format!(
                            "enabled device number {enabled}; hvisor serves at most {max_devs} \
                             across all zones"
                        ),
                    ));
                }
                check_image_sharing(&mut images, z.id, d, &ctx)?;
            }
            check_zone_irqs(&z, self.abi, &ctx)?;
            config.zones.push(z);
        }
        Ok(config)
    }

    pub(super) fn zone(&self, index: usize, value: &Value) -> Result<ZoneConfig, ConfigError> {
        let mut ctx = Ctx {
            zone: Some(format!("#{index}")),
            device: None,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| ctx.err("<zone>", "expected an object"))?;
        check_keys(obj, ZONE_KEYS, "", &ctx)?;
        let id = required_number(obj, "id", &ctx)?;
        if id >= MAX_CPUS as u64 {
            return Err(ctx.err("id", format!("{id} is out of range (0..{MAX_CPUS})")));
        }
        let id = id as u32;
        ctx.zone = Some(id.to_string());
        if obj.get("name").is_some_and(|n| !n.is_string()) {
            return Err(ctx.err("name", "expected a string"));
        }

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
            Some(w) => self.windows(w, &memory_regions, &ctx)?,
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
            // Windows never overlap each other, so a device lies in at most one of them.
            if !windows
                .iter()
                .any(|w| d.addr >= w.base && d.addr - w.base + d.len <= w.size)
            {
                return Err(dctx.err(
                    "addr",
                    "the device's registers are not inside one virtio window of the zone",
                ));
            }
            if let Some(ri) = memory_regions
                .iter()
                .position(|r| ranges_overlap(d.addr, d.len, r.zonex_ipa, r.size))
            {
                return Err(dctx.err(
                    "addr",
                    format!("device window overlaps zone RAM (memory_region[{ri}])"),
                ));
            }
        }
        Ok(ZoneConfig {
            id,
            memory_regions,
            devices,
            windows,
        })
    }

    pub(super) fn region(
        &self,
        index: usize,
        value: &Value,
        ctx: &Ctx,
    ) -> Result<MemoryRegion, ConfigError> {
        let field = |name: &str| format!("memory_region[{index}].{name}");
        let obj = value
            .as_object()
            .ok_or_else(|| ctx.err(format!("memory_region[{index}]"), "expected an object"))?;
        check_keys(obj, REGION_KEYS, &field(""), ctx)?;
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
        for (name, v) in [
            ("zone0_ipa", region.zone0_ipa),
            ("zonex_ipa", region.zonex_ipa),
            ("size", region.size),
        ] {
            if !v.is_multiple_of(page) {
                return Err(ctx.err(field(name), format!("{v:#x} is not 4 KiB aligned")));
            }
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

    /// The zone's trap regions. hvisor keeps one MMIO region per address, so windows must not
    /// overlap each other, and a window over RAM would take that RAM away from the guest.
    pub(super) fn windows(
        &self,
        value: &Value,
        memory_regions: &[MemoryRegion],
        ctx: &Ctx,
    ) -> Result<Vec<Window>, ConfigError> {
        let arr = value
            .as_array()
            .ok_or_else(|| ctx.err("virtio_windows", "expected an array"))?;
        let mut out: Vec<Window> = Vec::new();
        for (i, w) in arr.iter().enumerate() {
            let obj = w
                .as_object()
                .ok_or_else(|| ctx.err(format!("virtio_windows[{i}]"), "expected an object"))?;
            check_keys(obj, WINDOW_KEYS, &format!("virtio_windows[{i}]."), ctx)?;
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
                return Err(ctx.err(
                    format!("virtio_windows[{i}].size"),
                    "must be nonzero and end inside the address space",
                ));
            }
            if let Some(j) = out
                .iter()
                .position(|o| ranges_overlap(o.base, o.size, window.base, window.size))
            {
                return Err(ctx.err(
                    format!("virtio_windows[{i}].base"),
                    format!("window overlaps virtio_windows[{j}]"),
                ));
            }
            if let Some(ri) = memory_regions
                .iter()
                .position(|r| ranges_overlap(r.zonex_ipa, r.size, window.base, window.size))
            {
                return Err(ctx.err(
                    format!("virtio_windows[{i}].base"),
                    format!("window overlaps zone RAM (memory_region[{ri}])"),
                ));
            }
            out.push(window);
        }
        Ok(out)
    }

    pub(super) fn device(
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
                    match type_by_name(name) {
                        None => {
                            return Err(ctx.err(
                                "type",
                                format!(
                                    "unknown device type \"{name}\"; leave `type` out when `device_id` names the device"
                                ),
                            ))
                        }
                        Some(t) if t.id != id => {
                            return Err(ctx.err("device_id", format!("contradicts type \"{name}\"")))
                        }
                        Some(_) => {}
                    }
                }
                type_by_id(id)
            }
            (Some(_), _) => return Err(ctx.err("type", "expected a string")),
            (None, None) => return Err(ctx.err("type", "missing")),
        };
        ctx.device = Some(device_name(index, info.name));
        if let Some(k) = obj
            .keys()
            .find(|k| !DEVICE_KEYS.contains(&k.as_str()) && !hvisor_tool::is_tool_only_key(k))
        {
            return Err(ctx.err(k.as_str(), "unknown field"));
        }
        let tool_only = hvisor_tool::tool_only_keys(obj.keys());
        match status {
            "enable" => {}
            "disable" => {
                if let Some(instead) = hvisor_tool::served_instead(info.name) {
                    self.warn(
                        &ctx,
                        "status",
                        format!(
                            "disabled; hvisor-vhost serves a {} only through {instead}",
                            info.name
                        ),
                    );
                } else if !tool_only.is_empty() {
                    self.warn(
                        &ctx,
                        tool_only[0],
                        "disabled device: hvisor-tool's fields ignored",
                    );
                }
                return Ok(None);
            }
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
        // Config space is reached only through the trapped window.
        let needed = MIN_DEVICE_LEN + config_space_len(info.id) as u64;
        if len < needed {
            return Err(ctx.err(
                "len",
                format!(
                    "{len:#x} cuts off the {} config space (needs at least {needed:#x})",
                    info.name
                ),
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
                check_keys(b, BACKEND_KEYS, "backend.", &ctx)?;
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
        let io_engine = match field("io_engine")? {
            None => None,
            Some(Value::String(s)) if s == "sync" => Some(BlkIoEngine::Sync),
            Some(Value::String(s)) if s == "io_uring" => Some(BlkIoEngine::IoUring),
            Some(_) => return Err(ctx.err("io_engine", "expected \"sync\" or \"io_uring\"")),
        };
        let socket = match field("socket")? {
            None => None,
            Some(Value::String(s)) if !s.is_empty() => Some(self.resolve(s)),
            Some(_) => return Err(ctx.err("socket", "expected a non-empty path")),
        };
        // Silently ignoring them could, for one, serve a disk meant to be read-only writable.
        for &name in SPAWNED_BLK_KEYS {
            if field(name)?.is_none() {
                continue;
            }
            if socket.is_some() {
                return Err(ctx.err(
                    name,
                    "applies to the backend the bridge spawns; with `socket`, set it on \
                     the external backend",
                ));
            }
            if info.name != "blk" {
                return Err(ctx.err(name, "applies only to a blk device"));
            }
        }
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
                    io_engine,
                }
            }
            (None, "net") => BackendSpec::SpawnNet {
                tap: tap.clone().ok_or_else(|| {
                    ctx.err("tap", "missing (or give `socket` for an external backend)")
                })?,
                mac,
            },
            (None, "console") => BackendSpec::SpawnConsole,
            (None, name) => {
                let reason = match hvisor_tool::served_instead(name) {
                    Some(instead) => format!(
                        "hvisor-tool emulates a {name} itself, hvisor-vhost does not: use \
                         {instead}, or set \"status\": \"disable\""
                    ),
                    None => {
                        format!(
                            "a {name} device needs `socket` (a vhost-user backend to connect to)"
                        )
                    }
                };
                return Err(ctx.err("socket", reason));
            }
        };
        if let Some(field) = tool_only.first() {
            // The external backend takes its own options; these would silently do nothing.
            self.warn(
                &ctx,
                field,
                "hvisor-tool's field, ignored: configure the backend instead",
            );
        }
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

    /// Records a warning located like an error.
    pub(super) fn warn(&self, ctx: &Ctx, field: &str, reason: impl Into<String>) {
        self.warnings
            .borrow_mut()
            .push(ctx.err(field, reason).to_string());
    }

    pub(super) fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

pub(super) fn device_name(index: usize, type_name: &str) -> String {
    format!("#{index} ({type_name})")
}

pub(super) fn required_number(
    obj: &Map<String, Value>,
    name: &str,
    ctx: &Ctx,
) -> Result<u64, ConfigError> {
    let v = obj.get(name).ok_or_else(|| ctx.err(name, "missing"))?;
    parse_number(v).map_err(|r| ctx.err(name, r))
}

/// Rejects keys outside `allowed`; `prefix` places the key in the error, e.g. `backend.`.
pub(super) fn check_keys(
    obj: &Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
    ctx: &Ctx,
) -> Result<(), ConfigError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ctx.err(format!("{prefix}{k}"), "unknown field")),
        None => Ok(()),
    }
}

/// True if `[a, a + a_len)` and `[b, b + b_len)` intersect; callers have checked that
/// neither range wraps.
pub(super) fn ranges_overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b + b_len && b < a + a_len
}

pub(super) fn parse_mac(value: &Value) -> Result<[u8; 6], String> {
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

/// Within a zone, neither the guest addresses nor the root-Linux addresses of two regions may
/// overlap: either way one byte would have two meanings.
pub(super) fn check_region_overlap(regions: &[MemoryRegion], ctx: &Ctx) -> Result<(), ConfigError> {
    for (j, b) in regions.iter().enumerate() {
        for (i, a) in regions[..j].iter().enumerate() {
            if ranges_overlap(a.zonex_ipa, a.size, b.zonex_ipa, b.size) {
                return Err(ctx.err(
                    format!("memory_region[{j}].zonex_ipa"),
                    format!("overlaps memory_region[{i}] in guest memory"),
                ));
            }
            if ranges_overlap(a.zone0_ipa, a.size, b.zone0_ipa, b.size) {
                return Err(ctx.err(
                    format!("memory_region[{j}].zone0_ipa"),
                    format!("overlaps memory_region[{i}] in root memory"),
                ));
            }
        }
    }
    Ok(())
}

/// An image served by two spawned backends must be read-only in both: two writers would
/// corrupt it (and our blk backend's image lock would refuse the second one at start).
pub(super) fn check_image_sharing(
    seen: &mut Vec<(PathBuf, bool, String)>,
    zone: u32,
    device: &DeviceConfig,
    ctx: &Ctx,
) -> Result<(), ConfigError> {
    let BackendSpec::SpawnBlk {
        image, read_only, ..
    } = &device.backend
    else {
        return Ok(());
    };
    // The same file may be named through different relative paths or links.
    let canonical = std::fs::canonicalize(image).unwrap_or_else(|_| image.clone());
    let name = device_name(device.index, device.device_type.name);
    if let Some((_, _, other)) = seen
        .iter()
        .find(|(path, ro, _)| *path == canonical && !(*ro && *read_only))
    {
        let dctx = Ctx {
            zone: ctx.zone.clone(),
            device: Some(name),
        };
        return Err(dctx.err(
            "img",
            format!(
                "{} is also served by {other}; a shared image must be read_only in both",
                image.display()
            ),
        ));
    }
    seen.push((canonical, *read_only, format!("zone {zone} device {name}")));
    Ok(())
}

/// hvisor queues a zone's virtio interrupts on the zone's first CPU and keeps at most
/// `MAX_DEVS - 1` distinct pending ones per CPU: one more trips an assertion at EL2, which
/// stops that CPU for good. A zone with more distinct device IRQs than that could reach it
/// whenever all its devices complete at once, so it is refused here.
pub(super) fn check_zone_irqs(
    zone: &ZoneConfig,
    abi: HvisorAbi,
    ctx: &Ctx,
) -> Result<(), ConfigError> {
    let limit = abi.max_pending_irqs();
    let irqs: BTreeSet<u32> = zone.devices.iter().map(|d| d.irq).collect();
    if irqs.len() > limit {
        return Err(ctx.err(
            "devices",
            format!(
                "{} distinct device IRQs; hvisor keeps at most {limit} pending virtio IRQs per \
                 CPU (MAX_DEVS {} - 1) and sends all of a zone's to its first CPU",
                irqs.len(),
                abi.max_devs
            ),
        ));
    }
    Ok(())
}

/// Two zones never share RAM: a region of `zone` whose root-Linux range overlaps one of an
/// earlier zone would let each guest overwrite the other.
pub(super) fn check_root_ram_overlap(
    earlier: &[ZoneConfig],
    zone: &ZoneConfig,
    ctx: &Ctx,
) -> Result<(), ConfigError> {
    for (j, b) in zone.memory_regions.iter().enumerate() {
        for other in earlier {
            if let Some(i) = other
                .memory_regions
                .iter()
                .position(|a| ranges_overlap(a.zone0_ipa, a.size, b.zone0_ipa, b.size))
            {
                return Err(ctx.err(
                    format!("memory_region[{j}].zone0_ipa"),
                    format!(
                        "overlaps zone {} memory_region[{i}] in root memory",
                        other.id
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn check_device_overlap(devices: &[DeviceConfig], ctx: &Ctx) -> Result<(), ConfigError> {
    for (i, a) in devices.iter().enumerate() {
        for b in &devices[i + 1..] {
            let bctx = Ctx {
                zone: ctx.zone.clone(),
                device: Some(device_name(b.index, b.device_type.name)),
            };
            if ranges_overlap(a.addr, a.len, b.addr, b.len) {
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
