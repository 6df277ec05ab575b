//! Which program serves the blk devices of an end-to-end test: our `vhost-user-blk`, which
//! the bridge spawns for an entry with `img`, or qemu-storage-daemon, which the test starts
//! for each such entry and which the bridge reaches through `socket` as any external backend.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::harness::Process;

/// The environment variable that selects the backend: `ours` (the default) or `qsd`.
pub const BLK_BACKEND_ENV: &str = "HVV_BLK_BACKEND";

/// The qemu-storage-daemon program; `HVV_QSD` overrides the one on `PATH`.
const QSD_ENV: &str = "HVV_QSD";

/// How long qemu-storage-daemon may take to create its socket (it takes well under 0.1 s).
const QSD_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A blk backend for the end-to-end tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkBackend {
    /// Our `vhost-user-blk`, spawned by the bridge.
    Ours,
    /// qemu-storage-daemon's `vhost-user-blk` export, started by the test.
    Qsd,
}

impl BlkBackend {
    /// The backend `HVV_BLK_BACKEND` names; ours when it is unset. Any other value fails the
    /// test rather than silently running against the default.
    pub fn from_env() -> BlkBackend {
        match std::env::var_os(BLK_BACKEND_ENV) {
            None => BlkBackend::Ours,
            Some(name) if name == "ours" => BlkBackend::Ours,
            Some(name) if name == "qsd" => BlkBackend::Qsd,
            Some(name) => panic!("{BLK_BACKEND_ENV}={name:?}: expected \"ours\" or \"qsd\""),
        }
    }

    /// What GET_ID returns for a device configured with `serial`. qemu-storage-daemon's
    /// vhost-user-blk export has no serial option; it always answers with its own id.
    pub fn get_id_for(self, serial: &str) -> &str {
        match self {
            BlkBackend::Ours => serial,
            BlkBackend::Qsd => QSD_GET_ID,
        }
    }

    /// True if the bridge starts and stops the backend; an external one outlives it.
    pub fn spawned_by_bridge(self) -> bool {
        self == BlkBackend::Ours
    }

    /// Prepares `config_json` for this backend. For qemu-storage-daemon, every enabled blk
    /// entry with `img` gets a daemon exporting that image on a socket in `dir`, and the
    /// entry names that socket instead; `read_only`, `direct` and `num_queues` become the
    /// daemon's options, and `serial` (which it cannot take) is dropped. Returns the config
    /// to run and the daemons, which must outlive the bridge.
    pub fn prepare(self, config_json: &str, dir: &Path) -> (String, Vec<Process>) {
        match self {
            BlkBackend::Ours => (config_json.to_string(), Vec::new()),
            BlkBackend::Qsd => export_blk_images(config_json, dir),
        }
    }
}

/// The id qemu-storage-daemon's vhost-user-blk export returns for GET_ID.
const QSD_GET_ID: &str = "vhost_user_blk";

/// The options of one qemu-storage-daemon export, taken from a blk entry.
#[derive(Debug)]
struct QsdExport {
    image: PathBuf,
    socket: PathBuf,
    pidfile: PathBuf,
    read_only: bool,
    direct: bool,
    num_queues: Option<u64>,
}

impl QsdExport {
    fn command(&self) -> Command {
        let program = std::env::var_os(QSD_ENV).unwrap_or_else(|| "qemu-storage-daemon".into());
        let on_off = |on: bool| if on { "on" } else { "off" };
        let mut blockdev = format!(
            "driver=file,node-name=disk,filename={},cache.direct={}",
            qsd_escape(&self.image),
            on_off(self.direct)
        );
        if self.read_only {
            blockdev.push_str(",read-only=on");
        }
        let mut export = format!(
            "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable={}",
            qsd_escape(&self.socket),
            on_off(!self.read_only)
        );
        if let Some(n) = self.num_queues {
            export.push_str(&format!(",num-queues={n}"));
        }
        let mut cmd = Command::new(program);
        cmd.arg("--blockdev")
            .arg(blockdev)
            .arg("--export")
            .arg(export)
            .arg("--pidfile")
            .arg(&self.pidfile);
        cmd
    }

    /// Starts the daemon and waits for its socket.
    fn start(&self) -> Process {
        let _ = std::fs::remove_file(&self.socket);
        let mut daemon = Process::spawn("qemu-storage-daemon", &mut self.command());
        let deadline = Instant::now() + QSD_START_TIMEOUT;
        // Nothing signals that another process bound a socket but the path appearing.
        while !self.socket.exists() {
            if let Some(status) = daemon.wait_timeout(Duration::from_millis(5)) {
                panic!(
                    "qemu-storage-daemon for {} exited before creating {} ({status})",
                    self.image.display(),
                    self.socket.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not create {} within {QSD_START_TIMEOUT:?}",
                self.socket.display()
            );
        }
        daemon
    }
}

/// QEMU's option syntax doubles a comma inside a value.
fn qsd_escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

fn export_blk_images(config_json: &str, dir: &Path) -> (String, Vec<Process>) {
    let mut root: Value = serde_json::from_str(config_json).expect("test config is JSON");
    let mut daemons = Vec::new();
    let zones = root
        .get_mut("zones")
        .and_then(Value::as_array_mut)
        .expect("test config has zones");
    for zone in zones {
        let zone_id = zone.get("id").and_then(Value::as_u64).unwrap_or(0);
        let Some(devices) = zone.get_mut("devices").and_then(Value::as_array_mut) else {
            continue;
        };
        for (index, device) in devices.iter_mut().enumerate() {
            let Some(entry) = device.as_object_mut() else {
                continue;
            };
            let tag = format!("z{zone_id}-{index}");
            if let Some(export) = take_blk_export(entry, dir, &tag) {
                daemons.push(export.start());
                entry.insert(
                    "socket".into(),
                    Value::String(export.socket.display().to_string()),
                );
            }
        }
    }
    (root.to_string(), daemons)
}

/// Removes the fields of an enabled blk entry with `img` that the spawned backend would
/// have used, and returns them as a qemu-storage-daemon export.
fn take_blk_export(entry: &mut Map<String, Value>, dir: &Path, tag: &str) -> Option<QsdExport> {
    let is_blk = entry.get("type").and_then(Value::as_str) == Some("blk");
    let enabled = entry.get("status").and_then(Value::as_str) != Some("disable");
    let image = entry.get("img").and_then(Value::as_str)?.to_string();
    if !is_blk || !enabled {
        return None;
    }
    entry.remove("img");
    // Backend fields may sit in the entry or in its `backend` object.
    let mut take = |name: &str| -> Option<Value> {
        let direct = entry.remove(name);
        let nested = entry
            .get_mut("backend")
            .and_then(Value::as_object_mut)
            .and_then(|b| b.remove(name));
        direct.or(nested)
    };
    let read_only = take("read_only").and_then(|v| v.as_bool()) == Some(true);
    let direct = take("direct").and_then(|v| v.as_bool()) == Some(true);
    take("serial");
    let num_queues = entry
        .get("num_queues")
        .or_else(|| entry.get("backend").and_then(|b| b.get("num_queues")))
        .and_then(Value::as_u64);
    if entry
        .get("backend")
        .and_then(Value::as_object)
        .is_some_and(Map::is_empty)
    {
        entry.remove("backend");
    }
    Some(QsdExport {
        image: dir.join(image),
        socket: dir.join(format!("qsd-{tag}.sock")),
        pidfile: dir.join(format!("qsd-{tag}.pid")),
        read_only,
        direct,
        num_queues,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_entries_become_external_and_others_stay() {
        let config = r#"{"zones":[{"id":1,"devices":[
            {"type":"blk","img":"a.img","read_only":true,"backend":{"serial":"s","num_queues":2}},
            {"type":"blk","img":"b.img","status":"disable"},
            {"type":"net","tap":"tap0"}]}]}"#;
        let mut root: Value = serde_json::from_str(config).unwrap();
        let devices = root["zones"][0]["devices"].as_array_mut().unwrap();
        let dir = Path::new("/scratch");
        let export = take_blk_export(devices[0].as_object_mut().unwrap(), dir, "z1-0").unwrap();
        assert_eq!(export.image, dir.join("a.img"));
        assert!(export.read_only);
        assert!(!export.direct);
        assert_eq!(export.num_queues, Some(2));
        assert_eq!(
            devices[0],
            serde_json::json!({"type":"blk","backend":{"num_queues":2}})
        );
        assert!(take_blk_export(devices[1].as_object_mut().unwrap(), dir, "z1-1").is_none());
        assert!(take_blk_export(devices[2].as_object_mut().unwrap(), dir, "z1-2").is_none());

        let args: Vec<String> = export
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "--blockdev");
        assert!(
            args[1].ends_with(",cache.direct=off,read-only=on"),
            "{}",
            args[1]
        );
        assert!(
            args[3].contains(",writable=off,num-queues=2"),
            "{}",
            args[3]
        );
    }

    #[test]
    fn commas_in_paths_are_doubled() {
        assert_eq!(qsd_escape(Path::new("/a,b/c")), "/a,,b/c");
    }
}
