//! A TLS connection that several threads share, as they share a plain socket through
//! `try_clone`: one thread reads while another writes.
//!
//! rustls keeps one state per connection, so the state sits behind a lock, but no socket I/O
//! ever happens under it: a reader takes ciphertext from the socket with the lock released and
//! then hands it to rustls; a writer encrypts under the lock and sends with it released (in
//! order: writers take a second lock for the whole write). So a reader blocked on a quiet
//! socket never holds up a writer, nor the other way round.
//!
//! Works on blocking and non-blocking sockets alike. On a non-blocking one, a write whose
//! ciphertext the socket cannot take yet keeps it here ([`TlsStream::pending_out`]) for
//! [`TlsStream::flush_pending`] (an event loop calls it when the socket is writable).

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use rustls::Connection;

use crate::Sock;

/// Ciphertext read from the socket per read(2) (four full TLS records).
const RAW_READ: usize = 64 << 10;
/// Plaintext encrypted per write call: bounds the copy a write makes.
const MAX_PLAINTEXT_PER_WRITE: usize = 256 << 10;
/// On a non-blocking socket, a write is refused (WouldBlock) while this much ciphertext waits.
const MAX_PENDING_OUT: usize = 1 << 20;

struct State {
    conn: Connection,
    /// Ciphertext read from the socket, not yet handed to rustls (from `raw_pos`).
    raw_in: Vec<u8>,
    raw_pos: usize,
    /// The socket reported end of file.
    raw_eof: bool,
    /// rustls has been told of it.
    eof_fed: bool,
    /// Ciphertext not yet written to the socket.
    out: Vec<u8>,
    /// The buffer reads go into (kept at RAW_READ bytes: no zeroing per read).
    spare: Vec<u8>,
}

/// A TLS 1.3 connection over a [`Sock`], shareable between threads (see the module doc).
pub struct TlsStream {
    raw: Sock,
    state: Mutex<State>,
    /// Held for a whole write: ciphertext goes out in the order it was made.
    write_order: Mutex<()>,
    /// Held for a whole read: ciphertext is handed to rustls in the order it came.
    read_order: Mutex<()>,
    nonblocking: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a rustls error means for the user, as an io::Error.
pub(crate) fn tls_error(e: rustls::Error) -> io::Error {
    use io::ErrorKind::{InvalidData, PermissionDenied};
    use rustls::{AlertDescription as A, Error as E};
    match &e {
        E::AlertReceived(a) => {
            let why = match a {
                A::BadCertificate
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::DecryptError
                | A::CertificateRequired
                | A::HandshakeFailure => {
                    ": our credentials are not accepted there (another CA, identity or pre-shared key?)"
                }
                _ => "",
            };
            io::Error::new(
                PermissionDenied,
                format!("TLS: the peer refused the connection (alert {a:?}){why}"),
            )
        }
        E::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(why))) => {
            io::Error::new(
                PermissionDenied,
                format!("TLS: the peer's certificate is refused: {why}"),
            )
        }
        E::InvalidCertificate(c) => io::Error::new(
            PermissionDenied,
            format!("TLS: the peer's certificate is refused: {c:?}"),
        ),
        E::NoCertificatesPresented => io::Error::new(
            PermissionDenied,
            "TLS: the peer presented no certificate",
        ),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => io::Error::new(
            InvalidData,
            format!(
                "TLS: the peer does not speak TLS ({e}): is it running with --insecure, or not a vmm at all?"
            ),
        ),
        _ => io::Error::new(InvalidData, format!("TLS: {e}")),
    }
}

/// Writes all of `out` to `raw`; on an error (WouldBlock included) what was written is
/// removed from `out` and the rest stays.
fn write_raw(raw: &Sock, out: &mut Vec<u8>) -> io::Result<()> {
    let mut pos = 0;
    while pos < out.len() {
        match raw.write_plain(&out[pos..]) {
            Ok(0) => {
                out.drain(..pos);
                return Err(io::ErrorKind::WriteZero.into());
            }
            Ok(n) => pos += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.drain(..pos);
                return Err(e);
            }
        }
    }
    out.clear();
    Ok(())
}

/// Hands the buffered ciphertext to rustls until some plaintext is ready or it is all taken;
/// then the end of file, once the socket reported it. Call it only when no plaintext waits
/// (rustls refuses more ciphertext while 16 KiB of plaintext are unread).
fn feed(st: &mut State) -> io::Result<()> {
    while st.raw_pos < st.raw_in.len() {
        let mut rest = &st.raw_in[st.raw_pos..];
        let n = st.conn.read_tls(&mut rest)?;
        st.raw_pos += n;
        if st.raw_pos == st.raw_in.len() {
            st.raw_in.clear();
            st.raw_pos = 0;
        }
        let io = st.conn.process_new_packets().map_err(tls_error)?;
        if io.peer_has_closed() {
            // a close_notify: nothing after it counts
            st.raw_in.clear();
            st.raw_pos = 0;
            return Ok(());
        }
        if io.plaintext_bytes_to_read() > 0 {
            return Ok(());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS: the record layer took no data and gave none",
            ));
        }
    }
    if st.raw_eof && !st.eof_fed {
        st.eof_fed = true;
        st.conn.read_tls(&mut &[][..])?;
        st.conn.process_new_packets().map_err(tls_error)?;
    }
    Ok(())
}

/// Whether decrypted data waits to be read.
fn plaintext_waits(st: &mut State) -> bool {
    st.conn
        .process_new_packets()
        .is_ok_and(|io| io.plaintext_bytes_to_read() > 0)
}

/// Plaintext into `buf`: Some(n) (0: end of stream), None when more ciphertext is needed.
fn take_plain(st: &mut State, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match st.conn.reader().read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(st.eof_fed.then_some(0)),
        // the peer closed without a close_notify: every frame of ours is length-prefixed, so
        // a cut one is seen as such by the protocol above; this is an ordinary end of stream
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Some(0)),
        Err(e) => Err(e),
    }
}

impl TlsStream {
    pub(crate) fn new(raw: Sock, mut conn: Connection) -> TlsStream {
        // writes are bounded here (MAX_PLAINTEXT_PER_WRITE), and drained at once
        conn.set_buffer_limit(None);
        TlsStream {
            raw,
            state: Mutex::new(State {
                conn,
                raw_in: Vec::new(),
                raw_pos: 0,
                raw_eof: false,
                eof_fed: false,
                out: Vec::new(),
                spare: vec![0u8; RAW_READ],
            }),
            write_order: Mutex::new(()),
            read_order: Mutex::new(()),
            nonblocking: AtomicBool::new(false),
        }
    }

    /// The socket under the TLS layer.
    pub fn raw(&self) -> &Sock {
        &self.raw
    }

    /// Runs the handshake to its end, blocking, or fails at `deadline`. Leaves the socket
    /// without read and write timeouts.
    pub(crate) fn handshake(&self, deadline: Instant) -> io::Result<()> {
        let r = self.handshake_inner(deadline);
        let _ = self.raw.set_read_timeout(None);
        let _ = self.raw.set_write_timeout(None);
        r
    }

    fn handshake_inner(&self, deadline: Instant) -> io::Result<()> {
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "TLS handshake: no answer within {:?}",
                    super::HANDSHAKE_TIMEOUT
                ),
            )
        };
        let is_timeout = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            self.raw.set_read_timeout(Some(left))?;
            self.raw.set_write_timeout(Some(left))?;
            match self.flush_pending() {
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                r => r?,
            }
            if !lock(&self.state).conn.is_handshaking() {
                return Ok(());
            }
            match self.pump(false) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS handshake: the peer closed the connection (it may not speak TLS, or refused us)",
                    ))
                }
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads ciphertext once (without the state lock) and hands it to rustls; sends whatever
    /// that makes rustls want to send (handshake messages, alerts). Ok(false) at end of file.
    fn pump(&self, dontwait: bool) -> io::Result<bool> {
        let mut buf = std::mem::take(&mut lock(&self.state).spare);
        if buf.len() < RAW_READ {
            buf.resize(RAW_READ, 0);
        }
        let r = if dontwait {
            self.raw.recv_dontwait_plain(&mut buf)
        } else {
            self.raw.read_plain(&mut buf)
        };
        let mut st = lock(&self.state);
        let r = match r {
            Ok(0) => {
                st.raw_eof = true;
                Ok(false)
            }
            Ok(n) => {
                st.raw_in.extend_from_slice(&buf[..n]);
                Ok(true)
            }
            Err(e) => Err(e),
        };
        st.spare = buf;
        let fed = if plaintext_waits(&mut st) {
            Ok(())
        } else {
            feed(&mut st)
        };
        let wants_write = st.conn.wants_write();
        drop(st);
        if wants_write {
            // an alert explains a failure to the peer: best effort
            let flushed = self.flush_pending();
            if fed.is_ok() {
                match flushed {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                    _ => {}
                }
            }
        }
        fed?;
        r
    }

    /// Reads plaintext; `dontwait`: never block (WouldBlock when nothing is ready).
    fn read_inner(&self, buf: &mut [u8], dontwait: bool) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _order = lock(&self.read_order);
        loop {
            let mut st = lock(&self.state);
            let got = match take_plain(&mut st, buf) {
                Ok(None) => feed(&mut st).and_then(|_| take_plain(&mut st, buf)),
                r => r,
            };
            let wants_write = st.conn.wants_write();
            drop(st);
            if wants_write {
                let _ = self.flush_pending();
            }
            if let Some(n) = got? {
                return Ok(n);
            }
            self.pump(dontwait)?;
        }
    }

    /// Reads without blocking, whatever the socket's mode (WouldBlock when nothing is ready).
    pub fn recv_dontwait(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf, true)
    }

    /// Whether plaintext or ciphertext is held here, unread: poll(2) on the socket does not
    /// see it, so a reader must read before it waits.
    pub fn has_buffered_input(&self) -> bool {
        let mut st = lock(&self.state);
        st.raw_pos < st.raw_in.len() || plaintext_waits(&mut st)
    }

    /// Whether ciphertext waits to be written (a non-blocking socket that was full).
    pub fn pending_out(&self) -> bool {
        let st = lock(&self.state);
        !st.out.is_empty() || st.conn.wants_write()
    }

    /// Writes the ciphertext that waits; WouldBlock on a non-blocking socket that is full.
    pub fn flush_pending(&self) -> io::Result<()> {
        let _order = lock(&self.write_order);
        self.flush_locked()
    }

    /// [`Self::flush_pending`] with `write_order` held.
    fn flush_locked(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        let State { conn, out, .. } = &mut *st;
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
        if out.is_empty() {
            return Ok(());
        }
        let mut out = std::mem::take(out);
        drop(st);
        let r = write_raw(&self.raw, &mut out);
        // only a holder of write_order adds to `out`: it is still empty
        lock(&self.state).out = out;
        r
    }

    fn write_inner(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let nonblocking = self.nonblocking.load(Ordering::Relaxed);
        let blocked = |e: io::Error| {
            if e.kind() == io::ErrorKind::WouldBlock && !nonblocking {
                io::Error::new(io::ErrorKind::TimedOut, "write timed out")
            } else {
                e
            }
        };
        let _order = lock(&self.write_order);
        match self.flush_locked() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && nonblocking => {
                if lock(&self.state).out.len() >= MAX_PENDING_OUT {
                    return Err(e);
                }
            }
            Err(e) => return Err(blocked(e)),
        }
        let mut take = Vec::with_capacity(bufs.len().min(64));
        let mut total = 0;
        for b in bufs {
            if total >= MAX_PLAINTEXT_PER_WRITE {
                break;
            }
            let n = b.len().min(MAX_PLAINTEXT_PER_WRITE - total);
            take.push(IoSlice::new(&b[..n]));
            total += n;
        }
        let n = lock(&self.state).conn.writer().write_vectored(&take)?;
        match self.flush_locked() {
            Ok(()) => Ok(n),
            // kept in `out`, sent by the next write or flush_pending
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && nonblocking => Ok(n),
            Err(e) => Err(blocked(e)),
        }
    }

    pub(crate) fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        self.raw.set_nonblocking(nb)?;
        self.nonblocking.store(nb, Ordering::Relaxed);
        Ok(())
    }

    /// The identity the peer authenticated with (its certificate's first DNS name; `psk` in
    /// pre-shared-key mode); None before the handshake is done.
    pub fn peer_identity(&self) -> Option<String> {
        let st = lock(&self.state);
        if st.conn.is_handshaking() {
            return None;
        }
        let cert = st.conn.peer_certificates()?.first()?;
        let ee = webpki::EndEntityCert::try_from(cert).ok()?;
        let name = ee.valid_dns_names().next().map(str::to_owned);
        name
    }

    /// Whether the handshake is still going on.
    pub fn is_handshaking(&self) -> bool {
        lock(&self.state).conn.is_handshaking()
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let dontwait = self.nonblocking.load(Ordering::Relaxed);
        self.read_inner(buf, dontwait)
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_inner(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_inner(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
