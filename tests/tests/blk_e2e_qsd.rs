//! The blk end-to-end suite, unchanged, with qemu-storage-daemon's vhost-user-blk export as
//! the backend of every blk device.

#[path = "blk_e2e.rs"]
mod suite;
