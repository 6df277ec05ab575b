//! Drives an in-process backend daemon through a real vhost-user frontend connection.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread;

use common::{socket_path, Guest, QUEUE_SIZE};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Listener, VhostUserFrontend};
use vhost::VhostBackend;
use vhost_user_backend::VhostUserDaemon;
use vhost_user_blk::blk::BlockDevice;
use vhost_user_blk::file_storage::{FileStorage, IoEngine, StorageOptions};
use vhost_user_blk::vhu_blk::{QueueConfig, VhostUserBlkBackend};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const IMAGE_SIZE: u64 = 1 << 20;
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const READ_BACK: u64 = 0x4_0000;
const STATUS: u64 = 0x6_0000;

#[test]
fn write_then_read_round_trips_through_the_image() {
    round_trip_through_the_image(IoEngine::Sync);
}

#[test]
fn write_then_read_round_trips_through_the_image_with_io_uring() {
    round_trip_through_the_image(IoEngine::IoUring);
}

fn round_trip_through_the_image(engine: IoEngine) {
    let image = TempFile::new().unwrap();
    image.as_file().set_len(IMAGE_SIZE).unwrap();
    let options = StorageOptions {
        engine,
        ..StorageOptions::default()
    };
    let storage = FileStorage::open(image.as_path(), &options).unwrap();
    let device = BlockDevice::new(Arc::new(storage), false, b"it-serial");
    let queues = QueueConfig {
        num_queues: 1,
        queue_size: QUEUE_SIZE,
    };
    let backend = Arc::new(VhostUserBlkBackend::new(device, queues).unwrap());
    let mut daemon = VhostUserDaemon::new(
        "vhost-user-blk-test".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let path = socket_path(&format!("frontend-{engine:?}"));
    let mut listener = Listener::new(&path, true).unwrap();
    let server = thread::spawn(move || {
        daemon.start(&mut listener).unwrap();
        daemon.wait()
    });

    let (mut frontend, offered) = Guest::negotiate(&path);
    assert_eq!(frontend.get_queue_num().unwrap(), 1);
    let config = Guest::config(&mut frontend, 0, 60);
    assert_eq!(
        u64::from_le_bytes(config[..8].try_into().unwrap()),
        IMAGE_SIZE / 512
    );
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);

    let wanted = 1 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(offered & wanted, wanted);
    let mut guest = Guest::new();
    guest.activate(&mut frontend, wanted);

    // Write 8 KiB at sector 10 in two segments.
    let pattern: Vec<u8> = (0..8192).map(|i| (i * 7 % 256) as u8).collect();
    guest.write(DATA, &pattern);
    guest.write_header(HEADER, VIRTIO_BLK_T_OUT, 10);
    let head = guest.submit(&[
        (HEADER, 16, false),
        (DATA, 4096, false),
        (DATA + 4096, 4096, false),
        (STATUS, 1, true),
    ]);
    guest.wait_used(1);
    assert_eq!(guest.used_elem(0), (u32::from(head), 1));
    assert_eq!(guest.read(STATUS, 1), [VIRTIO_BLK_S_OK as u8]);
    let mut on_disk = vec![0u8; 8192];
    image
        .as_file()
        .read_exact_at(&mut on_disk, 10 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern);

    // Flush, then read it back into different buffers.
    guest.write_header(HEADER, VIRTIO_BLK_T_FLUSH, 0);
    guest.submit(&[(HEADER, 16, false), (STATUS, 1, true)]);
    guest.wait_used(2);
    assert_eq!(guest.read(STATUS, 1), [VIRTIO_BLK_S_OK as u8]);

    guest.write_header(HEADER, VIRTIO_BLK_T_IN, 10);
    let head = guest.submit(&[
        (HEADER, 16, false),
        (READ_BACK, 8192, true),
        (STATUS, 1, true),
    ]);
    guest.wait_used(3);
    assert_eq!(guest.used_elem(2), (u32::from(head), 8193));
    assert_eq!(guest.read(STATUS, 1), [VIRTIO_BLK_S_OK as u8]);
    assert_eq!(guest.read(READ_BACK, 8192), pattern);

    guest.write_header(HEADER, VIRTIO_BLK_T_GET_ID, 0);
    guest.submit(&[
        (HEADER, 16, false),
        (READ_BACK, 20, true),
        (STATUS, 1, true),
    ]);
    guest.wait_used(4);
    assert_eq!(&guest.read(READ_BACK, 20)[..10], b"it-serial\0");

    // Stopping the ring reports where the backend stopped consuming.
    assert_eq!(frontend.get_vring_base(0).unwrap(), 4);
    drop(frontend);
    let end = server.join().unwrap();
    assert!(
        matches!(
            end,
            Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                ))
        ),
        "{end:?}"
    );
}
