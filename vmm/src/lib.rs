//! A KVM VMM for post-copy live migration: boots our own guest (PVH) or
//! Linux, captures the complete non-memory state of a running VM, and
//! rebuilds it in another process — eagerly from a memory file, or lazily
//! with guest RAM paged in through the pager from a page-server.
//!
//! Threads: one per vCPU (owns its `VcpuFd`), the controller (the caller of
//! [`vm::Vm::run`]) which alone pauses, saves and resumes, the control
//! socket, and small forwarders (stdin, pager events, signals).

pub mod api;
pub mod arch;
pub mod chips;
pub mod cli;
pub mod config;
pub mod devices;
pub mod dirty;
pub mod envelope;
pub mod error;
pub mod memory;
pub mod migration;
pub mod persist;
pub mod report;
pub mod state;
#[cfg(test)]
mod testing;
pub mod vcpu;
pub mod virtio;
pub mod vm;
