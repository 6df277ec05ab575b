//! vhost-user console device backend: serves a virtio console whose host side is a pty, a
//! UNIX socket, a file or the backend's own standard streams.
//!
//! [`console`] holds the device logic behind the [`console::ConsoleHost`] trait and the
//! MULTIPORT control protocol; [`vhu_console`] the vhost-user layer that moves bytes between
//! virtqueues and hosts. Dependencies run one way: `vhu_console` uses `console`.

pub mod console;
pub mod vhu_console;
pub mod virtio_console;
