//! virtio-net wire formats (virtio 1.2 §5.1.4, §5.1.6) that the bindings do not make
//! byte-addressable.

use virtio_bindings::virtio_net::virtio_net_config;
use vm_memory::ByteValued;

/// `struct virtio_net_hdr`: the header without `num_buffers`, used by legacy drivers that
/// negotiate neither VERSION_1 nor MRG_RXBUF.
pub const LEGACY_HEADER_LEN: usize = 10;
/// `struct virtio_net_hdr_v1` (or `virtio_net_hdr_mrg_rxbuf`): with `num_buffers`.
pub const HEADER_LEN: usize = 12;
/// Offset of `num_buffers` in the 12-byte header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Ethernet header: a frame shorter than this carries nothing a peer could use.
pub const ETH_HEADER_LEN: usize = 14;

/// Bytes of configuration space this device exposes: the whole `virtio_net_config`
/// (mac, status, max_virtqueue_pairs, mtu, speed, duplex and the RSS fields).
pub const CONFIG_SPACE_SIZE: usize = std::mem::size_of::<virtio_net_config>();

/// The device configuration space in driver byte order (little endian).
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct NetConfigSpace(pub virtio_net_config);

// SAFETY: `virtio_net_config` is `repr(C, packed)` and made only of integers and a byte array
// (the bindings assert its size, 24 bytes, equals the sum of its fields), so it has no padding
// and every byte pattern is a valid value.
unsafe impl ByteValued for NetConfigSpace {}

/// The fields of a virtio-net header this device interprets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl NetHeader {
    /// Parses the first [`LEGACY_HEADER_LEN`] bytes; `num_buffers` is not part of it.
    pub fn from_bytes(raw: &[u8; LEGACY_HEADER_LEN]) -> Self {
        let [flags, gso_type, h0, h1, g0, g1, s0, s1, o0, o1] = *raw;
        NetHeader {
            flags,
            gso_type,
            hdr_len: u16::from_le_bytes([h0, h1]),
            gso_size: u16::from_le_bytes([g0, g1]),
            csum_start: u16::from_le_bytes([s0, s1]),
            csum_offset: u16::from_le_bytes([o0, o1]),
        }
    }

    pub fn to_bytes(self) -> [u8; LEGACY_HEADER_LEN] {
        let [h0, h1] = self.hdr_len.to_le_bytes();
        let [g0, g1] = self.gso_size.to_le_bytes();
        let [s0, s1] = self.csum_start.to_le_bytes();
        let [o0, o1] = self.csum_offset.to_le_bytes();
        [self.flags, self.gso_type, h0, h1, g0, g1, s0, s1, o0, o1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let raw = [1, 4, 0x36, 0, 0xb4, 0x05, 0x22, 0, 0x10, 0];
        let header = NetHeader::from_bytes(&raw);
        assert_eq!(
            header,
            NetHeader {
                flags: 1,
                gso_type: 4,
                hdr_len: 0x36,
                gso_size: 1460,
                csum_start: 0x22,
                csum_offset: 0x10,
            }
        );
        assert_eq!(header.to_bytes(), raw);
        assert_eq!(CONFIG_SPACE_SIZE, 24);
    }
}
