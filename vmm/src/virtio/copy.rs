//! `migrate --copy-disk` on the destination: the thread that writes a disk being copied in to
//! its local image, chunk by chunk as its blocks arrive, and reports how the copy ended.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::backend::Backend;
use super::blk;
use super::mmio::{lock, Transport};

/// How a disk copy-in (`migrate --copy-disk`) ended, for the controller.
#[derive(Debug, Clone)]
pub enum DiskCopyEvent {
    /// Every block is in the local file.
    Done {
        /// Slot.
        slot: u32,
        /// What the copy did (pager report, write-back time).
        report: Box<crate::api::replies::DiskCopy>,
    },
    /// The source's disk is gone for good: the VM cannot go on.
    Failed {
        /// Slot.
        slot: u32,
        /// Why.
        reason: String,
    },
}

/// How often the copy thread looks for chunks to write back while blocks arrive.
const WRITE_BACK_POLL: Duration = Duration::from_millis(10);

pub(super) fn copy_thread(
    slot: u32,
    t: Arc<Mutex<Transport>>,
    events: std::sync::mpsc::Receiver<pager::PagerEvent>,
    notify: impl Fn(DiskCopyEvent),
) {
    use std::sync::mpsc::RecvTimeoutError;
    let fail = |reason: String| notify(DiskCopyEvent::Failed { slot, reason });
    let mut complete = false;
    loop {
        // write back every chunk that is complete, one lock hold per chunk
        loop {
            let step = match &mut lock(&t).backend {
                Backend::Block(b) => b.write_back_step(),
                Backend::Net(_) => return,
            };
            match step {
                Ok(blk::WriteBack::Wrote) => continue,
                Ok(blk::WriteBack::NothingReady) => break,
                Ok(blk::WriteBack::AllDone) if complete => {
                    let mut g = lock(&t);
                    let Backend::Block(b) = &mut g.backend else {
                        return;
                    };
                    let (size, report) = (b.size(), b.copy_report());
                    return match b.finish_copy() {
                        Ok((ms, wb)) => {
                            drop(g);
                            log::info!(
                                "disk slot {slot}: copied in {ms:.1} ms ({size} bytes; writing the file took {wb:.1} ms of it)"
                            );
                            notify(DiskCopyEvent::Done {
                                slot,
                                report: Box::new(crate::api::replies::DiskCopy {
                                    slot,
                                    bytes: size,
                                    ms,
                                    write_back_ms: wb,
                                    pager: report,
                                }),
                            });
                        }
                        Err(e) => fail(e.to_string()),
                    };
                }
                Ok(blk::WriteBack::AllDone) => break,
                Err(e) => return fail(e.to_string()),
            }
        }
        match events.recv_timeout(WRITE_BACK_POLL) {
            Ok(pager::PagerEvent::Complete) => complete = true,
            Ok(pager::PagerEvent::Failed { reason }) => return fail(reason),
            Ok(pager::PagerEvent::SourceLost { cause }) => {
                log::warn!("disk slot {slot}: source lost ({cause}); reconnecting")
            }
            Ok(pager::PagerEvent::Reconnected { .. }) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if !complete {
                    return fail("the disk's pager stopped".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
