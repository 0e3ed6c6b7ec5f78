//! vCPUs: initial setup, complete state save / restore, and the vCPU thread.
//!
//! Each vCPU has its own thread that owns the `VcpuFd`. The controller talks
//! to it through a command channel and "kicks" it out of `KVM_RUN` with a
//! signal (re-sent until the thread answers, which closes the race between
//! checking the channel and entering the guest).

mod cpu;
mod msrs;
#[cfg(test)]
mod tests;
mod thread;

pub use cpu::Vcpu;
pub use msrs::{order_msrs, readable_msrs};
pub use thread::{install_kick_handler, kick_signal, Command, VcpuHandle, VcpuReport, VCPU_CPUS};
