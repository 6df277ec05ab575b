//! What the frontend knows of each device type beyond its config size: which features the
//! guest is offered, which config fields a driver may write (only those go to the backend),
//! which writes change what the driver reads next (the config is then re-read from the
//! backend), and where the backend states a queue count that has to agree with the window's
//! `num_queues`. Also GET_CONFIG itself, done here rather than through vhost 0.18's
//! frontend, which on the spec's error reply (a zero size and no payload) waits forever for
//! the payload it asked for.

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;

/// Virtio device ids with features, writable fields or a queue count of their own.
const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_BLK: u32 = 2;
const VIRTIO_ID_CONSOLE: u32 = 3;
const VIRTIO_ID_GPU: u32 = 16;
const VIRTIO_ID_INPUT: u32 = 18;

/// VIRTIO_CONSOLE_F_MULTIPORT: `max_nr_ports` is valid and ports come in queue pairs after
/// port 0's pair and the control pair.
const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;

/// Feature bits the bridge passes through to the guest: the device-specific range, the ring
/// features that need nothing from the transport, VERSION_1 and IN_ORDER. Everything else
/// (ACCESS_PLATFORM, RING_PACKED, NOTIFICATION_DATA, RING_RESET, ...) would need transport
/// support that virtio-mmio-over-hvisor does not have.
const PASSTHROUGH_FEATURES: u64 = 0x00ff_ffff // device-specific bits 0..=23
    | 1 << 28 // VIRTIO_RING_F_INDIRECT_DESC
    | 1 << 29 // VIRTIO_RING_F_EVENT_IDX
    | 1 << 32 // VIRTIO_F_VERSION_1
    | 1 << 35; // VIRTIO_F_IN_ORDER

/// VIRTIO_NET_F_CTRL_VQ (17) and the features that need the control queue: CTRL_RX (18),
/// CTRL_VLAN (19), CTRL_RX_EXTRA (20), GUEST_ANNOUNCE (21), MQ (22), CTRL_MAC_ADDR (23).
const NET_CTRL_VQ_FEATURES: u64 = 0x7f << 17;

/// The features the guest is offered out of the backend's.
pub fn guest_features(device_id: u32, num_queues: u16, backend_features: u64) -> u64 {
    let mut features = backend_features & PASSTHROUGH_FEATURES;
    if device_id == VIRTIO_ID_NET && num_queues < 3 {
        // The control queue is queue 2N; with only an rx/tx pair configured the guest
        // would find it missing and fail to probe, so hide it and what depends on it.
        features &= !NET_CTRL_VQ_FEATURES;
    }
    if device_id == VIRTIO_ID_CONSOLE && num_queues < 4 {
        // MULTIPORT puts the control queues at 2 and 3; a window without them serves port
        // 0 alone.
        features &= !VIRTIO_CONSOLE_F_MULTIPORT;
    }
    features
}

/// The fields of a device type's config space that a driver writes, as `[start, end)`.
/// Everything else is read-only to the driver: the bridge ignores a write there rather than
/// pass it on, since backends may refuse it (qemu-storage-daemon drops the session) or fail
/// on it (a SCSI driver writes `cdb_size` and `sense_size` at every probe, which
/// vhost-user SCSI backends do not take). net's `mac` is writable only by legacy drivers,
/// which virtio-mmio v2 does not serve; the other types have no writable field.
pub fn writable_fields(device_id: u32) -> &'static [(usize, usize)] {
    match device_id {
        VIRTIO_ID_BLK => &[(32, 33)],    // writeback
        VIRTIO_ID_CONSOLE => &[(8, 12)], // emerg_wr
        VIRTIO_ID_GPU => &[(4, 8)],      // events_clear
        VIRTIO_ID_INPUT => &[(0, 2)],    // select, subsel
        _ => &[],
    }
}

/// The writable parts of a write to `[start, end)`, and whether it touched anything else.
pub fn split_write(device_id: u32, start: usize, end: usize) -> (Vec<(usize, usize)>, bool) {
    let parts: Vec<_> = writable_fields(device_id)
        .iter()
        .map(|&(s, e)| (s.max(start), e.min(end)))
        .filter(|(s, e)| s < e)
        .collect();
    let covered: usize = parts.iter().map(|(s, e)| e - s).sum();
    (parts, covered < end.saturating_sub(start))
}

/// Whether a write changes what the driver reads next: virtio-input's `select`/`subsel`
/// choose what the rest of its config shows (a query interface), and virtio-gpu's
/// `events_clear` clears bits of `events_read`. The config of these types is re-read from
/// the backend after every write; the others' is read at start-up, after a reconnect and
/// when the backend reports a change.
pub fn write_changes_config(device_id: u32) -> bool {
    matches!(device_id, VIRTIO_ID_INPUT | VIRTIO_ID_GPU)
}

/// A queue count in config space, valid when the backend offers `feature`.
struct QueueCountField {
    name: &'static str,
    offset: usize,
    width: usize,
    feature: u64,
    /// The count that a window of `num_queues` queues serves.
    for_window: fn(u16) -> u32,
}

fn queue_count_field(device_id: u32) -> Option<QueueCountField> {
    match device_id {
        VIRTIO_ID_BLK => Some(QueueCountField {
            name: "num_queues",
            offset: 34,
            width: 2,
            feature: VIRTIO_BLK_F_MQ,
            for_window: u32::from,
        }),
        // MQ needs the control queue, which follows the pairs: 2N + 1 queues.
        VIRTIO_ID_NET => Some(QueueCountField {
            name: "max_virtqueue_pairs",
            offset: 8,
            width: 2,
            feature: VIRTIO_NET_F_MQ,
            for_window: |n| u32::from(n.saturating_sub(1) / 2),
        }),
        // Port 0's pair, the control pair, then one pair per further port.
        VIRTIO_ID_CONSOLE => Some(QueueCountField {
            name: "max_nr_ports",
            offset: 4,
            width: 4,
            feature: VIRTIO_CONSOLE_F_MULTIPORT,
            for_window: |n| u32::from(n / 2).saturating_sub(1),
        }),
        _ => None,
    }
}

/// The backend's config space states fewer queues than the window has.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "The backend's config space has {field} = {backend}, but the window's num_queues = \
     {num_queues} needs {field} = {window}; lower `num_queues` or give the backend more queues"
)]
pub struct QueueCountMismatch {
    /// The config field.
    pub field: &'static str,
    /// What the backend says.
    pub backend: u32,
    /// What the window needs.
    pub window: u32,
    /// The window's `num_queues`.
    pub num_queues: u16,
}

/// Makes the queue count in `config` say what the window serves, as QEMU overwrites it with
/// its own: the guest then sizes its queues to the window. A backend that serves fewer than
/// the window needs is refused. `features` are those the guest is offered; without the
/// field's feature the field is not valid and stays as it is.
pub fn reconcile_queue_count(
    device_id: u32,
    features: u64,
    num_queues: u16,
    config: &mut [u8],
) -> Result<(), QueueCountMismatch> {
    let Some(field) = queue_count_field(device_id) else {
        return Ok(());
    };
    if features & field.feature == 0 {
        return Ok(());
    }
    let Some(bytes) = config.get_mut(field.offset..field.offset + field.width) else {
        return Ok(());
    };
    let mut le = [0u8; 4];
    le[..field.width].copy_from_slice(bytes);
    let backend = u32::from_le_bytes(le);
    let window = (field.for_window)(num_queues);
    if backend < window {
        return Err(QueueCountMismatch {
            field: field.name,
            backend,
            window,
            num_queues,
        });
    }
    bytes.copy_from_slice(&window.to_le_bytes()[..field.width]);
    Ok(())
}

/// Why a GET_CONFIG gave no config.
#[derive(Debug, thiserror::Error)]
pub enum GetConfigError {
    /// The socket failed.
    #[error("GET_CONFIG: socket error")]
    Io(#[from] std::io::Error),
    /// The backend answered with the spec's error reply: size 0, no payload.
    #[error("the backend refused GET_CONFIG (its reply has size 0)")]
    Refused,
    /// The reply is not a GET_CONFIG reply for what was asked.
    #[error("malformed GET_CONFIG reply: {0}")]
    Malformed(String),
}

/// vhost-user's GET_CONFIG request code, header flags and sizes.
const GET_CONFIG: u32 = 24;
const VERSION_1: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
const FLAG_REPLY: u32 = 0x4;
const HEADER_LEN: usize = 12;
/// `VhostUserConfig`: offset, size, flags.
const CONFIG_BODY_LEN: usize = 12;
/// The spec's bound on a message body.
const MAX_BODY_LEN: usize = 0x1000;

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut le = [0u8; 4];
    le.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(le)
}

/// Reads `len` bytes of config space from offset 0 over the backend socket `socket`, with
/// flags 0. It reads the reply's header first and then exactly the size it states, so an
/// error reply ends the exchange instead of leaving the bridge waiting for a payload that
/// will not come. The caller owns the connection: no other request may be in flight.
pub fn get_config(socket: BorrowedFd<'_>, len: usize) -> Result<Vec<u8>, GetConfigError> {
    if len == 0 || len > MAX_BODY_LEN - CONFIG_BODY_LEN {
        return Err(GetConfigError::Malformed(format!(
            "cannot ask for {len} bytes"
        )));
    }
    let mut stream = UnixStream::from(socket.try_clone_to_owned()?);
    let body_len = (CONFIG_BODY_LEN + len) as u32;
    let mut request = Vec::with_capacity(HEADER_LEN + CONFIG_BODY_LEN + len);
    for word in [GET_CONFIG, VERSION_1, body_len, 0, len as u32, 0] {
        request.extend_from_slice(&word.to_le_bytes());
    }
    request.resize(HEADER_LEN + CONFIG_BODY_LEN + len, 0);
    stream.write_all(&request)?;

    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header)?;
    let (code, flags, size) = (
        u32_at(&header, 0),
        u32_at(&header, 4),
        u32_at(&header, 8) as usize,
    );
    if code != GET_CONFIG || flags & FLAG_REPLY == 0 || flags & VERSION_MASK != VERSION_1 {
        return Err(GetConfigError::Malformed(format!(
            "request {code} with flags {flags:#x} in reply to GET_CONFIG"
        )));
    }
    if size > MAX_BODY_LEN {
        return Err(GetConfigError::Malformed(format!("body of {size} bytes")));
    }
    let mut body = vec![0u8; size];
    stream.read_exact(&mut body)?;
    if size < CONFIG_BODY_LEN {
        return Err(GetConfigError::Malformed(format!("body of {size} bytes")));
    }
    let (offset, config_size) = (u32_at(&body, 0), u32_at(&body, 4) as usize);
    if config_size == 0 {
        return Err(GetConfigError::Refused);
    }
    let payload = body.split_off(CONFIG_BODY_LEN);
    if offset != 0 || config_size != len || payload.len() != len {
        return Err(GetConfigError::Malformed(format!(
            "{} bytes at offset {offset}, size field {config_size}, for {len} bytes asked",
            payload.len()
        )));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_split_into_its_writable_parts() {
        // blk: only writeback (32) of a 4-byte write over writeback, unused0 and num_queues.
        assert_eq!(split_write(VIRTIO_ID_BLK, 32, 36), (vec![(32, 33)], true));
        assert_eq!(split_write(VIRTIO_ID_BLK, 32, 33), (vec![(32, 33)], false));
        assert_eq!(split_write(VIRTIO_ID_BLK, 0, 8), (vec![], true));
        assert_eq!(split_write(VIRTIO_ID_INPUT, 0, 2), (vec![(0, 2)], false));
        assert_eq!(split_write(VIRTIO_ID_INPUT, 1, 3), (vec![(1, 2)], true));
        assert_eq!(split_write(8, 32, 36), (vec![], true), "scsi: nothing");
        assert_eq!(split_write(VIRTIO_ID_NET, 0, 6), (vec![], true), "net: mac");
    }

    fn with_u16(len: usize, at: usize, value: u16) -> Vec<u8> {
        let mut config = vec![0u8; len];
        config[at..at + 2].copy_from_slice(&value.to_le_bytes());
        config
    }

    #[test]
    fn a_larger_queue_count_is_lowered_to_the_windows() {
        let mut blk = with_u16(60, 34, 8);
        reconcile_queue_count(VIRTIO_ID_BLK, VIRTIO_BLK_F_MQ, 2, &mut blk).unwrap();
        assert_eq!(blk, with_u16(60, 34, 2));
        // net: 5 queues are 2 pairs and the control queue.
        let mut net = with_u16(24, 8, 4);
        reconcile_queue_count(VIRTIO_ID_NET, VIRTIO_NET_F_MQ, 5, &mut net).unwrap();
        assert_eq!(net, with_u16(24, 8, 2));
        // console: 6 queues are port 0, the control pair and one more port.
        let mut console = with_u16(12, 4, 31);
        let features = VIRTIO_CONSOLE_F_MULTIPORT;
        reconcile_queue_count(VIRTIO_ID_CONSOLE, features, 6, &mut console).unwrap();
        assert_eq!(console, with_u16(12, 4, 2));
    }

    #[test]
    fn a_smaller_queue_count_is_refused_with_both_numbers() {
        let mut blk = with_u16(60, 34, 1);
        let error = reconcile_queue_count(VIRTIO_ID_BLK, VIRTIO_BLK_F_MQ, 4, &mut blk);
        assert_eq!(
            error,
            Err(QueueCountMismatch {
                field: "num_queues",
                backend: 1,
                window: 4,
                num_queues: 4,
            })
        );
        let text = error.unwrap_err().to_string();
        assert!(
            text.contains("num_queues = 1") && text.contains("num_queues = 4"),
            "{text}"
        );
    }

    #[test]
    fn without_its_feature_the_queue_count_is_left_alone() {
        let mut blk = with_u16(60, 34, 1);
        reconcile_queue_count(VIRTIO_ID_BLK, 0, 4, &mut blk).unwrap();
        assert_eq!(blk, with_u16(60, 34, 1));
    }
}
