//! virtio-console definitions (virtio 1.2 §5.3) that virtio-bindings does not provide.

use vm_memory::ByteValued;

/// The driver may read `cols` and `rows` from the configuration space.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Several ports, announced and managed through the control queues.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;

/// Control events (`virtio_console_control.event`).
pub mod event {
    /// Driver: the device is ready (value 1) or failed (0).
    pub const DEVICE_READY: u16 = 0;
    /// Device: a port with this id exists.
    pub const DEVICE_ADD: u16 = 1;
    /// Driver: the port is ready (value 1) or failed (0).
    pub const PORT_READY: u16 = 3;
    /// Device: the port is a console (hvc).
    pub const CONSOLE_PORT: u16 = 4;
    /// Both: the sender opened (1) or closed (0) its end of the port.
    pub const PORT_OPEN: u16 = 6;
    /// Device: the port's name follows the message.
    pub const PORT_NAME: u16 = 7;
}

/// A control queue message header; PORT_NAME is followed by the name bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ControlHeader {
    pub id: u32,
    pub event: u16,
    pub value: u16,
}

// SAFETY: plain little-endian integers with no padding (4 + 2 + 2 bytes); any bit pattern is
// a valid value.
unsafe impl ByteValued for ControlHeader {}

/// Bytes of a control header.
pub const CONTROL_HEADER_LEN: usize = std::mem::size_of::<ControlHeader>();

impl ControlHeader {
    /// A header with fields in native order; [`ControlHeader::to_le`] before sending.
    pub fn new(id: u32, event: u16, value: u16) -> Self {
        ControlHeader { id, event, value }
    }

    /// The header as the guest expects it in memory.
    pub fn to_le(self) -> Self {
        ControlHeader {
            id: self.id.to_le(),
            event: self.event.to_le(),
            value: self.value.to_le(),
        }
    }

    /// A header read from guest memory, in native order.
    pub fn to_native(self) -> Self {
        ControlHeader {
            id: u32::from_le(self.id),
            event: u16::from_le(self.event),
            value: u16::from_le(self.value),
        }
    }
}

/// `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ConsoleConfig {
    pub cols: u16,
    pub rows: u16,
    pub max_nr_ports: u32,
    pub emerg_wr: u32,
}

// SAFETY: plain integers with no padding (2 + 2 + 4 + 4 bytes); any bit pattern is valid.
unsafe impl ByteValued for ConsoleConfig {}

/// Bytes of the configuration space.
pub const CONFIG_SPACE_SIZE: usize = std::mem::size_of::<ConsoleConfig>();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_spec() {
        assert_eq!(CONTROL_HEADER_LEN, 8);
        assert_eq!(CONFIG_SPACE_SIZE, 12);
        let header = ControlHeader::new(0x0102_0304, 6, 1).to_le();
        assert_eq!(header.as_slice(), &[4, 3, 2, 1, 6, 0, 1, 0]);
        assert_eq!(header.to_native(), ControlHeader::new(0x0102_0304, 6, 1));
    }
}
