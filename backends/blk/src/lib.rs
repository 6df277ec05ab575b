//! vhost-user block device backend: a raw image file or block device served to a
//! vhost-user frontend.
//!
//! [`blk`] holds the virtio-blk request semantics behind the [`blk::BlockStorage`] trait,
//! [`file_storage`] the image-file implementation (with `preadv` or io_uring), and [`vhu_blk`] the vhost-user layer
//! that feeds virtqueues to the device. Dependencies run one way: `vhu_blk` uses `blk`.
//! [`pinning`] tells from a memory table whether O_DIRECT may use guest buffers in place;
//! [`stats`] counts each queue's requests, bytes and errors.

pub mod blk;
pub mod file_storage;
pub mod pinning;
pub mod stats;
mod uring;
pub mod vhu_blk;
pub mod virtio_blk;
