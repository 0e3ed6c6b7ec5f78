//! One client connection of the event loop: its role, buffers and deadlines, and writing out
//! what is queued for it.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Instant;

use proto::{Header, Message, HEADER_LEN};

use crate::listen::MioSock;
use crate::session::Session;

/// A client whose reply buffer holds more than this stops being read until it drains it. The
/// buffer sheds what was written once that is half of it (see `flush`), so it never holds
/// more than this plus one reply.
pub(crate) const MAX_PENDING_WRITE: usize = 16 << 20;

pub(crate) enum Role {
    New,
    Control(Arc<Session>),
    Urgent(Arc<Session>),
}

pub(crate) struct Conn {
    pub(crate) sock: MioSock,
    pub(crate) peer: String,
    pub(crate) role: Role,
    pub(crate) rbuf: Vec<u8>,
    pub(crate) wbuf: Vec<u8>,
    pub(crate) wpos: usize,
    pub(crate) writable_armed: bool,
    /// When it connected (for the handshake deadline).
    pub(crate) opened: Instant,
    /// When bytes last moved either way (for the stall deadline).
    pub(crate) last_io: Instant,
    /// `service` stopped with frames or bytes left to handle: come back without an event.
    pub(crate) again: bool,
}

/// What to do with a connection after handling its input.
pub(crate) enum Next {
    Keep,
    /// Drop it; the string is the one log line (None: a clean close).
    Drop(Option<String>),
    /// Hand it to a bulk thread.
    Bulk(Arc<Session>),
}

/// Flushes pending output; Err is fatal for the connection. What was written is dropped from
/// the buffer once it is at least half of it, so a client that keeps the buffer from ever
/// emptying (requests pipelined as fast as it reads) does not make it grow without bound.
pub(crate) fn flush(c: &mut Conn) -> io::Result<()> {
    // TLS records (or handshake messages) that a full socket did not take go first
    match c.sock.0.flush_pending() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
        r => r?,
    }
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

/// Whether `c` holds so much output that it is not read until that drains (nothing pending
/// means an empty buffer: `flush` clears it).
pub(crate) fn pressured(c: &Conn) -> bool {
    c.wbuf.len() > MAX_PENDING_WRITE
}

/// Whether `rbuf` starts with a whole frame (or a header `handle_frames` will refuse).
pub(crate) fn complete_frame(rbuf: &[u8]) -> bool {
    rbuf.len() >= HEADER_LEN
        && Header::decode(rbuf).map_or(true, |h| rbuf.len() >= HEADER_LEN + h.payload_len as usize)
}

pub(crate) fn reply_error(c: &mut Conn, code: u16, reason: &str) {
    Message::Error { code, reason }.encode(&mut c.wbuf);
    let _ = flush(c);
}
