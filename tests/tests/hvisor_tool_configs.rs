//! hvisor-tool's `virtio_cfg.json` files through `hvisor-vhost-bridge --check`, unchanged.
//!
//! The example configs of hvisor-tool's repository are read from the hvisor source kit when it
//! is present (`$HVISOR_KIT`, else `../shared/hvisor-kit` beside the repository, where CI
//! has it): every one must pass, except those that enable a device hvisor-tool emulates
//! in-process (gpu, scmi), which must fail saying what to use instead. Configs of the same
//! shapes, written here, run whether or not the kit is there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hvisor_vhost_tests::harness::{bin_path, TempDir};
use serde_json::Value;

/// Runs `--check` on `config`, as a user would: from the config's directory.
fn check(config: &Path) -> Output {
    Command::new(bin_path("hvisor-vhost-bridge"))
        .arg("--check")
        .arg("--config")
        .arg(config)
        .current_dir(config.parent().unwrap())
        .env("RUST_LOG", "info")
        .output()
        .expect("run hvisor-vhost-bridge --check")
}

/// Creates the relative `img` files a config names, beside it, as on the board it was written
/// for (`--check` requires a spawned image to exist).
fn provide_images(config: &Path, json: &Value) {
    let dir = config.parent().unwrap();
    for device in devices(json) {
        if let Some(img) = device.get("img").and_then(Value::as_str) {
            if Path::new(img).is_relative() {
                std::fs::File::create(dir.join(img)).unwrap();
            }
        }
    }
}

fn devices(json: &Value) -> impl Iterator<Item = &Value> {
    json["zones"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|z| z["devices"].as_array().into_iter().flatten())
}

/// The in-process device type hvisor-tool would serve for this config that we refuse, if any.
fn enabled_in_process_device(json: &Value) -> Option<String> {
    devices(json)
        .filter(|d| d.get("status").and_then(Value::as_str) != Some("disable"))
        .filter(|d| d.get("socket").is_none())
        .filter_map(|d| d.get("type").and_then(Value::as_str))
        .find(|t| matches!(*t, "gpu" | "scmi"))
        .map(str::to_owned)
}

/// Checks one config: it passes, or (an enabled gpu or scmi) fails naming the alternative.
/// Returns the log, for the caller's own assertions.
fn assert_checks_like_hvisor_tool(config: &Path) -> String {
    let json: Value = serde_json::from_slice(&std::fs::read(config).unwrap()).unwrap();
    provide_images(config, &json);
    let out = check(config);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match enabled_in_process_device(&json) {
        None => assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).ends_with(": OK\n"),
            "{} refused:\n{stderr}",
            config.display()
        ),
        Some(kind) => {
            assert!(!out.status.success(), "{} accepted", config.display());
            let error = stderr
                .lines()
                .find(|l| l.contains(" ERROR "))
                .unwrap_or_else(|| panic!("{}: no error line:\n{stderr}", config.display()));
            assert!(
                error.contains(&format!("({kind}): field `socket`"))
                    && error.contains(&format!("vhost-device-{kind}"))
                    && error.contains(r#"set "status": "disable""#),
                "{}: the error does not say what to use instead: {error}",
                config.display()
            );
        }
    }
    stderr
}

/// The hvisor source kit, if this machine has it.
fn kit() -> Option<PathBuf> {
    let dir = match std::env::var_os("HVISOR_KIT") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/hvisor-kit"),
    };
    dir.join("SHA256SUMS").exists().then_some(dir)
}

/// Every `*.json` under `dir` whose top level has `zones`: hvisor-tool's virtio configs (its
/// zone configs have none).
fn virtio_configs(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            virtio_configs(&path, found);
        } else if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read(&path).unwrap();
            if serde_json::from_slice::<Value>(&text).is_ok_and(|v| v.get("zones").is_some()) {
                found.push(path);
            }
        }
    }
}

#[test]
fn every_example_config_of_hvisor_tool_checks_unchanged() {
    let Some(kit) = kit() else {
        eprintln!("no hvisor source kit (HVISOR_KIT): hvisor-tool's own examples not checked");
        return;
    };
    let dir = TempDir::new("hvisor-tool-examples");
    let mut tarballs = 0;
    for entry in std::fs::read_dir(&kit).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("hvisor-tool-") && name.ends_with(".tar.gz")) {
            continue;
        }
        tarballs += 1;
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(entry.path())
            .arg("-C")
            .arg(dir.path())
            .args(["--wildcards", "*/examples/*"])
            .status()
            .expect("run tar");
        assert!(status.success(), "cannot extract {name}");
    }
    assert!(tarballs > 0, "no hvisor-tool tarball in {}", kit.display());
    let mut configs = Vec::new();
    virtio_configs(dir.path(), &mut configs);
    configs.sort();
    // hvisor-tool's examples hold a dozen or so per commit; far fewer means the search broke.
    assert!(configs.len() >= 5 * tarballs, "only {configs:?}");
    let mut refused = 0;
    for config in &configs {
        let json: Value = serde_json::from_slice(&std::fs::read(config).unwrap()).unwrap();
        refused += usize::from(enabled_in_process_device(&json).is_some());
        assert_checks_like_hvisor_tool(config);
    }
    eprintln!(
        "{} hvisor-tool example configs checked, {refused} refused for an in-process gpu or scmi",
        configs.len()
    );
}

/// The shapes of hvisor-tool's example configs, written for this test: a board with blk,
/// console and a disabled net; an x86 one with net, blk and console and big addresses; a gpu
/// on its own, enabled and disabled; and a disabled scmi with its lists.
const SHAPES: &[(&str, &str)] = &[
    (
        "board",
        r#"{"zones":[{"id":1,"memory_region":[{"zone0_ipa":"0x50000000","zonex_ipa":"0x50000000","size":"0x30000000"}],
            "devices":[
              {"type":"blk","addr":"0x38d00000","len":"0x200","irq":75,"img":"disk.ext4","status":"enable"},
              {"type":"console","addr":"0x38d00200","len":"0x200","irq":76,"status":"enable"},
              {"type":"net","addr":"0x38d00400","len":"0x200","irq":77,"tap":"tap0","mac":["0x00","0x16","0x3e","0x10","0x10","0x10"],"status":"disable"}]}]}"#,
    ),
    (
        "x86",
        r#"{"zones":[{"id":1,"memory_region":[{"zone0_ipa":"0x100000000","zonex_ipa":"0x0","size":"0x20000000"}],
            "devices":[
              {"type":"console","addr":"0x119220000","len":"0x200","irq":4,"status":"enable"},
              {"type":"net","addr":"0x119220200","len":"0x200","irq":5,"tap":"tap0","mac":["0x00","0x16","0x3e","0x10","0x10","0x10"],"status":"enable"},
              {"type":"blk","addr":"0x119220400","len":"0x200","irq":6,"img":"disk.img","status":"enable"}]}]}"#,
    ),
    (
        "gpu-enabled",
        r#"{"zones":[{"id":1,"memory_region":[{"zone0_ipa":"0x50000000","zonex_ipa":"0x50000000","size":"0x30000000"}],
            "devices":[{"type":"gpu","addr":"0xa003400","len":"0x200","irq":74,"status":"enable","width":1280,"height":800}]}]}"#,
    ),
    (
        "gpu-disabled",
        r#"{"zones":[{"id":1,"memory_region":[{"zone0_ipa":"0x50000000","zonex_ipa":"0x50000000","size":"0x30000000"}],
            "devices":[
              {"type":"blk","addr":"0xa003c00","len":"0x200","irq":78,"img":"disk.ext4","status":"enable"},
              {"type":"gpu","addr":"0xa003400","len":"0x200","irq":74,"status":"disable","width":1280,"height":800}]}]}"#,
    ),
    (
        "scmi-disabled",
        r#"{"zones":[{"id":1,"memory_region":[{"zone0_ipa":"0x50000000","zonex_ipa":"0x50000000","size":"0x30000000"}],
            "devices":[
              {"type":"console","addr":"0xa003800","len":"0x200","irq":76,"status":"enable"},
              {"type":"scmi","addr":"0xa003600","len":"0x200","irq":79,"status":"disable",
               "allowed_list":{"clock_ids":["*"],"reset_ids":[0]},"reset_map":{"0":523},"clk_phandle":3}]}]}"#,
    ),
];

#[test]
fn configs_shaped_like_hvisor_tools_check_unchanged() {
    let dir = TempDir::new("hvisor-tool-shapes");
    for (name, text) in SHAPES {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let config = sub.join("virtio_cfg.json");
        std::fs::write(&config, text).unwrap();
        let log = assert_checks_like_hvisor_tool(&config);
        if name.ends_with("-disabled") {
            let kind = name.split('-').next().unwrap();
            assert!(
                log.lines().any(|l| l.contains(" WARN ")
                    && l.contains(&format!("({kind}): field `status`: disabled;"))
                    && l.contains(&format!("vhost-device-{kind}"))),
                "{name}: no warning for the disabled {kind}:\n{log}"
            );
        }
    }
}
