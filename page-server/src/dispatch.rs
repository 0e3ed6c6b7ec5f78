//! What a connection's frames ask for: the handshake (by the role a Hello claims), fault
//! requests on the urgent connection, and control messages.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::info;
use proto::handshake::{check, offer, Offer};
use proto::{
    error_code, Channel, Header, Kind, Message, Origin, PageIndex, Welcome, HEADER_LEN,
    MAX_REASON_BYTES, MAX_REGIONS, PROTOCOL_VERSION,
};

use crate::conn::{flush, pressured, reply_error, Conn, Next, Role};
use crate::session::{build_frame, Claim, Frame, Session};
use crate::shared::Core;

/// Sessions open at once (each a client: a migration has one per pager, a few at most).
pub(crate) const MAX_SESSIONS: usize = 64;
/// Bulk connections (each a thread) per session.
pub(crate) const MAX_BULK_PER_SESSION: usize = 16;

/// Largest Hello payload: the fixed fields and a layout of [`MAX_REGIONS`] regions. A new
/// connection announcing more is refused on its header, before anything is buffered for it.
pub(crate) const MAX_HELLO_PAYLOAD: u32 = 20 + 16 * MAX_REGIONS as u32;
/// Largest payload on an urgent connection (a request is 16 bytes, an error its reason).
pub(crate) const MAX_URGENT_PAYLOAD: u32 = 2 + MAX_REASON_BYTES as u32;

/// Handles every whole frame in `rbuf`. Some(next) ends servicing the connection.
pub(crate) fn handle_frames(
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
        // who the peer is matters only for its Hello: no lock or copy per fault request
        let peer = match c.role {
            Role::New => c.sock.0.peer_identity(),
            _ => None,
        };
        let action = classify(core, &c.role, peer.as_deref(), msg, sessions);
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
pub(crate) fn unfit_for_role(role: &Role, h: &Header) -> Option<String> {
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

pub(crate) enum Action {
    None,
    Serve(Arc<Session>, u64, u32, u32),
    BecomeControl(Arc<Session>, Vec<u8>),
    BecomeUrgent(Arc<Session>, Vec<u8>),
    BecomeBulk(Arc<Session>, Vec<u8>),
    Close,
    Fail(u16, String),
}

pub(crate) fn welcome(core: &Core, session: u64) -> Vec<u8> {
    Message::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        session,
        page_size: core.map.mem().page_size(),
        layout: core.map.mem().layout().clone(),
    })
    .to_vec()
}

pub(crate) fn classify(
    core: &Core,
    role: &Role,
    peer: Option<&str>,
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
            if let Some(only) = &core.config.only_peer {
                if peer != Some(only.as_str()) {
                    return Action::Fail(
                        error_code::HANDSHAKE,
                        format!(
                            "this page-server serves only {only} (the peer of its migration), not {}",
                            peer.unwrap_or("an unauthenticated peer")
                        ),
                    );
                }
            }
            if core.config.require_layout && h.layout.regions.is_empty() {
                return Action::Fail(
                    error_code::HANDSHAKE,
                    "handshake refused: the Hello names no layout (this page-server serves only a peer that knows what it receives)".into(),
                );
            }
            if h.channel == Channel::Control && sessions.len() >= MAX_SESSIONS {
                return Action::Fail(
                    error_code::HANDSHAKE,
                    format!("{MAX_SESSIONS} sessions are open: no more now"),
                );
            }
            if h.channel == Channel::Control {
                // unguessable: a session is joined by its id and only by its owner
                let mut id = transport::tls::random_u64();
                while id == 0 || sessions.contains_key(&id) {
                    id = transport::tls::random_u64();
                }
                let owner = peer.map(str::to_owned);
                let s = Arc::new(Session::new(id, owner, total_pages, core.totals.clone()));
                core.sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Arc::downgrade(&s));
                sessions.insert(id, s.clone());
                info!("session {id}: opened ({total_pages} pages)");
                return Action::BecomeControl(s, welcome(core, id));
            }
            // another peer's session is as good as none (and is not told apart from none)
            let Some(s) = sessions
                .get(&h.session)
                .filter(|s| s.owner.as_deref() == peer)
                .cloned()
            else {
                return Action::Fail(error_code::NO_SESSION, format!("no session {}", h.session));
            };
            if h.channel == Channel::Bulk && s.bulk_count() >= MAX_BULK_PER_SESSION {
                return Action::Fail(
                    error_code::HANDSHAKE,
                    format!(
                        "session {}: {MAX_BULK_PER_SESSION} bulk connections already",
                        s.id
                    ),
                );
            }
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
pub(crate) fn serve_request(
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
