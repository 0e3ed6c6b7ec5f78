//! The event loop: accepts clients, reads and writes their control and urgent connections (mio,
//! one thread; what their frames ask for is answered by `dispatch`), drops the stalled, and
//! hands each bulk connection to a streaming thread of its own.
//! A misbehaving client is dropped with one log line; nobody else notices.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use proto::error_code;

use crate::bulk;
use crate::conn::{complete_frame, flush, pressured, reply_error, Conn, Next, Role};
use crate::dispatch::handle_frames;
use crate::error::ServerError;
use crate::listen::Listener;
use crate::session::Session;
use crate::shared::Core;
use transport::Addr;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// A connection that has not completed its Hello this long after connecting is dropped (a
/// pager sends its Hello at once, and gives up on the Welcome after its connect timeout).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection holding part of a frame, with nothing of ours pending for it, that sends
/// nothing more for this long is dropped (a client writes whole frames; a peer whose host
/// vanished is caught sooner by the liveness timeout).
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds of reading and answering one connection takes per event before the loop turns to
/// the others (it comes back for the rest at once).
const ROUNDS_PER_EVENT: usize = 8;
/// Connections the event loop holds at once (beyond them a new one is closed at once).
const MAX_CONNECTIONS: usize = 1024;
/// Lines about clients dropped before their Hello: a few per second, the rest counted.
static NEW_DROPS: transport::LogLimiter = transport::LogLimiter::new(5, Duration::from_secs(1));
/// How often the event loop looks for connections past those timeouts.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Runs the event loop until woken with `stop` set.
pub(crate) fn run(
    core: Arc<Core>,
    mut listener: Listener,
    addr: Addr,
    mut poll: Poll,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), ServerError> {
    // The loop answers the destination's faults: above normal priority (short work that a
    // waiting vCPU waits for; best effort, it needs CAP_SYS_NICE), so that neither the bulk
    // stream nor the guest's own vCPUs delay a fault reply.
    transport::sched::set_nice(transport::sched::URGENT_NICE);
    if let Some(cpu) = core.config.urgent_cpu {
        if !transport::sched::pin_current_thread(cpu) {
            warn!("cannot pin the event loop to CPU {cpu}");
        }
    }
    let src: &mut dyn mio::event::Source = match &mut listener {
        Listener::Tcp(l) => l,
        Listener::Unix(l) => l,
    };
    poll.registry()
        .register(src, LISTENER, Interest::READABLE)
        .map_err(ServerError::Poll)?;
    let mut conns: HashMap<Token, Conn> = HashMap::new();
    let mut sessions: HashMap<u64, Arc<Session>> = HashMap::new();
    let mut next_token = 2usize;
    let mut events = Events::with_capacity(256);
    let mut scratch = vec![0u8; 256 << 10];
    let mut last_sweep = Instant::now();
    loop {
        if let Err(e) = poll.poll(&mut events, Some(SWEEP_EVERY)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ServerError::Poll(e));
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => accept_all(
                    &mut listener,
                    &poll,
                    &mut conns,
                    &mut next_token,
                    core.config.liveness_timeout,
                    &core.config.security,
                ),
                WAKER => {}
                t => {
                    let Some(conn) = conns.get_mut(&t) else {
                        continue;
                    };
                    // the peer's close may come with its last bytes, in the same edge
                    let closed = ev.is_read_closed() || ev.is_error();
                    let next = service(&core, conn, &mut sessions, &mut scratch, closed);
                    match next {
                        Next::Keep => {
                            if let Err(e) = arm_writable(&poll, t, conn) {
                                drop_conn(
                                    &poll,
                                    &mut conns,
                                    t,
                                    Some(format!("re-register: {e}")),
                                    &mut sessions,
                                );
                            }
                        }
                        Next::Drop(why) => drop_conn(&poll, &mut conns, t, why, &mut sessions),
                        Next::Bulk(session) => {
                            if let Some(c) = conns.remove(&t) {
                                c.sock.deregister(&poll);
                                start_bulk(&core, c, session);
                            }
                        }
                    }
                }
            }
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            drop_stalled(&poll, &mut conns, &mut sessions);
        }
    }
    for s in sessions.values() {
        s.close();
    }
    // the bulk threads end on the closed sessions' shut sockets: wait for them, so that no
    // thread of ours reads the memory once stop() has returned
    let bulk = std::mem::take(&mut *core.bulk_threads.lock().unwrap_or_else(|e| e.into_inner()));
    for t in bulk {
        let _ = t.join();
    }
    if let Addr::Unix(p) = &addr {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn accept_all(
    listener: &mut Listener,
    poll: &Poll,
    conns: &mut HashMap<Token, Conn>,
    next: &mut usize,
    liveness: std::time::Duration,
    security: &transport::Security,
) {
    loop {
        let r = crate::listen::accept(listener, liveness, security);
        match r {
            Ok((_, peer)) if conns.len() >= MAX_CONNECTIONS => {
                // closed at once: a flood holds at most this many, each for the handshake
                // deadline at most, and the listener stays free for the real client
                NEW_DROPS.warn(format_args!(
                    "client {peer}: dropped: {MAX_CONNECTIONS} connections open"
                ));
            }
            Ok((sock, peer)) => {
                let t = Token(*next);
                *next += 1;
                if let Err(e) = sock.register(poll, t, Interest::READABLE, false) {
                    warn!("client {peer}: cannot register: {e}");
                    continue;
                }
                debug!("client {peer}: connected");
                conns.insert(
                    t,
                    Conn {
                        sock,
                        peer,
                        role: Role::New,
                        rbuf: Vec::new(),
                        wbuf: Vec::new(),
                        wpos: 0,
                        writable_armed: false,
                        opened: Instant::now(),
                        last_io: Instant::now(),
                        again: false,
                    },
                );
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!("accept failed: {e}");
                return;
            }
        }
    }
}

fn drop_conn(
    poll: &Poll,
    conns: &mut HashMap<Token, Conn>,
    t: Token,
    why: Option<String>,
    sessions: &mut HashMap<u64, Arc<Session>>,
) {
    let Some(c) = conns.remove(&t) else {
        return;
    };
    c.sock.deregister(poll);
    match why {
        // before its Hello a client is nobody (unauthenticated, or not through its handshake):
        // a flood of those gets a few lines a second and a count, not a line each
        Some(why) if matches!(c.role, Role::New) => {
            NEW_DROPS.warn(format_args!("client {}: dropped: {why}", c.peer))
        }
        Some(why) => warn!("client {}: dropped: {why}", c.peer),
        None => debug!("client {}: closed", c.peer),
    }
    if let Role::Control(s) = &c.role {
        s.close();
        sessions.remove(&s.id);
        let st = &s.stats;
        info!(
            "session {}: ended; pages sent: fault {}, prefetch {}, stream {} ({} zero), {} MiB of data; {} faults answered in flight",
            s.id,
            st.fault_pages.load(Ordering::Relaxed),
            st.prefetch_pages.load(Ordering::Relaxed),
            st.stream_pages.load(Ordering::Relaxed),
            st.zero_pages.load(Ordering::Relaxed),
            st.data_bytes.load(Ordering::Relaxed) >> 20,
            st.in_flight_replies.load(Ordering::Relaxed)
        );
    }
}

/// Why `c` has stalled past its timeout, if it has.
fn stalled(c: &Conn, now: Instant) -> Option<String> {
    if matches!(c.role, Role::New) && now.duration_since(c.opened) > HANDSHAKE_TIMEOUT {
        return Some(format!(
            "no complete Hello within {HANDSHAKE_TIMEOUT:?} of connecting ({} bytes of a frame received)",
            c.rbuf.len()
        ));
    }
    let waiting_for_us = c.wpos < c.wbuf.len();
    let partial = !c.rbuf.is_empty() && !complete_frame(&c.rbuf);
    if partial && !waiting_for_us && now.duration_since(c.last_io) > STALL_TIMEOUT {
        return Some(format!(
            "stalled mid-frame: {} bytes of a frame received, then nothing for {STALL_TIMEOUT:?}",
            c.rbuf.len()
        ));
    }
    None
}

/// Drops, with an error frame and a log line, every connection stalled past its timeout.
fn drop_stalled(
    poll: &Poll,
    conns: &mut HashMap<Token, Conn>,
    sessions: &mut HashMap<u64, Arc<Session>>,
) {
    let now = Instant::now();
    let late: Vec<(Token, String)> = conns
        .iter()
        .filter_map(|(t, c)| stalled(c, now).map(|why| (*t, why)))
        .collect();
    for (t, why) in late {
        if let Some(c) = conns.get_mut(&t) {
            reply_error(c, error_code::PROTOCOL, &why);
        }
        drop_conn(poll, conns, t, Some(why), sessions);
    }
}

/// Asks for writable events while replies wait — or, when `service` left work for later, for
/// one at once (re-registering a writable socket reports it writable right away).
fn arm_writable(poll: &Poll, t: Token, c: &mut Conn) -> io::Result<()> {
    let want = c.wpos < c.wbuf.len() || c.again || c.sock.0.pending_out();
    if want != c.writable_armed || c.again {
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        c.sock.register(poll, t, interest, true)?;
        c.writable_armed = want;
    }
    Ok(())
}

/// Reads what is available, handles whole frames, writes replies. `closed`: the event said
/// the peer closed, so read on to the end even after a short read.
fn service(
    core: &Core,
    c: &mut Conn,
    sessions: &mut HashMap<u64, Arc<Session>>,
    scratch: &mut [u8],
    closed: bool,
) -> Next {
    if let Err(e) = flush(c) {
        return Next::Drop(Some(format!("write failed: {e}")));
    }
    let mut eof = false;
    let mut more = true;
    let mut held_back = false;
    for _ in 0..ROUNDS_PER_EVENT {
        let mut drained = false;
        // back-pressure: past MAX_PENDING_WRITE of replies, read again once they drain
        while !eof && !pressured(c) {
            match c.sock.read(scratch) {
                Ok(0) => eof = true,
                Ok(n) => {
                    c.last_io = Instant::now();
                    c.rbuf.extend_from_slice(&scratch[..n]);
                    if let Some(next) = handle_frames(core, c, sessions) {
                        return next;
                    }
                    if !closed && c.sock.0.drained_after(n < scratch.len()) {
                        // a short read drained the socket: edge-triggered epoll reports new data
                        drained = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Next::Drop(Some(format!("read failed: {e}"))),
            }
        }
        if let Some(next) = handle_frames(core, c, sessions) {
            return next;
        }
        // handle_frames holds frames back while MAX_PENDING_WRITE of replies wait, then
        // flushes them: a client that reads as fast as it asks may have taken them all, and
        // then no event would ever come for the frames and bytes still waiting — go on here
        if pressured(c) || eof || (drained && !complete_frame(&c.rbuf)) {
            held_back = pressured(c) && !eof;
            more = false;
            break;
        }
    }
    if let Err(e) = flush(c) {
        return Next::Drop(Some(format!("write failed: {e}")));
    }
    // Out of rounds with work left, or reading was held back by the replies waiting and this
    // flush has just let them all go: `arm_writable` has the loop come back. (Without the
    // second, a client that had sent all its requests and read every reply at once got no
    // event ever again for the requests still unread: a request-flood test saw 30 s of
    // silence in a CI run.)
    c.again = more || (held_back && !pressured(c));
    if eof {
        return if c.rbuf.is_empty() {
            Next::Drop(None)
        } else {
            Next::Drop(Some(format!(
                "closed mid-frame ({} bytes of a frame received)",
                c.rbuf.len()
            )))
        };
    }
    Next::Keep
}

fn start_bulk(core: &Arc<Core>, c: Conn, session: Arc<Session>) {
    let Conn {
        sock,
        peer,
        wbuf,
        wpos,
        ..
    } = c;
    let mut sock = match sock.into_blocking() {
        Ok(s) => s,
        Err(e) => {
            warn!("client {peer}: dropped: cannot switch bulk socket to blocking: {e}");
            return;
        }
    };
    if let Err(e) = sock
        .write_all(&wbuf[wpos..])
        .and_then(|_| sock.flush_pending())
    {
        warn!("client {peer}: dropped: bulk welcome failed: {e}");
        return;
    }
    match sock.try_clone() {
        Ok(clone) => session.add_bulk_sock(clone),
        Err(e) => {
            warn!("client {peer}: dropped: {e}");
            return;
        }
    }
    if session.is_closed() {
        let _ = sock.shutdown(Shutdown::Both);
        return;
    }
    let core = core.clone();
    let threads = core.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("bulk-{}", session.id))
        .spawn(move || bulk::run(core, sock, peer, session));
    match spawned {
        Ok(t) => {
            let mut v = threads
                .bulk_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            v.retain(|t| !t.is_finished());
            v.push(t);
        }
        Err(e) => warn!("cannot start a bulk thread: {e}"),
    }
}

/// Creates the poll and its waker.
pub(crate) fn new_poll() -> io::Result<(Poll, Arc<Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    Ok((poll, waker))
}
