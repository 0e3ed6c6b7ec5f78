//! Thread placement and priority, shared by the server and the pager: the latency-critical
//! thread of each side can be pinned to a CPU, and throughput threads kept off it and at a
//! lower priority, so a fault never waits behind the stream for a CPU.

/// Pins the calling thread to `cpu`. Best effort: returns false if the kernel refused.
pub fn pin_current_thread(cpu: usize) -> bool {
    pin_current_thread_to(&[cpu])
}

/// Lets the calling thread run only on `cpus`. Best effort: returns false if the set is empty,
/// names a CPU past `CPU_SETSIZE`, or the kernel refused (e.g. none of them is online).
pub fn pin_current_thread_to(cpus: &[usize]) -> bool {
    if cpus.is_empty() || cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
        return false;
    }
    set_affinity(|set| {
        for &c in cpus {
            // SAFETY: CPU_SET writes within the set; c < CPU_SETSIZE (checked above).
            unsafe { libc::CPU_SET(c, set) };
        }
        true
    })
}

/// Parses a CPU list as `taskset -c` and cgroups write it: `0`, `0,2`, `0-3,6`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let max = libc::CPU_SETSIZE as usize;
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
    set_affinity(|set| {
        for c in (0..n).filter(|&c| c != cpu) {
            // SAFETY: c < online CPUs <= CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, set) };
        }
        true
    })
}

fn set_affinity(fill: impl FnOnce(&mut libc::cpu_set_t) -> bool) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if !fill(&mut set) {
        return false;
    }
    // SAFETY: sched_setaffinity(0, ...) on the calling thread with a set we own.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// Online CPUs of the machine (not of the calling thread's affinity mask).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n)
        .unwrap_or(1)
        .clamp(1, libc::CPU_SETSIZE as usize)
}

/// The nice value of threads that answer faults (normal threads and vCPUs run at 0).
pub const URGENT_NICE: i32 = -5;

/// Sets the calling thread's nice value (best effort: raising the priority needs
/// CAP_SYS_NICE).
pub fn set_nice(nice: i32) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority on our own thread; failure leaves the priority unchanged.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
}

/// Moves the calling thread to SCHED_IDLE: it runs only on CPU time nothing else wants and is
/// preempted at once when a normal thread wakes on its CPU (best effort).
pub fn set_idle_policy() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(0, ...) on the calling thread with a valid param.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

/// Lets the calling thread run on every online CPU again.
pub fn allow_all_cpus() -> bool {
    let n = online_cpus();
    set_affinity(|set| {
        for c in 0..n {
            // SAFETY: c < online CPUs <= CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, set) };
        }
        true
    })
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
