//! The plan of a migration, I/O-free: the mode, the pre-copy limits, and the stop rule that
//! ends the pre-copy passes.

use std::time::Duration;

/// How a migration moves memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pause at once; every page follows after the destination resumed.
    Postcopy,
    /// Pre-copy passes while the VM runs (KVM dirty logging), then post-copy for the pages
    /// still dirty.
    Hybrid,
    /// Pre-copy passes, then the pages still dirty are copied while the VM is paused; the
    /// destination resumes with every page present (no post-copy).
    Precopy,
}

/// Default of [`Plan::recover_timeout`].
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the caller asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The mode, or the name of one this vmm does not have.
    pub mode: Result<Mode, String>,
    /// Hybrid: at most this many pre-copy passes.
    pub max_passes: u32,
    /// Hybrid: switch over once a pass leaves at most this many dirty pages.
    pub threshold_pages: u64,
    /// Pre-copy / hybrid: also switch over once the dirty pages could be sent in this many
    /// milliseconds at the rate the last pass sent.
    pub max_downtime_ms: Option<u64>,
    /// Report the RAM checksum at the pause.
    pub verify: bool,
    /// Dirty-tracking backend by name (None: `kvm`).
    pub dirty_tracking: Option<String>,
    /// Serve the disks to the destination (not shared storage).
    pub copy_disk: bool,
    /// Post-copy: how long the source waits for a silent or broken migration link to come
    /// back (or for the destination's pagers to say they have everything) before it gives up
    /// knowing the outcome (the VM then stays paused here).
    pub recover_timeout: Duration,
}

impl Plan {
    /// From the control request's fields (defaults: postcopy; 16 passes at most, switch at 256
    /// dirty pages).
    pub fn parse(
        mode: Option<&str>,
        max_passes: Option<u32>,
        threshold_pages: Option<u64>,
        max_downtime_ms: Option<u64>,
        verify: bool,
    ) -> Plan {
        let mode = match mode {
            None | Some("postcopy") => Ok(Mode::Postcopy),
            Some("hybrid") => Ok(Mode::Hybrid),
            Some("precopy") => Ok(Mode::Precopy),
            Some(m) => Err(format!("unknown mode {m:?} (postcopy, hybrid, precopy)")),
        };
        Plan {
            mode,
            max_passes: max_passes.unwrap_or(16).max(1),
            threshold_pages: threshold_pages.unwrap_or(256),
            max_downtime_ms,
            verify,
            dirty_tracking: None,
            copy_disk: false,
            recover_timeout: DEFAULT_RECOVER_TIMEOUT,
        }
    }

    /// Whether pages are copied while the VM still runs.
    pub fn precopies(&self) -> bool {
        matches!(self.mode, Ok(Mode::Hybrid | Mode::Precopy))
    }
}

/// What one pre-copy pass left, as the stop rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct PassEnd {
    /// Which pass (from 1).
    pub pass: u32,
    /// Pages the guest wrote during it (to send again).
    pub dirty: u64,
    /// The previous pass's count (`u64::MAX` after the first).
    pub previous_dirty: u64,
    /// Pages the pass sent per millisecond.
    pub pages_per_ms: f64,
    /// `migrate-switchover` was asked for.
    pub forced: bool,
}

impl Plan {
    /// The stop rule of the pre-copy passes: why to switch over after this pass, or None for
    /// one more pass. In order: a requested switchover; few enough dirty pages
    /// (`threshold_pages`); dirty pages that could be sent within `max_downtime_ms` at the
    /// pass's rate; the passes run out; the dirty set not shrinking.
    pub fn stop_after(&self, p: &PassEnd) -> Option<String> {
        let n = p.dirty;
        let per_ms = p.pages_per_ms;
        if p.forced {
            Some("switchover requested".to_owned())
        } else if n <= self.threshold_pages {
            Some(format!(
                "converged: {n} dirty pages <= {}",
                self.threshold_pages
            ))
        } else if let Some(md) = self
            .max_downtime_ms
            .filter(|&md| n as f64 <= md as f64 * per_ms)
        {
            Some(format!(
                "converged: {n} dirty pages take ~{:.1} ms <= {md} ms at {per_ms:.0} pages/ms",
                n as f64 / per_ms.max(1e-9)
            ))
        } else if p.pass >= self.max_passes {
            Some(format!("{} passes done", self.max_passes))
        } else if n >= p.previous_dirty {
            Some(format!(
                "dirty set not shrinking ({} -> {n} pages)",
                p.previous_dirty
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(pass: u32, dirty: u64, previous_dirty: u64) -> PassEnd {
        PassEnd {
            pass,
            dirty,
            previous_dirty,
            pages_per_ms: 100.0,
            forced: false,
        }
    }

    #[test]
    fn the_stop_rule_names_why_it_switches_over() {
        let mut plan = Plan::parse(Some("hybrid"), Some(4), Some(256), None, false);
        assert_eq!(plan.stop_after(&end(1, 10_000, u64::MAX)), None);
        assert_eq!(plan.stop_after(&end(2, 5_000, 10_000)), None);
        assert_eq!(
            plan.stop_after(&end(2, 256, 10_000)).unwrap(),
            "converged: 256 dirty pages <= 256"
        );
        assert_eq!(
            plan.stop_after(&end(3, 6_000, 5_000)).unwrap(),
            "dirty set not shrinking (5000 -> 6000 pages)"
        );
        assert_eq!(
            plan.stop_after(&end(4, 1_000, 5_000)).unwrap(),
            "4 passes done"
        );
        let forced = PassEnd {
            forced: true,
            ..end(1, 10_000, u64::MAX)
        };
        assert_eq!(plan.stop_after(&forced).unwrap(), "switchover requested");
        // 1000 dirty pages at 100 pages/ms take 10 ms: within a 20 ms budget, not a 5 ms one
        plan.max_downtime_ms = Some(20);
        assert!(plan
            .stop_after(&end(2, 1_000, 5_000))
            .unwrap()
            .starts_with("converged: 1000 dirty pages take ~10.0 ms <= 20 ms"));
        plan.max_downtime_ms = Some(5);
        assert_eq!(plan.stop_after(&end(2, 1_000, 5_000)), None);
    }

    #[test]
    fn modes_and_defaults_parse() {
        let p = Plan::parse(None, None, None, None, false);
        assert_eq!(p.mode, Ok(Mode::Postcopy));
        assert!(!p.precopies());
        assert_eq!((p.max_passes, p.threshold_pages), (16, 256));
        assert!(Plan::parse(Some("precopy"), Some(0), None, None, false).precopies());
        assert_eq!(
            Plan::parse(Some("precopy"), Some(0), None, None, false).max_passes,
            1
        );
        assert!(Plan::parse(Some("teleport"), None, None, None, false)
            .mode
            .is_err());
    }
}
