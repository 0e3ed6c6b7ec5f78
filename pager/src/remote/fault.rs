//! The fault thread of a remote pager: reads userfaultfd events, sends requests on the urgent
//! connection, installs the replies, and keeps the waiters of pages the source said are on
//! their way on the stream (`InFlight`) until the stream installs them — a streamer wakes it
//! through the waker when it installs while any are awaited. Decisions are the policy's; this
//! module only moves events and bytes.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use proto::{Header, Message, PageIndex, HEADER_LEN, MAX_PAYLOAD_BYTES};
use transport::Sock;

use super::link::Remote;
use crate::placement::place_fault_thread;
use crate::policy::{Policy, ReplyOutcome, Req};
use crate::shared::Origin;
use crate::wake::poll_in;

/// Receives into `buf[*filled..]` without blocking. Ok(false) on EOF.
fn recv_nonblocking(sock: &Sock, buf: &mut [u8], filled: &mut usize) -> io::Result<bool> {
    loop {
        if *filled == buf.len() {
            return Ok(true);
        }
        let want = buf.len() - *filled;
        match sock.recv_dontwait(&mut buf[*filled..]) {
            Ok(0) => return Ok(false),
            Ok(r) => {
                *filled += r;
                if sock.drained_after(r < want) {
                    return Ok(true); // drained for now; poll(2) tells when more comes
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

struct FaultThread {
    r: Arc<Remote>,
    policy: Policy,
    conn: Option<(Sock, u64)>,
    rbuf: Vec<u8>,
    filled: usize,
    faults: Vec<u64>,
    reqs: Vec<Req>,
    out: Vec<u8>,
}

impl FaultThread {
    fn lose(&mut self, cause: String) {
        if let Some((s, g)) = self.conn.take() {
            let _ = s.shutdown(Shutdown::Both);
            self.r.report_lost(g, cause);
        }
    }

    fn send(&mut self, req: Req) {
        let Some((sock, _)) = self.conn.as_mut() else {
            return; // resent after the reconnect
        };
        self.out.clear();
        Message::Request(proto::Request {
            first: PageIndex(req.first),
            count: req.count,
            fault_pages: req.fault_pages,
        })
        .encode(&mut self.out);
        if let Err(e) = sock.write_all(&self.out) {
            self.lose(format!("urgent connection: sending a request: {e}"));
        }
    }

    /// Asks for the pages at `addrs` as if they had faulted.
    fn fetch(&mut self, addrs: &[u64]) {
        if addrs.is_empty() {
            return;
        }
        let sh = self.r.shared.clone();
        let mut reqs = std::mem::take(&mut self.reqs);
        sh.dispatch_early(&mut self.policy, addrs, |_, req| reqs.push(req));
        for req in reqs.drain(..) {
            self.send(req);
        }
        self.reqs = reqs;
    }

    /// Reads and handles every pending fault event.
    fn handle_faults(&mut self) {
        let sh = self.r.shared.clone();
        let mut faults = std::mem::take(&mut self.faults);
        let mut reqs = std::mem::take(&mut self.reqs);
        sh.dispatch_faults(&mut self.policy, &mut faults, |_, req| reqs.push(req));
        for req in reqs.drain(..) {
            self.send(req);
        }
        self.faults = faults;
        self.reqs = reqs;
    }

    /// Reads whatever reply bytes are available and handles complete frames. Returns whether
    /// a reply was handled.
    fn handle_replies(&mut self) -> bool {
        let Some((sock, _)) = self.conn.as_ref() else {
            return false;
        };
        match recv_nonblocking(sock, &mut self.rbuf, &mut self.filled) {
            Ok(true) => {}
            Ok(false) => {
                self.lose("urgent connection closed by the source".into());
                return false;
            }
            Err(e) => {
                self.lose(format!("urgent connection: {e}"));
                return false;
            }
        }
        let sh = self.r.shared.clone();
        let ps = sh.mem.page_size() as u32;
        let mut used = 0;
        let mut handled = false;
        while self.filled - used >= HEADER_LEN {
            let header = match Header::decode(&self.rbuf[used..self.filled]) {
                Ok(h) => h,
                Err(e) => {
                    self.lose(format!("urgent connection: bad frame: {e}"));
                    return handled;
                }
            };
            let end = used + HEADER_LEN + header.payload_len as usize;
            if end > self.filled {
                break;
            }
            let rbuf = std::mem::take(&mut self.rbuf);
            let r = self.handle_frame(&header, &rbuf[used + HEADER_LEN..end], ps);
            self.rbuf = rbuf;
            if let Err(why) = r {
                self.lose(why);
                return handled;
            }
            handled = true;
            used = end;
        }
        self.rbuf.copy_within(used..self.filled, 0);
        self.filled -= used;
        handled
    }

    fn handle_frame(&mut self, header: &Header, payload: &[u8], ps: u32) -> Result<(), String> {
        let sh = self.r.shared.clone();
        let pages = match Message::decode(header, payload, ps) {
            Ok(Message::Pages(p)) => p,
            Ok(Message::InFlight { first, count }) => return self.handle_in_flight(first, count),
            Ok(Message::Error { code, reason }) => {
                return Err(format!("source reported error {code}: {reason}"))
            }
            Ok(m) => {
                return Err(format!(
                    "unexpected {:?} on the urgent connection",
                    m.kind()
                ))
            }
            Err(e) => return Err(format!("bad reply: {e}")),
        };
        // a reply answers the oldest request, and only within it: anything else is a broken or
        // hostile source, and none of its bytes may reach guest memory
        let fault_end = match self.policy.front() {
            Some(r) if r.first == pages.first.0 && pages.count > 0 && pages.count <= r.count => {
                r.first + u64::from(r.fault_pages)
            }
            _ => {
                return Err(format!(
                    "reply for pages {}+{} matches no request",
                    pages.first.0, pages.count
                ))
            }
        };
        for run in pages.runs(ps) {
            // split the run where the fault pages end and prefetch begins
            let (a, b) = (run.first.0, run.first.0 + u64::from(run.count));
            let cut = fault_end.clamp(a, b);
            for (lo, hi, origin) in [(a, cut, Origin::Fault), (cut, b, Origin::Prefetch)] {
                if lo >= hi {
                    continue;
                }
                let data = run.data.map(|d| {
                    &d[((lo - a) * u64::from(ps)) as usize..((hi - a) * u64::from(ps)) as usize]
                });
                if let Err(e) = sh.install(lo, hi - lo, data, origin) {
                    sh.fail(e);
                    return Err("install failed".into());
                }
            }
        }
        let Some((_, outcome)) = self
            .policy
            .on_reply(pages.first.0, pages.count, |p| sh.received.get(p))
        else {
            return Err(format!(
                "reply for pages {}+{} matches no request",
                pages.first.0, pages.count
            ));
        };
        self.complete(outcome);
        Ok(())
    }

    /// The source has the request's leading pages on their way on the stream: their faults
    /// wait for it.
    fn handle_in_flight(&mut self, first: PageIndex, count: u32) -> Result<(), String> {
        let sh = self.r.shared.clone();
        if !sh.config.stream {
            // no streamer would ever deliver them: a broken source; the reconnect re-requests
            return Err(format!(
                "InFlight for pages {}+{count} but no stream is open",
                first.0
            ));
        }
        let Some((_, outcome)) = self
            .policy
            .on_in_flight(first.0, count, |p| sh.received.get(p))
        else {
            return Err(format!(
                "InFlight for pages {}+{count} matches no request",
                first.0
            ));
        };
        sh.stats.in_flight_replies.fetch_add(1, Ordering::Relaxed);
        self.complete(outcome);
        self.stream_arrivals();
        Ok(())
    }

    fn complete(&mut self, outcome: ReplyOutcome) {
        for t in outcome.satisfied {
            self.r.shared.fault_done(t);
        }
        for req in outcome.rerequests {
            self.send(req);
        }
    }

    /// Completes the faults on awaited pages the stream has installed, and publishes how many
    /// are still awaited so that a streamer installing one of them wakes this thread.
    fn stream_arrivals(&mut self) {
        if self.policy.streaming() == 0 {
            return; // and the published count is 0 already
        }
        let sh = self.r.shared.clone();
        // publish before looking: a streamer sets a page's bit, then reads the count; with a
        // fence on both sides, either we see its page here or it sees our count and wakes us
        sh.awaited_from_stream
            .store(self.policy.streaming() as u64, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        for t in self.policy.on_stream_arrivals(|p| sh.received.get(p)) {
            sh.fault_done(t);
        }
        sh.awaited_from_stream
            .store(self.policy.streaming() as u64, Ordering::Relaxed);
    }

    /// A new session's urgent connection: asks again for everything the old one left
    /// unanswered or undelivered.
    fn resume(&mut self, sock: Sock, generation: u64) {
        let sh = self.r.shared.clone();
        self.conn = Some((sock, generation));
        self.filled = 0;
        self.stream_arrivals();
        let reqs = self.policy.on_reconnect(|p| sh.received.get(p));
        sh.awaited_from_stream.store(0, Ordering::Relaxed);
        for req in reqs {
            self.send(req);
        }
    }
}

pub(crate) fn fault_loop(r: Arc<Remote>, urgent: Sock, generation: u64) {
    let sh = r.shared.clone();
    place_fault_thread(&sh.config);
    let total = sh.total_pages();
    let cfg = sh.config.clone();
    let mut t = FaultThread {
        r: r.clone(),
        policy: Policy::new(total, cfg.prefetch_min_pages, cfg.prefetch_max_pages),
        conn: Some((urgent, generation)),
        rbuf: vec![0u8; HEADER_LEN + MAX_PAYLOAD_BYTES as usize],
        filled: 0,
        faults: Vec::with_capacity(64),
        reqs: Vec::new(),
        out: Vec::with_capacity(64),
    };
    while !sh.stop.load(Ordering::Acquire) {
        let conn_fd = t.conn.as_ref().map(|(s, _)| s.as_fd());
        // while pages are awaited from the stream, look now and then even without a wake-up
        // (a backstop: the streamers wake us when they install)
        let timeout_ms = if t.conn.as_ref().is_some_and(|(s, _)| s.has_buffered_input()) {
            // replies already read and decrypted (poll(2) cannot see them): no waiting
            0
        } else if t.policy.streaming() > 0 {
            10
        } else {
            1000
        };
        let ready = poll_in(
            [Some(sh.uffd.as_fd()), Some(r.waker.as_fd()), conn_fd],
            timeout_ms,
        );
        if ready[1] {
            r.waker.drain();
            let inbox = r.inbox.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((s, g)) = inbox {
                t.resume(s, g);
            }
            let early = std::mem::take(&mut *r.early.lock().unwrap_or_else(|p| p.into_inner()));
            t.fetch(&early);
        }
        t.handle_faults();
        t.handle_replies();
        t.stream_arrivals();
        sh.waiting.store(
            (t.policy.outstanding() + t.policy.streaming()) as u64,
            Ordering::Relaxed,
        );
        // a reply usually comes within tens of microseconds: spin for it rather than pay a
        // sleep and a wake-up
        if t.policy.outstanding() > 0 && t.conn.is_some() {
            let until = Instant::now() + cfg.reply_spin;
            while t.policy.outstanding() > 0 && t.conn.is_some() && Instant::now() < until {
                if !t.handle_replies() {
                    std::thread::yield_now();
                }
                t.handle_faults();
            }
        }
    }
}
