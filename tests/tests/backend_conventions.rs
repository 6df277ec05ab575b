//! QEMU's vhost-user backend program conventions for every backend we ship:
//! `--print-capabilities` (given alone) prints the JSON document of QEMU's schema and exits.
//! (`--fd` shares one implementation; vhost-user-blk's CLI tests
//! serve a frontend through it.)

use std::process::Command;

use hvisor_vhost_tests::harness::bin_path;

fn capabilities(program: &str) -> serde_json::Value {
    let out = Command::new(bin_path(program))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success(), "{program}: {out:?}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{program}: not JSON ({e}): {out:?}"))
}

#[test]
fn every_backend_prints_its_capabilities() {
    for (program, device_type, features) in [
        ("vhost-user-blk", "block", &["read-only", "blk-file"][..]),
        ("vhost-user-net", "net", &[]),
        ("vhost-user-console", "console", &[]),
    ] {
        let caps = capabilities(program);
        assert_eq!(
            caps,
            serde_json::json!({ "type": device_type, "features": features }),
            "{program}"
        );
    }
}
