//! Thread placement and priority, shared by the server and the pager: the latency-critical
//! thread of each side can be pinned to a CPU, and throughput threads kept off it and at a
//! lower priority, so a fault never waits behind the stream for a CPU.
//!
//! Affinity (`sched_setaffinity`), the thread id (`gettid`) and the CPU count (`sysconf`) go
//! through nix. Two calls stay on raw `libc`, because nix 0.32 wraps neither:
//! `setpriority(PRIO_PROCESS, tid, nice)` in [`set_nice`] and
//! `sched_setscheduler(0, SCHED_IDLE, ..)` in [`set_idle_policy`].

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::{gettid, sysconf, Pid, SysconfVar};

/// Pins the calling thread to `cpu`. Best effort: returns false if the kernel refused.
pub fn pin_current_thread(cpu: usize) -> bool {
    pin_current_thread_to(&[cpu])
}

/// Lets the calling thread run only on `cpus`. Best effort: returns false if the set is empty,
/// names a CPU past `CPU_SETSIZE`, or the kernel refused (e.g. none of them is online).
pub fn pin_current_thread_to(cpus: &[usize]) -> bool {
    if cpus.is_empty() || cpus.iter().any(|&c| c >= CpuSet::count()) {
        return false;
    }
    set_affinity(cpus.iter().copied())
}

/// Parses a CPU list as `taskset -c` and cgroups write it: `0`, `0,2`, `0-3,6`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let max = CpuSet::count();
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&c| c < max)
                .ok_or_else(|| format!("{t:?} in CPU list {s:?} is not a CPU number below {max}"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part:?} in CPU list {s:?} runs backwards"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Lets the calling thread run on every online CPU except `cpu` (if there are others).
pub fn avoid_cpu(cpu: usize) -> bool {
    let n = online_cpus();
    if n < 2 {
        return false;
    }
    set_affinity((0..n).filter(|&c| c != cpu))
}

/// Lets the calling thread run only on `cpus` (each below `CpuSet::count()`, i.e. CPU_SETSIZE).
fn set_affinity(cpus: impl IntoIterator<Item = usize>) -> bool {
    let mut set = CpuSet::new();
    for c in cpus {
        if set.set(c).is_err() {
            return false;
        }
    }
    // pid 0: the calling thread
    sched_setaffinity(Pid::from_raw(0), &set).is_ok()
}

/// Online CPUs of the machine (not of the calling thread's affinity mask).
pub fn online_cpus() -> usize {
    sysconf(SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1)
        .clamp(1, CpuSet::count())
}

/// The nice value of threads that answer faults (normal threads and vCPUs run at 0).
pub const URGENT_NICE: i32 = -5;

/// Sets the calling thread's nice value (best effort: raising the priority needs
/// CAP_SYS_NICE).
pub fn set_nice(nice: i32) {
    let tid = gettid().as_raw() as libc::id_t;
    // SAFETY: setpriority (no nix wrapper) takes plain integers; on our own thread; failure
    // leaves the priority unchanged.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
}

/// Moves the calling thread to SCHED_IDLE: it runs only on CPU time nothing else wants and is
/// preempted at once when a normal thread wakes on its CPU (best effort).
pub fn set_idle_policy() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler (no nix wrapper) on the calling thread (pid 0), reading only
    // `param`, which lives across the call.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

/// Lets the calling thread run on every online CPU again.
pub fn allow_all_cpus() -> bool {
    let n = online_cpus();
    set_affinity(0..n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_taskset() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("3,0-1,1").unwrap(), vec![0, 1, 3]);
        for bad in ["", "a", "2-1", "0,", "-1", "99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }
}
