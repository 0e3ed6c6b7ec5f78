//! A bulk connection's thread: streams the session's not-yet-sent pages, in runs, straight from
//! the memory with `writev`, at a lower CPU priority than the event loop so fault replies win.

use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use proto::Origin;

use crate::session::{build_frame, Frame, Session};
use crate::shared::Core;
use transport::Sock;

pub(crate) fn run(core: Arc<Core>, mut sock: Sock, peer: String, session: Arc<Session>) {
    // spawned by the event loop, which may be pinned: the stream may use every CPU, at a
    // priority below the loop's (normal: nice 0, the loop's is raised)
    if core.config.urgent_cpu.is_some() {
        transport::sched::allow_all_cpus();
    }
    transport::sched::set_nice(0);
    sock.set_buffers(core.config.bulk_buffer_bytes);
    let _ = sock.set_write_timeout(Some(Duration::from_secs(60)));
    let map = &core.map;
    let chunk = core.config.stream_chunk_pages;
    let mut frame = Frame::default();
    let mut reported_done = false;
    'outer: while session.wait_stream() {
        let runs = session.claim_stream(chunk);
        if runs.is_empty() {
            // every page sent: stay until the session ends, for pages to send again (pre-copy
            // re-sends while the memory still changes, and the pages modified before the switch)
            if !reported_done {
                debug!("client {peer}: bulk stream sent every page");
                reported_done = true;
            }
            if session.is_closed() {
                break;
            }
            session.wait_more(Duration::from_millis(20));
            continue;
        }
        reported_done = false;
        for (first, count) in runs {
            let mut done = 0;
            while done < count {
                // origin and count under the gate: once pre-copy has ended, every `Precopy`
                // frame that will ever go out is counted
                let n = {
                    let _g = core.precopy_gate.read().unwrap_or_else(|e| e.into_inner());
                    let origin = if core.precopy.load(std::sync::atomic::Ordering::Acquire) {
                        Origin::Precopy
                    } else {
                        Origin::Stream
                    };
                    build_frame(
                        map,
                        first + u64::from(done),
                        count - done,
                        origin,
                        0,
                        &mut frame,
                        &session,
                    )
                };
                if n == 0 {
                    break;
                }
                if let Err(e) = sock.write_all_vectored(&frame.parts()) {
                    if !session.is_closed() {
                        warn!("client {peer}: bulk connection dropped: {e}");
                    }
                    break 'outer;
                }
                done += n;
            }
        }
    }
}
