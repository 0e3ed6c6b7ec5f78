//! A TLS connection that several threads share, as they share a plain socket through
//! `try_clone`: one thread reads while another writes.
//!
//! rustls runs the handshake (certificates, key exchange, both sides authenticated). Once it
//! is done, the connection's traffic keys are taken from rustls (`dangerous_extract_secrets`)
//! and the records are sealed and opened here, with ring's AEAD, in place: rustls's buffered
//! API copies every record three times and takes 4 KiB per read, which cost the bulk stream
//! 25-45 % of its throughput (measured: 12-13 vs 17-21 Gbit/s). This is the same split as
//! kernel TLS offload (the handshake in user space, the record layer below), with the records
//! exactly as TLS 1.3 writes them (RFC 8446 §5.2: the content type inside, the 5-byte header
//! as additional data, the nonce the IV xor the record number).
//!
//! No socket I/O happens under a lock that the other direction needs: reading and writing
//! each have their own state, and a reader blocked on a quiet socket never holds up a writer.
//! Works on blocking and non-blocking sockets alike. On a non-blocking one, ciphertext the
//! socket cannot take yet waits here ([`TlsStream::pending_out`]) for
//! [`TlsStream::flush_pending`] (an event loop calls it when the socket is writable), and the
//! handshake advances as the connection is read and written.
//!
//! Key updates are not sent: a connection refuses to seal or open more than
//! [`MAX_RECORDS`] records (far below AES-GCM's limit); it then fails, and the pager's and
//! migration's reconnects open a new one with new keys.

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{Connection, ConnectionTrafficSecrets};

use std::time::Duration;

/// The socket under a TLS connection: reads and writes of ciphertext, its timeouts and mode
/// (implemented by [`crate::Sock`]).
pub trait RawIo: Send + Sync {
    /// read(2).
    fn read_raw(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// recv(2) with MSG_DONTWAIT: never blocks.
    fn recv_raw_dontwait(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// write(2).
    fn write_raw(&self, buf: &[u8]) -> io::Result<usize>;
    /// send(2) with MSG_DONTWAIT: never blocks.
    fn send_raw_dontwait(&self, buf: &[u8]) -> io::Result<usize>;
    /// SO_RCVTIMEO.
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// SO_SNDTIMEO.
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// O_NONBLOCK.
    fn set_nonblocking(&self, nb: bool) -> io::Result<()>;
}

/// Ciphertext read from the socket per read(2) (four full records).
const RAW_READ: usize = 64 << 10;
/// Largest plaintext of one record (TLS's limit).
const MAX_FRAGMENT: usize = 16 << 10;
/// Largest record on the wire: header, plaintext, content type, up to 255 bytes of padding
/// (which we never send) and the tag.
const MAX_RECORD: usize = 5 + MAX_FRAGMENT + 256;
/// Plaintext sealed per write call: bounds the copy a write makes.
const MAX_PLAINTEXT_PER_WRITE: usize = 256 << 10;
/// On a non-blocking socket, a write is refused (WouldBlock) while this much ciphertext waits.
const MAX_PENDING_OUT: usize = 1 << 20;
/// Records sealed or opened per direction before the connection must be replaced (2^23: a
/// margin of 2^1.5 under AES-GCM's 2^24.5 of RFC 8446 §5.5; at 16 KiB a record, 128 GiB).
pub const MAX_RECORDS: u64 = 1 << 23;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const TAG_LEN: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
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

/// An alert the peer sent after the handshake (a client learns here that the server refused
/// its certificate: TLS 1.3 ends the client's handshake before the server has checked it).
fn alert_error(desc: u8) -> io::Error {
    let d = rustls::AlertDescription::from(desc);
    let why = match desc {
        40 | 42 | 46 | 48 | 49 | 51 | 116 => {
            ": our credentials are not accepted there (another CA, identity or pre-shared key?)"
        }
        _ => "",
    };
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("TLS: the peer refused the connection (alert {d:?}){why}"),
    )
}

/// One direction's traffic key, IV and record number.
struct RecordKey {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl RecordKey {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<RecordKey> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(bad("TLS: a cipher suite this side does not offer")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| bad("TLS: the negotiated traffic key is unusable"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| bad("TLS: the negotiated IV is not 12 bytes"))?;
        Ok(RecordKey {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce (RFC 8446 §5.3), or an error past [`MAX_RECORDS`].
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= MAX_RECORDS {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("TLS: {MAX_RECORDS} records on this connection: it must be replaced (reconnect for new keys)"),
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// The receiving half.
struct Rx {
    /// Ciphertext read from the socket: `buf[pos..len]` not yet opened. Always at least
    /// RAW_READ bytes long (no zeroing per read); taken out while a read fills it.
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// An opened record's plaintext, in place in `buf`: `buf[plain..plain_end]` not yet read.
    plain: usize,
    plain_end: usize,
    /// The socket reported end of file, or the peer sent close_notify.
    eof: bool,
    /// The last read(2) returned less than it asked (or would have blocked).
    short: bool,
    /// Set once the handshake is done.
    key: Option<RecordKey>,
}

/// The sending half: ciphertext not yet on the socket, and the key once there is one.
struct Tx {
    out: Vec<u8>,
    key: Option<RecordKey>,
}

/// A TLS 1.3 connection over a socket, shareable between threads (see the module doc).
pub struct TlsStream<R> {
    raw: R,
    /// rustls, until the handshake is done (then None: the record layer is ours).
    hs: Mutex<Option<Connection>>,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    /// Held for a whole write: ciphertext goes out in the order it was made.
    write_order: Mutex<()>,
    /// Held for a whole read.
    read_order: Mutex<()>,
    nonblocking: AtomicBool,
    peer: Mutex<Option<String>>,
}

/// Writes all of `out` to `raw`; on an error (WouldBlock included) what was written is removed from `out` and the rest stays.
fn write_all_raw<R: RawIo>(raw: &R, out: &mut Vec<u8>) -> io::Result<()> {
    let mut pos = 0;
    while pos < out.len() {
        match raw.write_raw(&out[pos..]) {
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

/// The length of the whole record at the start of `b`, once its header is there.
fn record_len(b: &[u8]) -> io::Result<Option<usize>> {
    if b.len() < 5 {
        return Ok(None);
    }
    let n = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if n > MAX_RECORD - 5 {
        return Err(bad(format!(
            "TLS: a record of {n} bytes (at most {} are allowed)",
            MAX_RECORD - 5
        )));
    }
    Ok(Some(5 + n))
}

impl Rx {
    /// Makes room for a whole record after `pos`: what is left moves to the front.
    fn compact(&mut self) {
        // called only when no plaintext waits (its range would move)
        self.plain = 0;
        self.plain_end = 0;
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.buf.len() < RAW_READ.max(MAX_RECORD) {
            self.buf.resize(RAW_READ.max(MAX_RECORD), 0);
        }
    }

    /// Opens the next whole record in place, if there is one: Ok(true) when it left
    /// plaintext (or an end) to deliver.
    fn open_next(&mut self) -> io::Result<bool> {
        let Some(n) = record_len(&self.buf[self.pos..self.len])? else {
            return Ok(false);
        };
        if self.len - self.pos < n {
            return Ok(false);
        }
        let key = self.key.as_mut().expect("opened only after the handshake");
        let start = self.pos;
        self.pos += n;
        let (header, body) = self.buf[start..start + n].split_at_mut(5);
        if header[0] != APPLICATION_DATA || n < 5 + TAG_LEN + 1 {
            return Err(bad(format!(
                "TLS: a record of type {} and {n} bytes where only sealed data may come",
                header[0]
            )));
        }
        let nonce = key.next_nonce()?;
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(&*header), body)
            .map_err(|_| bad("TLS: a record failed authentication (corrupted or forged)"))?;
        // the content type is the last non-zero byte (padding after it is zeros)
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(bad("TLS: a record with no content type"));
        };
        match plain[at] {
            APPLICATION_DATA => {
                self.plain = start + 5;
                self.plain_end = start + 5 + at;
                Ok(true)
            }
            ALERT => {
                // close_notify (1, 0) ends the stream; any other alert is an error
                if plain[..at] == [1, 0] {
                    self.eof = true;
                    Ok(true)
                } else {
                    Err(alert_error(plain.get(1).copied().unwrap_or(0)))
                }
            }
            t => Err(bad(format!(
                "TLS: a post-handshake message of type {t} (key updates and tickets are not used)"
            ))),
        }
    }

    /// Copies the plaintext there is into `out`: Some(n) (0: end of stream), None when
    /// more ciphertext is needed.
    fn take(&mut self, out: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            if self.plain < self.plain_end {
                let n = out.len().min(self.plain_end - self.plain);
                out[..n].copy_from_slice(&self.buf[self.plain..self.plain + n]);
                self.plain += n;
                return Ok(Some(n));
            }
            if self.eof && self.pos >= self.len {
                return Ok(Some(0));
            }
            if !self.open_next()? {
                if self.eof {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: the connection ended inside a record",
                    ));
                }
                return Ok(None);
            }
            if self.eof && self.plain >= self.plain_end {
                return Ok(Some(0));
            }
        }
    }

    /// Whether plaintext, or a whole record, waits here (false while a read fills `buf`).
    fn buffered(&self) -> bool {
        let Some(b) = self.buf.get(self.pos..self.len) else {
            return false;
        };
        self.plain < self.plain_end || matches!(record_len(b), Ok(Some(n)) if b.len() >= n)
    }
}

impl<R: RawIo> TlsStream<R> {
    pub(crate) fn new(raw: R, mut conn: Connection) -> TlsStream<R> {
        conn.set_buffer_limit(None);
        TlsStream {
            raw,
            hs: Mutex::new(Some(conn)),
            rx: Mutex::new(Rx {
                buf: vec![0u8; RAW_READ.max(MAX_RECORD)],
                pos: 0,
                len: 0,
                plain: 0,
                plain_end: 0,
                eof: false,
                short: false,
                key: None,
            }),
            tx: Mutex::new(Tx {
                out: Vec::new(),
                key: None,
            }),
            write_order: Mutex::new(()),
            read_order: Mutex::new(()),
            nonblocking: AtomicBool::new(false),
            peer: Mutex::new(None),
        }
    }

    /// The socket under the TLS layer.
    pub fn raw(&self) -> &R {
        &self.raw
    }

    /// Whether the handshake is still going on.
    pub fn is_handshaking(&self) -> bool {
        lock(&self.hs).is_some()
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
                    super::params::HANDSHAKE_TIMEOUT
                ),
            )
        };
        let is_timeout = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        };
        let _order = lock(&self.read_order);
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
            if !self.is_handshaking() {
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

    /// During the handshake: hands rustls the whole records that are buffered, one at a time,
    /// and once it is done takes the keys (no byte after the last handshake record is given
    /// to rustls, so nothing is lost with it).
    fn advance_handshake(&self, rx: &mut Rx) -> io::Result<()> {
        let mut hs = lock(&self.hs);
        let Some(conn) = hs.as_mut() else {
            return Ok(());
        };
        while conn.is_handshaking() {
            let head = &rx.buf[rx.pos..rx.len];
            if head.len() >= 2 && (!(20..=23).contains(&head[0]) || head[1] != 3) {
                return Err(bad(
                    "TLS: the peer does not speak TLS (its first bytes are no TLS record): is it running with --insecure, or not a vmm at all?",
                ));
            }
            let Some(n) = record_len(head)? else {
                break;
            };
            if rx.len - rx.pos < n {
                break;
            }
            let mut rec = &rx.buf[rx.pos..rx.pos + n];
            while !rec.is_empty() {
                if conn.read_tls(&mut rec)? == 0 {
                    return Err(bad("TLS: the handshake took no more data"));
                }
            }
            rx.pos += n;
            conn.process_new_packets().map_err(tls_error)?;
        }
        if rx.pos == rx.len {
            rx.pos = 0;
            rx.len = 0;
        }
        if conn.is_handshaking() {
            return Ok(());
        }
        // done: our last flight goes out first (the client's Finished), then the keys
        let mut tx = lock(&self.tx);
        while conn.wants_write() {
            conn.write_tls(&mut tx.out)?;
        }
        let peer = conn.peer_certificates().and_then(|c| {
            let ee = webpki::EndEntityCert::try_from(c.first()?).ok()?;
            let name = ee.valid_dns_names().next().map(str::to_owned);
            name
        });
        let conn = hs.take().expect("checked above");
        let secrets = conn.dangerous_extract_secrets().map_err(tls_error)?;
        tx.key = Some(RecordKey::new(secrets.tx)?);
        rx.key = Some(RecordKey::new(secrets.rx)?);
        *lock(&self.peer) = peer;
        Ok(())
    }

    /// Reads ciphertext once, without holding a lock the writer needs, and (during the
    /// handshake) hands it to rustls and sends what that makes it want to send. Ok(false) at
    /// end of file. The caller holds `read_order`.
    fn pump(&self, dontwait: bool) -> io::Result<bool> {
        let (mut buf, filled) = {
            let mut rx = lock(&self.rx);
            rx.compact();
            (std::mem::take(&mut rx.buf), rx.len)
        };
        let r = if dontwait {
            self.raw.recv_raw_dontwait(&mut buf[filled..])
        } else {
            self.raw.read_raw(&mut buf[filled..])
        };
        let want = buf.len() - filled;
        let mut rx = lock(&self.rx);
        rx.buf = buf;
        let r = match r {
            Ok(0) => {
                rx.eof = true;
                rx.short = true;
                Ok(false)
            }
            Ok(n) => {
                rx.len += n;
                rx.short = n < want;
                Ok(true)
            }
            Err(e) => {
                rx.short = e.kind() == io::ErrorKind::WouldBlock;
                Err(e)
            }
        };
        let advanced = self.advance_handshake(&mut rx);
        drop(rx);
        if lock(&self.hs).as_ref().is_some_and(|c| c.wants_write()) || advanced.is_err() {
            // handshake messages, or the alert that explains a failure (best effort then)
            let flushed = self.flush_pending();
            if advanced.is_ok() {
                match flushed {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                    _ => {}
                }
            }
        }
        advanced?;
        r
    }

    /// Reads plaintext; `dontwait`: never block (WouldBlock when nothing is ready).
    fn read_inner(&self, buf: &mut [u8], dontwait: bool) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _order = lock(&self.read_order);
        loop {
            {
                let mut rx = lock(&self.rx);
                if rx.key.is_some() {
                    if let Some(n) = rx.take(buf)? {
                        return Ok(n);
                    }
                } else if rx.eof {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: the connection ended during the handshake",
                    ));
                }
            }
            if dontwait && self.is_handshaking() {
                // an event loop drives the handshake: the reads and writes it makes
                self.flush_pending().or_else(|e| {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            }
            self.pump(dontwait)?;
        }
    }

    /// Reads without blocking, whatever the socket's mode (WouldBlock when nothing is ready).
    pub fn recv_dontwait(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf, true)
    }

    /// Whether plaintext or a whole record is held here, unread: poll(2) on the socket does
    /// not see it, so a reader must read before it waits.
    pub fn has_buffered_input(&self) -> bool {
        lock(&self.rx).buffered()
    }

    /// Whether the socket was drained by the last read and nothing read is left here: a
    /// reader may wait for the socket (as after a short read of a plain socket).
    pub fn drained(&self) -> bool {
        let rx = lock(&self.rx);
        rx.short && !rx.buffered()
    }

    /// Whether ciphertext waits to be written (a non-blocking socket that was full).
    pub fn pending_out(&self) -> bool {
        // lock order, everywhere: rx, hs, tx
        let hs = lock(&self.hs).as_ref().is_some_and(|c| c.wants_write());
        hs || !lock(&self.tx).out.is_empty()
    }

    /// Writes the ciphertext that waits; WouldBlock on a non-blocking socket that is full.
    pub fn flush_pending(&self) -> io::Result<()> {
        let _order = lock(&self.write_order);
        self.flush_locked()
    }

    /// [`Self::flush_pending`] with `write_order` held.
    fn flush_locked(&self) -> io::Result<()> {
        let mut out = {
            let mut hs = lock(&self.hs);
            let mut tx = lock(&self.tx);
            if let Some(conn) = hs.as_mut() {
                while conn.wants_write() {
                    conn.write_tls(&mut tx.out)?;
                }
            }
            if tx.out.is_empty() {
                return Ok(());
            }
            std::mem::take(&mut tx.out)
        };
        // as much as the socket takes at once, then (blocking sockets) the rest, blocking,
        // with no lock held that a reader needs
        let r = match self.raw.send_raw_dontwait(&out) {
            Ok(n) if n == out.len() => {
                out.clear();
                Ok(())
            }
            Ok(n) => {
                out.drain(..n);
                if self.nonblocking.load(Ordering::Relaxed) {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    write_all_raw(&self.raw, &mut out)
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if self.nonblocking.load(Ordering::Relaxed) {
                    Err(e)
                } else {
                    write_all_raw(&self.raw, &mut out)
                }
            }
            Err(e) => Err(e),
        };
        // only a holder of write_order adds to `out`: it is still empty
        lock(&self.tx).out = out;
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
                if lock(&self.tx).out.len() >= MAX_PENDING_OUT {
                    return Err(e);
                }
            }
            Err(e) => return Err(blocked(e)),
        }
        let n = {
            let mut tx = lock(&self.tx);
            let Tx { out, key } = &mut *tx;
            let Some(key) = key.as_mut() else {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "TLS: written before the handshake was done",
                ));
            };
            seal(key, out, bufs)?
        };
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
        lock(&self.peer).clone()
    }
}

/// Seals up to MAX_PLAINTEXT_PER_WRITE bytes of `bufs` into records appended to `out`;
/// returns how many plaintext bytes it took.
fn seal(key: &mut RecordKey, out: &mut Vec<u8>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let total: usize = bufs.iter().map(|b| b.len()).sum::<usize>();
    let total = total.min(MAX_PLAINTEXT_PER_WRITE);
    let mut taken = 0;
    let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
    let mut cur: &[u8] = slices.next().unwrap_or(&[]);
    while taken < total {
        let frag = (total - taken).min(MAX_FRAGMENT);
        let start = out.len();
        let body_len = frag + 1 + TAG_LEN;
        out.reserve(5 + body_len);
        out.extend_from_slice(&[APPLICATION_DATA, 3, 3]);
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        let mut need = frag;
        while need > 0 {
            if cur.is_empty() {
                cur = slices.next().unwrap_or(&[]);
                continue;
            }
            let k = need.min(cur.len());
            out.extend_from_slice(&cur[..k]);
            cur = &cur[k..];
            need -= k;
        }
        out.push(APPLICATION_DATA);
        let nonce = key.next_nonce()?;
        let (header, body) = out[start..].split_at_mut(5);
        let tag = key
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&*header), body)
            .map_err(|_| bad("TLS: sealing a record failed"))?;
        out.extend_from_slice(tag.as_ref());
        taken += frag;
    }
    Ok(taken)
}

impl<R: RawIo> Read for &TlsStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let dontwait = self.nonblocking.load(Ordering::Relaxed);
        self.read_inner(buf, dontwait)
    }
}

impl<R: RawIo> Write for &TlsStream<R> {
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
