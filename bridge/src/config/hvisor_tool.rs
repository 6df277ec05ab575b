//! What hvisor-tool's daemon serves in-process and the bridge does not: a gpu (drawn with
//! libdrm on root Linux) and scmi (root Linux's firmware clocks and resets), with the device
//! fields only those devices read. An hvisor-tool config keeps working: such fields are
//! accepted, a disabled device that carries them gets a warning, and an enabled gpu or scmi
//! without `socket` is refused with what to use instead.

/// Device fields only hvisor-tool's in-process devices read: the gpu's scanout size, scmi's
/// allowed lists and reset map, and the `*_ids` and `*_phandle` keys of their lists.
pub(super) fn is_tool_only_key(key: &str) -> bool {
    matches!(key, "width" | "height" | "allowed_list" | "reset_map")
        || key.ends_with("_ids")
        || key.ends_with("_phandle")
}

/// For a device type hvisor-tool emulates in-process, what serves it with the bridge.
pub(super) fn served_instead(type_name: &str) -> Option<&'static str> {
    match type_name {
        "gpu" => Some(
            "a vhost-user gpu backend (e.g. rust-vmm's vhost-device-gpu or QEMU's \
             vhost-user-gpu) named by `socket`",
        ),
        "scmi" => {
            Some("a vhost-user scmi backend (e.g. rust-vmm's vhost-device-scmi) named by `socket`")
        }
        _ => None,
    }
}

/// The hvisor-tool-only fields among `keys` (serde_json's map iterates in key order).
pub(super) fn tool_only_keys<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
    keys.map(String::as_str)
        .filter(|k| is_tool_only_key(k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_only_keys_are_those_of_in_process_devices() {
        for key in [
            "width",
            "height",
            "allowed_list",
            "reset_map",
            "clock_ids",
            "scmi_phandle",
        ] {
            assert!(is_tool_only_key(key), "{key}");
        }
        for key in ["img", "tap", "socket", "ids", "phandle_x", "status"] {
            assert!(!is_tool_only_key(key), "{key}");
        }
    }

    #[test]
    fn gpu_and_scmi_name_a_backend_and_others_nothing() {
        assert!(served_instead("gpu").unwrap().contains("vhost-device-gpu"));
        assert!(served_instead("scmi")
            .unwrap()
            .contains("vhost-device-scmi"));
        assert_eq!(served_instead("blk"), None);
    }
}
