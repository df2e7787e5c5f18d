//! The operating system at the edges: CPU affinity and `/proc`.

pub mod affinity;
pub mod procfs;
