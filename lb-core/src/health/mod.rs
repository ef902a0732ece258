//! Health: the pure [`machine`], the shared [`cell`] that workers read
//! (one atomic flag) and that active checks and failed connects feed, the
//! [`probe`]s (TCP, HTTP), and the [`registry`] that runs one prober per
//! distinct (target address, check) however many listeners share it.

pub mod cell;
pub mod machine;
pub mod probe;
pub mod registry;

pub use cell::{HealthCell, ProbeKey};
pub use registry::HealthRegistry;
