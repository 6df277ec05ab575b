//! vhost-user net device backend: a TAP device served to a vhost-user frontend.
//!
//! [`net`] holds the virtio-net data path behind the [`net::NetPort`] trait, [`tap`] the TAP
//! implementation, and [`vhu_net`] the vhost-user layer that feeds virtqueues and TAP events to
//! the device. Dependencies run one way: `vhu_net` uses `net`, `net` knows no vhost-user.

pub mod net;
pub mod tap;
pub mod vhu_net;
pub mod virtio_net;
