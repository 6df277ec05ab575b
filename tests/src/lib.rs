//! Test support for hvisor-vhost: a guest-side virtio-mmio driver, and a harness that runs the
//! real bridge and backend processes against the simulated hypervisor.

pub mod blk_backend;
pub mod driver;
pub mod harness;
pub mod netns;
