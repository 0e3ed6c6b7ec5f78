//! The network source: session setup (control, urgent, bulk connections), the streamers, the
//! supervisor that completes, or reconnects after a loss, and starting a deferred stream.
//! The fault thread is in `fault.rs`, the state all of them share in `link.rs`.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use proto::handshake::{check, offer, Offer};
use proto::{read_frame, BitmapKind, Channel, Layout, Message, PageIndex};
use transport::{error_chain, Addr, Sock};

use crate::config::{PagerConfig, RECONNECT_BACKOFF_MAX};
use crate::error::PagerError;
use crate::event::PagerEvent;
use crate::placement::place_streamer;
use crate::region::HostMemory;
use crate::shared::{Running, Shared};
use crate::stream_rx::{RxError, StreamRx};
use crate::wake::Waker;

mod fault;
mod link;

use fault::fault_loop;
pub(crate) use link::Remote;
use link::{Control, Session};

fn proto_err(addr: &Addr, what: impl Into<String>) -> PagerError {
    PagerError::Protocol {
        addr: addr.to_string(),
        what: what.into(),
    }
}

/// Opens one channel: Hello, then Welcome (checked against our page size and layout).
fn open_channel(
    addr: &Addr,
    config: &PagerConfig,
    channel: Channel,
    session: u64,
    expected: &Layout,
    timeout: Duration,
) -> Result<(Sock, u64, Layout), PagerError> {
    let conn_err = |source| PagerError::Connect {
        addr: addr.to_string(),
        source,
    };
    let sock = Sock::connect(addr, channel != Channel::Bulk, timeout).map_err(conn_err)?;
    if let Err(e) = sock.set_liveness(config.liveness_timeout) {
        debug!("{addr}: keepalive options: {e}");
    }
    // every channel, and every reconnect, authenticates both sides in full before a frame
    let mut sock = config.security.client(sock, timeout).map_err(conn_err)?;
    sock.set_read_timeout(Some(timeout.max(Duration::from_millis(100))))
        .map_err(conn_err)?;
    sock.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(conn_err)?;
    sock.write_all(&proto::hello(channel, session, config.page_size, expected.clone()).to_vec())
        .map_err(conn_err)?;
    let mut buf = Vec::new();
    let header = read_frame(&mut sock, &mut buf)
        .map_err(|e| proto_err(addr, format!("reading Welcome: {}", error_chain(&e))))?;
    match Message::decode(&header, &buf, config.page_size) {
        Ok(Message::Welcome(w)) => {
            let theirs = Offer {
                version: w.version,
                page_size: w.page_size,
                layout: &w.layout,
            };
            check(offer(config.page_size, expected), theirs).map_err(|source| {
                PagerError::Handshake {
                    addr: addr.to_string(),
                    source,
                }
            })?;
            if w.layout.regions.is_empty() {
                return Err(proto_err(addr, "Welcome carries an empty layout"));
            }
            if session != 0 && w.session != session {
                return Err(proto_err(
                    addr,
                    format!("Welcome for session {}, asked for {session}", w.session),
                ));
            }
            sock.set_read_timeout(None).map_err(conn_err)?;
            Ok((sock, w.session, w.layout))
        }
        Ok(Message::Error { code, reason }) => Err(PagerError::Refused {
            addr: addr.to_string(),
            code,
            reason: reason.to_string(),
        }),
        Ok(m) => Err(proto_err(
            addr,
            format!("expected Welcome, got {:?}", m.kind()),
        )),
        Err(e) => Err(proto_err(addr, format!("bad Welcome: {e}"))),
    }
}

fn connect_session(
    addr: &Addr,
    config: &PagerConfig,
    expected: &Layout,
    timeout: Duration,
) -> Result<Session, PagerError> {
    let (control, id, layout) = open_channel(addr, config, Channel::Control, 0, expected, timeout)?;
    let (urgent, _, _) = open_channel(addr, config, Channel::Urgent, id, &layout, timeout)?;
    let mut bulks = Vec::new();
    let n = if config.stream {
        config.bulk_connections.max(1)
    } else {
        0
    };
    for _ in 0..n {
        let (b, _, _) = open_channel(addr, config, Channel::Bulk, id, &layout, timeout)?;
        b.set_buffers(config.bulk_buffer_bytes);
        bulks.push(b);
    }
    debug!("session {id} with {addr}: control, urgent, {n} bulk connections");
    Ok(Session {
        control,
        urgent,
        bulks,
        layout,
    })
}

impl Remote {
    fn spawn_streamers(
        self: &Arc<Self>,
        bulks: Vec<Sock>,
        generation: u64,
    ) -> Result<Vec<std::thread::JoinHandle<()>>, PagerError> {
        let mut v = Vec::new();
        for (i, b) in bulks.into_iter().enumerate() {
            let r = self.clone();
            v.push(
                std::thread::Builder::new()
                    .name(format!("pager-stream{i}"))
                    .spawn(move || stream_loop(r, b, generation))
                    .map_err(PagerError::Spawn)?,
            );
        }
        Ok(v)
    }
}

pub(crate) fn start(
    addr: &Addr,
    adopt: Option<(HostMemory, Layout)>,
    config: PagerConfig,
) -> Result<(Running, Arc<Remote>), PagerError> {
    let expected = adopt.as_ref().map(|(_, l)| l.clone()).unwrap_or_default();
    let mut session = connect_session(addr, &config, &expected, config.connect_timeout)?;
    let mem = match adopt {
        Some((m, _)) => m,
        None => HostMemory::map(&session.layout, config.page_size).map_err(|source| {
            PagerError::Map {
                len_bytes: session.layout.total_bytes(),
                source,
            }
        })?,
    };
    let stream = config.stream && !config.stream_deferred;
    let config_attempt = config.reconnect_attempt_timeout;
    let (shared, rx) = Shared::start(mem, config)?;
    let waker = Arc::new(Waker::new().map_err(PagerError::Spawn)?);
    let control = Control {
        held: None,
        stream_started: stream,
        sock: Some(
            session
                .control
                .try_clone()
                .map_err(|source| PagerError::Connect {
                    addr: addr.to_string(),
                    source,
                })?,
        ),
    };
    let remote = Arc::new(Remote {
        shared: shared.clone(),
        addr: addr.clone(),
        waker: waker.clone(),
        inbox: Mutex::new(None),
        early: Mutex::new(Vec::new()),
        generation: AtomicU64::new(1),
        lost: Mutex::new(None),
        layout: session.layout.clone(),
        attempt_timeout: session
            .control
            .rtt()
            .map_or(Duration::ZERO, |rtt| rtt * 4 + Duration::from_millis(50))
            .max(config_attempt),
        control: Mutex::new(control),
    });
    remote.register_socks(&session);
    if stream {
        session
            .control
            .write_all(&Message::Stream { enable: true }.to_vec())
            .map_err(|source| PagerError::Connect {
                addr: addr.to_string(),
                source,
            })?;
    }
    let mut threads = Vec::new();
    let r = remote.clone();
    let urgent = session.urgent;
    threads.push(
        std::thread::Builder::new()
            .name("pager-fault".into())
            .spawn(move || fault_loop(r, urgent, 1))
            .map_err(PagerError::Spawn)?,
    );
    let bulks = std::mem::take(&mut session.bulks);
    let streamers = remote.spawn_streamers(bulks, 1)?;
    let r = remote.clone();
    let control = session.control;
    threads.push(
        std::thread::Builder::new()
            .name("pager-supervisor".into())
            .spawn(move || supervise(r, control, streamers))
            .map_err(PagerError::Spawn)?,
    );
    Ok(Running::with(shared, threads, waker, rx, remote))
}

/// Hands `addrs` to the fault thread, which asks for them on its next round.
pub(crate) fn fetch_early(r: &Remote, addrs: &[u64]) {
    if addrs.is_empty() || r.shared.is_complete() {
        return;
    }
    r.early
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend_from_slice(addrs);
    r.waker.wake();
}

/// Says Done to the source on the control connection kept by
/// [`crate::PagerConfig::hold_done`] (see [`crate::Pager::release_done`]).
pub(crate) fn release_done(r: &Remote) -> Result<(), PagerError> {
    let held = r
        .control
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .held
        .take();
    let Some(mut s) = held else {
        return Err(PagerError::Stopped);
    };
    let sent = s.write_all(&Message::Done.to_vec());
    let _ = s.shutdown(Shutdown::Both);
    sent.map_err(|source| PagerError::Connect {
        addr: s.peer_name(),
        source,
    })
}

/// Asks the source for the stream (see [`Pager::start_stream`]).
pub(crate) fn start_stream(r: &Remote) -> Result<(), PagerError> {
    let sh = &r.shared;
    if !sh.config.stream || sh.is_complete() {
        return Ok(());
    }
    if sh.has_failed() {
        return Err(PagerError::Stopped);
    }
    let mut c = r.control.lock().unwrap_or_else(|p| p.into_inner());
    if c.stream_started {
        return Ok(());
    }
    c.stream_started = true;
    let Some(sock) = c.sock.as_mut() else {
        return Ok(()); // reconnecting: the new session enables it
    };
    if let Err(e) = sock.write_all(&Message::Stream { enable: true }.to_vec()) {
        drop(c);
        // the reconnect this starts enables the stream on the new session
        r.report_lost(
            r.generation.load(Ordering::Acquire),
            format!("control connection: starting the stream: {e}"),
        );
    }
    Ok(())
}

fn stream_loop(r: Arc<Remote>, mut sock: Sock, generation: u64) {
    let sh = r.shared.clone();
    place_streamer(&sh.config);
    let mut rx = StreamRx::new(sh.mem.page_size() as usize);
    loop {
        match rx.receive(&mut sock, &sh) {
            Ok(()) => {
                // the fault thread awaits pages from the stream: let it look (it publishes
                // the count before looking at the pages; see `FaultThread::stream_arrivals`)
                fence(Ordering::SeqCst);
                if sh.awaited_from_stream.load(Ordering::Relaxed) > 0 {
                    r.waker.wake();
                }
            }
            Err(RxError::Install(e)) => {
                sh.fail(e);
                return;
            }
            Err(RxError::Lost(cause)) => {
                r.report_lost(generation, format!("bulk connection: {cause}"));
                return;
            }
        }
    }
}

/// Whether the control connection is still up (the server never sends on it unprompted).
fn control_alive(s: &Sock) -> Result<(), String> {
    let mut b = [0u8; 1];
    match recv(
        s.as_raw_fd(),
        &mut b,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK,
    ) {
        Ok(0) => Err("control connection closed by the source".into()),
        Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(format!("control connection: {}", io::Error::from(e))),
    }
}

fn supervise(r: Arc<Remote>, control: Sock, mut streamers: Vec<std::thread::JoinHandle<()>>) {
    let sh = r.shared.clone();
    let mut control = Some(control);
    let mut stall = Stall::new(sh.present_pages());
    // when the source was first lost without a page arriving since: a source that takes every
    // reconnect and then breaks again (or lies) gets the reconnect timeout once, not each time
    let mut fruitless: Option<(Instant, u64)> = None;
    loop {
        let (complete, failed) = sh.wait_outcome(Duration::from_millis(20));
        if complete {
            finish(&r, control.take());
            break;
        }
        if failed || sh.stop.load(Ordering::Acquire) {
            break;
        }
        if let Some(c) = &control {
            if let Err(cause) = control_alive(c) {
                r.report_lost(r.generation.load(Ordering::Acquire), cause);
            } else if let Some(cause) = stall.check(&r) {
                r.report_lost(r.generation.load(Ordering::Acquire), cause);
            }
        }
        let lost = r.lost.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((generation, cause)) = lost else {
            continue;
        };
        if generation != r.generation.load(Ordering::Acquire) {
            continue;
        }
        warn!(
            "source {} lost: {cause}; reconnecting for up to {:?}",
            r.addr, sh.config.reconnect_timeout
        );
        sh.event(PagerEvent::SourceLost {
            cause: cause.clone(),
        });
        sh.shutdown_socks();
        drop(control.take());
        r.control.lock().unwrap_or_else(|p| p.into_inner()).sock = None;
        for t in streamers.drain(..) {
            let _ = t.join();
        }
        let lost_at = Instant::now();
        let present = sh.present_pages();
        let since = match fruitless {
            Some((t, p)) if p == present => t,
            _ => lost_at,
        };
        fruitless = Some((since, present));
        let outcome = reconnect(&r, since);
        sh.stats
            .disconnected_ns
            .fetch_add(lost_at.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stall = Stall::new(sh.present_pages());
        match outcome {
            Ok((c, s)) => {
                control = Some(c);
                streamers = s;
            }
            Err(waited) => {
                if !sh.stop.load(Ordering::Acquire) {
                    sh.fail(PagerError::SourceLost {
                        addr: r.addr.to_string(),
                        cause,
                        waited,
                        missing: sh.total_pages() - sh.present_pages(),
                    });
                }
                break;
            }
        }
    }
    sh.shutdown_socks();
    r.waker.wake();
    for t in streamers {
        let _ = t.join();
    }
}

/// Notices a source that is connected but sends nothing: no page has arrived for
/// [`PagerConfig::stall_timeout`] while pages are missing and awaited (by faults, or by a
/// started stream). TCP cannot tell this: a stopped or wedged process's kernel still
/// acknowledges, and a peer that stalls mid-frame keeps its connection open.
struct Stall {
    present: u64,
    since: Instant,
}

impl Stall {
    fn new(present: u64) -> Stall {
        Stall {
            present,
            since: Instant::now(),
        }
    }

    fn check(&mut self, r: &Remote) -> Option<String> {
        let sh = &r.shared;
        let present = sh.present_pages();
        let limit = sh.config.stall_timeout;
        if present != self.present || limit.is_zero() {
            *self = Stall::new(present);
            return None;
        }
        if self.since.elapsed() < limit || present == sh.total_pages() {
            return None;
        }
        let waiting = sh.waiting.load(Ordering::Relaxed);
        let streaming = r
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stream_started;
        // during pre-copy the stream may well be idle (all sent, the VM writes nothing new)
        if sh.precopy.load(Ordering::Acquire) || (waiting == 0 && !streaming) {
            return None;
        }
        let cause = format!(
            "no page arrived for {:.0} s while {} are missing ({waiting} awaited by faults); \
             the source is stopped, wedged or stalls mid-frame",
            self.since.elapsed().as_secs_f64(),
            sh.total_pages() - present
        );
        *self = Stall::new(present);
        Some(cause)
    }
}

/// Every page is present: stop faulting through uffd, tell the source, close everything.
fn finish(r: &Remote, control: Option<Sock>) {
    let sh = &r.shared;
    sh.unregister();
    let writer = r
        .control
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sock
        .take();
    if let (Some(mut w), Some(c)) = (writer, control) {
        if sh.config.hold_done {
            // the owner says Done once what it made of the pages is safe (release_done)
            r.control.lock().unwrap_or_else(|p| p.into_inner()).held = Some(w);
        } else {
            if let Err(e) = w.write_all(&Message::Done.to_vec()) {
                debug!("sending Done: {e}");
            }
            let _ = c.shutdown(Shutdown::Both);
        }
    }
    sh.stop.store(true, Ordering::Release);
    sh.shutdown_socks();
    r.waker.wake();
    info!(
        "all {} pages present after {:?}; source released",
        sh.total_pages(),
        sh.started.elapsed()
    );
    sh.event(PagerEvent::Complete);
}

type Reconnected = (Sock, Vec<std::thread::JoinHandle<()>>);

/// Reconnects with bounded exponential back-off until the reconnect timeout counted from
/// `since` (the loss, or an earlier one with no page in between). Err(time spent) when it
/// passes.
fn reconnect(r: &Arc<Remote>, since: Instant) -> Result<Reconnected, Duration> {
    let sh = &r.shared;
    let start = since;
    let deadline = start + sh.config.reconnect_timeout;
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0u64;
    loop {
        // (also when earlier reconnects, each taken and then broken, used up the time)
        if sh.stop.load(Ordering::Acquire) || Instant::now() >= deadline {
            return Err(start.elapsed());
        }
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = r.attempt_timeout.min(left).max(Duration::from_millis(50));
        match connect_session(&r.addr, &sh.config, &r.layout, timeout).and_then(|s| resume(r, s)) {
            Ok(x) => return Ok(x),
            Err(e) => {
                // the first failure and then one in 20 (~every 5 s): a cut link is quiet
                if attempts == 1 || attempts.is_multiple_of(20) {
                    info!(
                        "reconnect attempt {attempts} to {} ({:.1} s without it): {}",
                        r.addr,
                        start.elapsed().as_secs_f64(),
                        error_chain(&e)
                    );
                } else {
                    debug!("reconnect to {}: {e}", r.addr);
                }
                if Instant::now() + backoff > deadline {
                    return Err(start.elapsed());
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
        }
    }
}

fn resume(r: &Arc<Remote>, mut s: Session) -> Result<Reconnected, PagerError> {
    let sh = &r.shared;
    let addr_err = |source| PagerError::Connect {
        addr: r.addr.to_string(),
        source,
    };
    // tell the source what we have, so it sends only the rest
    let bits = sh.received.to_bytes();
    let chunk_bits: u64 = 1 << 25;
    let mut first = 0u64;
    while first < sh.total_pages() {
        let count = chunk_bits.min(sh.total_pages() - first);
        let lo = (first / 8) as usize;
        let hi = lo + count.div_ceil(8) as usize;
        let msg = Message::Bitmap(proto::Bitmap {
            kind: BitmapKind::Received,
            first: PageIndex(first),
            count,
            bits: &bits[lo..hi],
        });
        s.control.write_all(&msg.to_vec()).map_err(addr_err)?;
        first += count;
    }
    {
        // under the lock: a `start_stream` either happened before (we enable the stream
        // here) or finds the new connection (and enables it there)
        let mut c = r.control.lock().unwrap_or_else(|p| p.into_inner());
        if c.stream_started {
            s.control
                .write_all(&Message::Stream { enable: true }.to_vec())
                .map_err(addr_err)?;
        }
        c.sock = Some(s.control.try_clone().map_err(addr_err)?);
    }
    let generation = r.generation.fetch_add(1, Ordering::AcqRel) + 1;
    r.register_socks(&s);
    let urgent = s.urgent.try_clone().map_err(addr_err)?;
    *r.inbox.lock().unwrap_or_else(|p| p.into_inner()) = Some((urgent, generation));
    r.waker.wake();
    let streamers = r.spawn_streamers(std::mem::take(&mut s.bulks), generation)?;
    let n = sh.stats.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
    info!(
        "reconnected to {} (reconnect #{n}); {} pages still missing",
        r.addr,
        sh.total_pages() - sh.present_pages()
    );
    sh.event(PagerEvent::Reconnected { count: n });
    Ok((s.control, streamers))
}
