//! Keeps docs/abi.md true: every row of its layout tables must match the Rust ABI structs,
//! and every field of the structs must have a row.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};

use hvisor_hsm::abi::{DeviceReq, DeviceRes, HvisorAbi, VirtioBridge};

/// `(offset, size)` of each field, from the compiler.
fn layout() -> BTreeMap<(&'static str, &'static str), (usize, usize)> {
    let mut m = BTreeMap::new();
    macro_rules! field {
        ($table:literal, $ty:ty, $field:ident, $size:expr) => {
            m.insert(
                ($table, stringify!($field)),
                (offset_of!($ty, $field), $size),
            );
        };
    }
    field!("device_req", DeviceReq, src_cpu, 8);
    field!("device_req", DeviceReq, address, 8);
    field!("device_req", DeviceReq, size, 8);
    field!("device_req", DeviceReq, value, 8);
    field!("device_req", DeviceReq, src_zone, 4);
    field!("device_req", DeviceReq, is_write, 1);
    field!("device_req", DeviceReq, need_interrupt, 1);
    field!("device_req", DeviceReq, padding, 2);
    field!("device_res", DeviceRes, target_zone, 4);
    field!("device_res", DeviceRes, irq_id, 4);
    field!("virtio_bridge", VirtioBridge, req_front, 4);
    field!("virtio_bridge", VirtioBridge, req_rear, 4);
    field!("virtio_bridge", VirtioBridge, res_front, 4);
    field!("virtio_bridge", VirtioBridge, res_rear, 4);
    field!(
        "virtio_bridge",
        VirtioBridge,
        req_list,
        32 * size_of::<DeviceReq>()
    );
    field!(
        "virtio_bridge",
        VirtioBridge,
        res_list,
        32 * size_of::<DeviceRes>()
    );
    field!("virtio_bridge", VirtioBridge, cfg_flags, 32 * 8);
    field!("virtio_bridge", VirtioBridge, cfg_values, 32 * 8);
    field!("virtio_bridge", VirtioBridge, mmio_addrs, 8 * 8);
    field!("virtio_bridge", VirtioBridge, mmio_avail, 1);
    field!("virtio_bridge", VirtioBridge, need_wakeup, 1);
    m
}

fn parse_number(s: &str) -> usize {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => usize::from_str_radix(hex, 16).unwrap(),
        None => s.parse().unwrap(),
    }
}

/// `(table, field) -> (offset, size)`.
type Rows = BTreeMap<(String, String), (usize, usize)>;

/// Rows `(table, field) -> (offset, size)` and the stated total sizes, from the markdown.
fn documented() -> (Rows, BTreeMap<String, usize>) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/abi.md"))
        .expect("docs/abi.md");
    let mut rows = BTreeMap::new();
    let mut totals = BTreeMap::new();
    let mut table = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("## `struct ") {
            table = rest.split('`').next().map(str::to_string);
            continue;
        }
        if line.starts_with("## ") {
            table = None;
        }
        let Some(t) = &table else { continue };
        if let Some(rest) = line.strip_prefix("Total size: ") {
            let n = rest.split_whitespace().next().unwrap();
            totals.insert(t.clone(), parse_number(n));
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() == 6 && cells[3].starts_with("0x") {
            rows.insert(
                (t.clone(), cells[1].to_string()),
                (parse_number(cells[3]), parse_number(cells[4])),
            );
        }
    }
    (rows, totals)
}

#[test]
fn abi_doc_matches_structs() {
    let (rows, totals) = documented();
    let code = layout();
    assert_eq!(rows.len(), code.len(), "docs/abi.md rows: {rows:?}");
    for ((table, field), (offset, size)) in &code {
        let doc = rows
            .get(&(table.to_string(), field.to_string()))
            .unwrap_or_else(|| panic!("docs/abi.md has no row for {table}.{field}"));
        assert_eq!(
            *doc,
            (*offset, *size),
            "{table}.{field}: docs (offset, size) vs code"
        );
    }
    assert_eq!(totals["device_req"], size_of::<DeviceReq>());
    assert_eq!(totals["device_res"], size_of::<DeviceRes>());
    assert_eq!(totals["virtio_bridge"], size_of::<VirtioBridge>());
}

/// The "Layout variants" table: every preset has a row, and every row's offsets, size and
/// pending-IRQ limit are what `HvisorAbi::layout` computes.
#[test]
fn abi_doc_variants_match_the_layout_code() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/abi.md"))
        .expect("docs/abi.md");
    let mut in_section = false;
    let mut seen = Vec::new();
    for line in text.lines() {
        if line.starts_with("## ") {
            in_section = line == "## Layout variants";
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if !in_section || cells.len() != 10 {
            continue;
        }
        let Ok(abi) = cells[1].parse::<HvisorAbi>() else {
            continue;
        };
        let l = abi.layout();
        let documented: Vec<usize> = cells[2..9].iter().map(|c| parse_number(c)).collect();
        assert_eq!(
            documented,
            [
                l.cfg_flags,
                l.cfg_values,
                l.mmio_addrs,
                l.mmio_avail,
                l.need_wakeup,
                l.size,
                abi.max_pending_irqs()
            ],
            "row {abi}"
        );
        seen.push(abi);
    }
    for preset in HvisorAbi::PRESETS {
        assert!(
            seen.contains(&preset),
            "docs/abi.md has no row for {preset}"
        );
    }
    assert_eq!(seen.len(), HvisorAbi::PRESETS.len());
}
