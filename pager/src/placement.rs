//! Where the pager's threads run: CPU priority and pinning.

use log::warn;

use crate::config::PagerConfig;

/// Places the fault thread: above the vCPUs' priority (its work is short and every vCPU waiting
/// on a page waits for it; best effort, it needs CAP_SYS_NICE), pinned where configured.
pub(crate) fn place_fault_thread(cfg: &PagerConfig) {
    transport::sched::set_nice(transport::sched::URGENT_NICE);
    if let Some(cpu) = cfg.fault_cpu {
        if !transport::sched::pin_current_thread(cpu) {
            warn!("cannot pin the fault thread to CPU {cpu}");
        }
    }
}

/// Streamers run at the vCPUs' priority (below the fault thread's). Lower, they lost the CPU to
/// busy vCPUs on a host with fewer CPUs than threads and the migration took 1.5-1.75x QEMU's
/// time there (measured in the simulated host, where an idle guest made both equal).
pub(crate) fn place_streamer(cfg: &PagerConfig) {
    let _ = cfg;
    transport::sched::set_nice(0);
}
