//! virtio-blk wire formats (virtio 1.2 §5.2) that the bindings do not make byte-addressable.

use std::mem::offset_of;

use virtio_bindings::virtio_blk::virtio_blk_config;
use vm_memory::ByteValued;

/// Size of `struct virtio_blk_outhdr`: type (le32), ioprio (le32), sector (le64).
pub const OUTHDR_SIZE: usize = 16;

/// Size of `struct virtio_blk_discard_write_zeroes`: sector (le64), num_sectors (le32), flags (le32).
pub const DISCARD_SEGMENT_SIZE: usize = 16;

/// Bytes of configuration space this device exposes: every field up to and including
/// `write_zeroes_may_unmap` and its padding. Secure-erase and zoned fields are not offered.
pub const CONFIG_SPACE_SIZE: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// Offset of the writeback-cache byte the driver may change when CONFIG_WCE is negotiated.
pub const WCE_OFFSET: usize = offset_of!(virtio_blk_config, wce);

/// The device configuration space in driver byte order (little endian).
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct BlkConfig(pub virtio_blk_config);

// SAFETY: `virtio_blk_config` is `repr(C, packed)` and made only of integers (its size is
// asserted to be 96 bytes by the bindings, which is the sum of its fields), so it has no
// padding and every byte pattern is a valid value.
unsafe impl ByteValued for BlkConfig {}

/// A parsed `struct virtio_blk_outhdr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub request_type: u32,
    pub sector: u64,
}

impl RequestHeader {
    pub fn from_bytes(raw: &[u8; OUTHDR_SIZE]) -> Self {
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *raw;
        RequestHeader {
            request_type: u32::from_le_bytes([t0, t1, t2, t3]),
            sector: u64::from_le_bytes(s),
        }
    }
}

/// A parsed `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl DiscardSegment {
    pub fn from_bytes(raw: &[u8; DISCARD_SEGMENT_SIZE]) -> Self {
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = *raw;
        DiscardSegment {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_the_spec() {
        assert_eq!(CONFIG_SPACE_SIZE, 60);
        assert_eq!(WCE_OFFSET, 32);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
        assert_eq!(BlkConfig::default().as_slice().len(), 96);
    }

    #[test]
    fn header_and_segment_decode_little_endian() {
        let mut raw = [0u8; OUTHDR_SIZE];
        raw[0] = 1;
        raw[8..].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        let header = RequestHeader::from_bytes(&raw);
        assert_eq!(header.request_type, 1);
        assert_eq!(header.sector, 0x0102_0304_0506_0708);

        let mut raw = [0u8; DISCARD_SEGMENT_SIZE];
        raw[..8].copy_from_slice(&42u64.to_le_bytes());
        raw[8..12].copy_from_slice(&8u32.to_le_bytes());
        raw[12..].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            DiscardSegment::from_bytes(&raw),
            DiscardSegment {
                sector: 42,
                num_sectors: 8,
                flags: 1
            }
        );
    }
}
