//! The pre-copy passes of a hybrid or pre-copy migration: every page streamed while the VM
//! runs, then the pages it wrote meanwhile, pass after pass, until the plan's stop rule says
//! switch over.

use std::time::{Duration, Instant};

use page_server::ServerHandle;

use super::controller::{dirty_op, Context, DirtyOp, MigEvent};
use super::{Link, MigrationError, PassEnd, Wire, SILENCE_TIMEOUT};
use crate::api::replies::{PassReport, Progress};

/// What the pre-copy passes did.
pub(super) struct Precopied {
    /// Pages dirtied during the last pass (not sent again): part of the switchover's set.
    pub(super) carry: Vec<u8>,
    pub(super) passes: Vec<PassReport>,
    pub(super) stop_reason: String,
    pub(super) ms: f64,
}

/// Hybrid: streams every page while the VM runs, then again the pages it wrote meanwhile,
/// pass after pass, until few are left, the set stops shrinking, the passes run out or a
/// switchover is requested.
pub(super) fn passes(
    ctx: &Context,
    link: &mut Link,
    server: &ServerHandle,
    t_start: Instant,
) -> Result<Precopied, MigrationError> {
    let t0 = Instant::now();
    let backend = crate::dirty::Backend::parse(ctx.plan.dirty_tracking.as_deref())
        .map_err(MigrationError::Other)?;
    dirty_op(ctx, DirtyOp::Start(backend))?;
    link.send(&Wire::Precopy)?;
    let plan = &ctx.plan;
    let forced = || ctx.switchover.load(std::sync::atomic::Ordering::Acquire);
    let mut passes = Vec::new();
    let mut prev = u64::MAX;
    let mut sent_before = 0;
    let mut pass = 0u32;
    loop {
        pass += 1;
        let t = Instant::now();
        let mut stalled_since = (Instant::now(), server.stats().pages_sent());
        while server.unsent_pages() > 0 && !forced() {
            std::thread::sleep(Duration::from_millis(2));
            let sent = server.stats().pages_sent();
            if sent != stalled_since.1 {
                stalled_since = (Instant::now(), sent);
            } else if let Some(why) = link.gone() {
                // the destination died or hung up: no reason to wait out the silence
                return Err(MigrationError::Other(format!(
                    "pre-copy pass {pass}: {why}"
                )));
            } else if stalled_since.0.elapsed() > SILENCE_TIMEOUT {
                return Err(MigrationError::Other(format!(
                    "pre-copy pass {pass}: nothing sent for {SILENCE_TIMEOUT:?} (is the destination reading?)"
                )));
            }
        }
        let sent = server.stats().pages_sent();
        let (bits, n) = dirty_op(ctx, DirtyOp::Collect)?;
        let secs = t.elapsed().as_secs_f64();
        // pages this pass sent per millisecond: how long the dirty ones would take paused
        let per_ms = (sent - sent_before) as f64 / (secs * 1e3).max(1e-3);
        let p = PassReport {
            pass,
            pages_sent: sent - sent_before,
            pages_dirtied: n,
            dirty_rate_pages_s: n as f64 / secs.max(1e-6),
            ms: secs * 1e3,
        };
        (ctx.events)(MigEvent::Progress(Progress::Precopy {
            pass,
            pages_sent: p.pages_sent,
            pages_dirtied: n,
            elapsed_ms: t_start.elapsed().as_secs_f64() * 1e3,
        }));
        log::info!(
            "pre-copy pass {pass}: {}",
            serde_json::to_string(&p).unwrap_or_default()
        );
        passes.push(p);
        sent_before = sent;
        let stop = plan.stop_after(&PassEnd {
            pass,
            dirty: n,
            previous_dirty: prev,
            pages_per_ms: per_ms,
            forced: forced(),
        });
        if let Some(stop_reason) = stop {
            return Ok(Precopied {
                carry: bits,
                passes,
                stop_reason,
                ms: t0.elapsed().as_secs_f64() * 1e3,
            });
        }
        prev = n;
        server.resend(&bits);
    }
}
