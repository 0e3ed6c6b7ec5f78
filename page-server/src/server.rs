//! The event loop: accepts clients, runs the handshake, answers control and urgent traffic
//! (mio, one thread), and hands each bulk connection to a streaming thread of its own.
//! A misbehaving client is dropped with one log line; nobody else notices.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use proto::handshake::{check, offer, Offer};
use proto::{
    error_code, Channel, Header, Kind, Message, Origin, PageIndex, Welcome, HEADER_LEN,
    MAX_REASON_BYTES, MAX_REGIONS, PROTOCOL_VERSION,
};

use crate::bulk;
use crate::error::ServerError;
use crate::listen::{Listener, MioSock};
use crate::session::{build_frame, Claim, Frame, Session};
use crate::shared::Core;
use transport::Addr;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// A client whose reply buffer holds more than this stops being read until it drains it. The
/// buffer sheds what was written once that is half of it (see `flush`), so it never holds
/// more than this plus one reply.
const MAX_PENDING_WRITE: usize = 16 << 20;
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
/// How often the event loop looks for connections past those timeouts.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Largest Hello payload: the fixed fields and a layout of [`MAX_REGIONS`] regions. A new
/// connection announcing more is refused on its header, before anything is buffered for it.
const MAX_HELLO_PAYLOAD: u32 = 20 + 16 * MAX_REGIONS as u32;
/// Largest payload on an urgent connection (a request is 16 bytes, an error its reason).
const MAX_URGENT_PAYLOAD: u32 = 2 + MAX_REASON_BYTES as u32;

enum Role {
    New,
    Control(Arc<Session>),
    Urgent(Arc<Session>),
}

struct Conn {
    sock: MioSock,
    peer: String,
    role: Role,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    writable_armed: bool,
    /// When it connected (for [`HANDSHAKE_TIMEOUT`]).
    opened: Instant,
    /// When bytes last moved either way (for [`STALL_TIMEOUT`]).
    last_io: Instant,
    /// `service` stopped with frames or bytes left to handle: come back without an event.
    again: bool,
}

/// What to do with a connection after handling its input.
enum Next {
    Keep,
    /// Drop it; the string is the one log line (None: a clean close).
    Drop(Option<String>),
    /// Hand it to a bulk thread.
    Bulk(Arc<Session>),
}

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
                            if let Some(mut c) = conns.remove(&t) {
                                let _ = poll.registry().deregister(c.sock.source());
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
) {
    loop {
        let r = crate::listen::accept(listener, liveness);
        match r {
            Ok((mut sock, peer)) => {
                let t = Token(*next);
                *next += 1;
                if let Err(e) = poll
                    .registry()
                    .register(sock.source(), t, Interest::READABLE)
                {
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
    let Some(mut c) = conns.remove(&t) else {
        return;
    };
    let _ = poll.registry().deregister(c.sock.source());
    match why {
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
    let want = c.wpos < c.wbuf.len() || c.again;
    if want != c.writable_armed || c.again {
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        poll.registry().reregister(c.sock.source(), t, interest)?;
        c.writable_armed = want;
    }
    Ok(())
}

/// Flushes pending output; Err is fatal for the connection. What was written is dropped from
/// the buffer once it is at least half of it, so a client that keeps the buffer from ever
/// emptying (requests pipelined as fast as it reads) does not make it grow without bound.
fn flush(c: &mut Conn) -> io::Result<()> {
    while c.wpos < c.wbuf.len() {
        match c.sock.write(&c.wbuf[c.wpos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.wpos += n;
                c.last_io = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if c.wpos == c.wbuf.len() {
        c.wbuf.clear();
        c.wpos = 0;
        if c.wbuf.capacity() > 4 << 20 {
            c.wbuf.shrink_to(1 << 20);
        }
    } else if c.wpos >= c.wbuf.len() / 2 {
        c.wbuf.drain(..c.wpos);
        c.wpos = 0;
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
                    if n < scratch.len() && !closed {
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
            more = false;
            break;
        }
    }
    // out of rounds with work left: `arm_writable` has the loop come back (fairness)
    c.again = more;
    if let Err(e) = flush(c) {
        return Next::Drop(Some(format!("write failed: {e}")));
    }
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

/// Whether `c` holds so much output that it is not read until that drains (nothing pending
/// means an empty buffer: `flush` clears it).
fn pressured(c: &Conn) -> bool {
    c.wbuf.len() > MAX_PENDING_WRITE
}

/// Whether `rbuf` starts with a whole frame (or a header `handle_frames` will refuse).
fn complete_frame(rbuf: &[u8]) -> bool {
    rbuf.len() >= HEADER_LEN
        && Header::decode(rbuf).map_or(true, |h| rbuf.len() >= HEADER_LEN + h.payload_len as usize)
}

fn reply_error(c: &mut Conn, code: u16, reason: &str) {
    Message::Error { code, reason }.encode(&mut c.wbuf);
    let _ = flush(c);
}

/// Handles every whole frame in `rbuf`. Some(next) ends servicing the connection.
fn handle_frames(
    core: &Core,
    c: &mut Conn,
    sessions: &mut HashMap<u64, Arc<Session>>,
) -> Option<Next> {
    let page_size = core.map.mem().page_size();
    let mut used = 0;
    let mut result = None;
    while c.rbuf.len() - used >= HEADER_LEN && !pressured(c) {
        let header = match Header::decode(&c.rbuf[used..]) {
            Ok(h) => h,
            Err(e) => {
                reply_error(c, error_code::PROTOCOL, &e.to_string());
                return Some(Next::Drop(Some(format!("bad frame header: {e}"))));
            }
        };
        if let Some(why) = unfit_for_role(&c.role, &header) {
            reply_error(c, error_code::PROTOCOL, &why);
            return Some(Next::Drop(Some(why)));
        }
        let end = used + HEADER_LEN + header.payload_len as usize;
        if c.rbuf.len() < end {
            break;
        }
        let payload = &c.rbuf[used + HEADER_LEN..end];
        let msg = match Message::decode(&header, payload, page_size) {
            Ok(m) => m,
            Err(e) => {
                let why = format!("bad {:?} frame: {e}", header.kind);
                reply_error(c, error_code::PROTOCOL, &why);
                return Some(Next::Drop(Some(why)));
            }
        };
        // `msg` borrows rbuf; take what we need before touching `c` mutably
        let action = classify(core, &c.role, msg, sessions);
        used = end;
        match action {
            Action::Serve(session, first, count, fault_pages) => {
                serve_request(core, &mut c.wbuf, &session, first, count, fault_pages);
            }
            Action::BecomeControl(s, bytes) => {
                c.wbuf.extend_from_slice(&bytes);
                c.role = Role::Control(s);
            }
            Action::BecomeUrgent(s, bytes) => {
                c.wbuf.extend_from_slice(&bytes);
                c.role = Role::Urgent(s);
            }
            Action::BecomeBulk(s, bytes) => {
                c.wbuf.extend_from_slice(&bytes);
                result = Some(Next::Bulk(s));
                break;
            }
            Action::None => {}
            Action::Close => {
                result = Some(Next::Drop(None));
                break;
            }
            Action::Fail(code, why) => {
                reply_error(c, code, &why);
                return Some(Next::Drop(Some(why)));
            }
        }
    }
    c.rbuf.drain(..used);
    if let Some(Next::Bulk(_)) = &result {
        if !c.rbuf.is_empty() {
            return Some(Next::Drop(Some("sent frames on a bulk channel".into())));
        }
    }
    if let Err(e) = flush(c) {
        return Some(Next::Drop(Some(format!("write failed: {e}"))));
    }
    result
}

/// Refuses, on its header alone, a frame this connection can have no use for: anything but a
/// Hello (of at most a Hello's size) before the handshake, anything larger than a request or an
/// error on an urgent connection. Nothing is buffered for such a frame.
fn unfit_for_role(role: &Role, h: &Header) -> Option<String> {
    match role {
        Role::New if h.kind != Kind::Hello => Some(format!("expected Hello, got {:?}", h.kind)),
        Role::New if h.payload_len > MAX_HELLO_PAYLOAD => Some(format!(
            "a Hello of {} bytes announced (a Hello is at most {MAX_HELLO_PAYLOAD})",
            h.payload_len
        )),
        Role::Urgent(_) if h.payload_len > MAX_URGENT_PAYLOAD => Some(format!(
            "a {:?} frame of {} bytes on the urgent channel (at most {MAX_URGENT_PAYLOAD} there)",
            h.kind, h.payload_len
        )),
        _ => None,
    }
}

enum Action {
    None,
    Serve(Arc<Session>, u64, u32, u32),
    BecomeControl(Arc<Session>, Vec<u8>),
    BecomeUrgent(Arc<Session>, Vec<u8>),
    BecomeBulk(Arc<Session>, Vec<u8>),
    Close,
    Fail(u16, String),
}

fn welcome(core: &Core, session: u64) -> Vec<u8> {
    Message::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        session,
        page_size: core.map.mem().page_size(),
        layout: core.map.mem().layout().clone(),
    })
    .to_vec()
}

fn classify(
    core: &Core,
    role: &Role,
    msg: Message<'_>,
    sessions: &mut HashMap<u64, Arc<Session>>,
) -> Action {
    let total_pages = core.map.total_pages();
    match (role, msg) {
        (Role::New, Message::Hello(h)) => {
            let theirs = Offer {
                version: h.version,
                page_size: h.page_size,
                layout: &h.layout,
            };
            if let Err(e) = check(
                offer(core.map.mem().page_size(), core.map.mem().layout()),
                theirs,
            ) {
                return Action::Fail(error_code::HANDSHAKE, format!("handshake refused: {e}"));
            }
            if h.channel == Channel::Control {
                let id = core.next_session.fetch_add(1, Ordering::Relaxed);
                let s = Arc::new(Session::new(id, total_pages, core.totals.clone()));
                core.sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Arc::downgrade(&s));
                sessions.insert(id, s.clone());
                info!("session {id}: opened ({total_pages} pages)");
                return Action::BecomeControl(s, welcome(core, id));
            }
            let Some(s) = sessions.get(&h.session).cloned() else {
                return Action::Fail(error_code::NO_SESSION, format!("no session {}", h.session));
            };
            let w = welcome(core, s.id);
            if h.channel == Channel::Urgent {
                Action::BecomeUrgent(s, w)
            } else {
                Action::BecomeBulk(s, w)
            }
        }
        (Role::New, m) => Action::Fail(
            error_code::PROTOCOL,
            format!("expected Hello, got {:?}", m.kind()),
        ),
        (Role::Urgent(s), Message::Request(r)) => {
            if r.first.0 >= total_pages || r.first.0 + u64::from(r.count) > total_pages {
                return Action::Fail(
                    error_code::OUT_OF_RANGE,
                    format!(
                        "request for pages {}+{} beyond the {total_pages} served",
                        r.first.0, r.count
                    ),
                );
            }
            Action::Serve(s.clone(), r.first.0, r.count, r.fault_pages)
        }
        (Role::Control(s), Message::Stream { enable }) => {
            s.set_stream(enable);
            Action::None
        }
        (Role::Control(s), Message::Bitmap(b)) => {
            s.merge_received(b.first.0, b.bits, b.count);
            Action::None
        }
        (Role::Control(_), Message::Done) => {
            core.totals.clients_done.fetch_add(1, Ordering::Relaxed);
            Action::Close
        }
        (Role::Control(_), Message::State { .. }) => Action::None,
        (_, Message::Error { code, reason }) => {
            Action::Fail(code, format!("client reported error {code}: {reason}"))
        }
        (Role::Control(_), m) | (Role::Urgent(_), m) => Action::Fail(
            error_code::PROTOCOL,
            format!("unexpected {:?} on this channel", m.kind()),
        ),
    }
}

/// Answers one request with exactly one frame (the client matches replies to requests in
/// order): the not-yet-sent pages from the request's first — the fault pages, then prefetch —
/// or, when the first page is already on its way on the stream, `InFlight`.
fn serve_request(
    core: &Core,
    out: &mut Vec<u8>,
    s: &Session,
    first: u64,
    count: u32,
    fault_pages: u32,
) {
    // claim only what one frame can carry: the request may cross a region's end
    let ps = core.map.page_size() as usize;
    let Some(count) = core
        .map
        .run(PageIndex(first), count)
        .map(|b| (b.len() / ps) as u32)
        .filter(|&n| n > 0)
    else {
        return; // out of range: refused before we get here
    };
    let (first, count) = match s.claim_request(first, count) {
        Claim::Send { first, count } => (first, count),
        Claim::InFlight { first, count } => {
            Message::InFlight {
                first: PageIndex(first),
                count,
            }
            .encode(out);
            return;
        }
    };
    let mut frame = Frame::default();
    let n = build_frame(
        &core.map,
        first,
        count,
        Origin::Fault,
        fault_pages.max(1),
        &mut frame,
        s,
    );
    if n == 0 {
        return;
    }
    for part in frame.parts() {
        out.extend_from_slice(part);
    }
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
    if let Err(e) = sock.write_all(&wbuf[wpos..]) {
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
    let spawned = std::thread::Builder::new()
        .name(format!("bulk-{}", session.id))
        .spawn(move || bulk::run(core, sock, peer, session));
    if let Err(e) = spawned {
        warn!("cannot start a bulk thread: {e}");
    }
}

/// Creates the poll and its waker.
pub(crate) fn new_poll() -> io::Result<(Poll, Arc<Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    Ok((poll, waker))
}
