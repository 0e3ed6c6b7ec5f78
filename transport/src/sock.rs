//! Transports: TCP or a Unix socket, chosen by the address's form. One enum for blocking
//! streams (bulk threads, clients) and one for the event loop's non-blocking ones.
//!
//! Socket options go through `nix::sys::socket::setsockopt`, except one call that stays on raw
//! `libc`: `getsockopt(TCP_INFO)` in [`Sock::rtt`], because nix 0.32 has no `TCP_INFO` socket
//! option (no `sockopt::TcpInfo`, no `tcp_info` getter).

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::{RawIo, Security, TlsStream};

/// Where to listen or connect: `HOST:PORT` for TCP, a path (containing `/`) for a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// TCP.
    Tcp(SocketAddr),
    /// Unix stream socket at this path.
    Unix(PathBuf),
}

impl FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.strip_prefix("tcp:").unwrap_or(s);
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(p.into()));
        }
        if s.contains('/') {
            return Ok(Addr::Unix(s.into()));
        }
        use std::net::ToSocketAddrs;
        s.to_socket_addrs()
            .map_err(|e| format!("'{s}' is neither HOST:PORT nor a socket path: {e}"))?
            .next()
            .map(Addr::Tcp)
            .ok_or_else(|| format!("'{s}' resolves to no address"))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Clears the way to bind a Unix socket at `path`. Nothing there is fine. A socket nobody
/// accepts on (left by a process that ended) is removed. A socket another process serves is
/// refused (`AddrInUse`, "in use by another process"), and anything that is not a socket (a
/// file, a directory, a symlink) is refused and left as it is (`AlreadyExists`): a path given
/// by mistake never costs a file.
pub fn clear_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let m = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) => m,
    };
    if !m.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket (left as it is)",
                path.display()
            ),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by another process", path.display()),
        ));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a dead TCP peer show up as an error within about `timeout` instead of the kernel's
/// ~15 minutes of retransmissions: data left unacknowledged that long (TCP_USER_TIMEOUT) and an
/// idle connection whose keepalive probes go unanswered both fail the socket with ETIMEDOUT.
/// A stopped or busy peer whose kernel still acknowledges is not dead: only a cut link or a
/// vanished host is. No-op for anything but a TCP socket (a Unix socket's peer cannot vanish
/// silently). Best effort: returns the first option the kernel refused.
///
/// `fd` must be a descriptor the caller keeps open for the duration of the call.
pub fn set_liveness(fd: std::os::fd::RawFd, timeout: Duration) -> io::Result<()> {
    if timeout.is_zero() {
        return Ok(());
    }
    if fd < 0 {
        // what setsockopt answers for it (a BorrowedFd cannot hold -1)
        return Err(io::Error::from(nix::errno::Errno::EBADF));
    }
    // SAFETY: `fd` is not -1 (checked above) and, by this function's contract, stays open while
    // the borrow lives, which ends with this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    set_liveness_on(fd, timeout)
}

/// [`set_liveness`] on a borrowed descriptor.
fn set_liveness_on(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    if timeout.is_zero() {
        return Ok(());
    }
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as u32;
    // keepalive probes start after a quarter of the timeout of silence, one per quarter
    let idle = (ms / 4000).max(1);
    let results = [
        setsockopt(&fd, sockopt::KeepAlive, &true),
        setsockopt(&fd, sockopt::TcpKeepIdle, &idle),
        setsockopt(&fd, sockopt::TcpKeepInterval, &idle),
        setsockopt(&fd, sockopt::TcpKeepCount, &4),
        setsockopt(&fd, sockopt::TcpUserTimeout, &ms),
    ];
    results
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(()), |errno| Err(io::Error::from(errno)))
}

/// A connected stream: plain TCP or Unix, or TLS over one of them.
#[derive(Debug)]
pub enum Sock {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
    /// TLS over a TCP or Unix socket ([`crate::Security`] makes one); clones share it.
    Tls(Arc<TlsStream<Sock>>),
}

impl fmt::Debug for TlsStream<Sock> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tls({:?})", self.raw())
    }
}

impl Sock {
    /// Connects, with TCP_NODELAY when `nodelay` (plaintext: secure it with
    /// [`crate::Security::client`]).
    pub fn connect(addr: &Addr, nodelay: bool, timeout: Duration) -> io::Result<Sock> {
        Ok(match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, timeout)?;
                s.set_nodelay(nodelay)?;
                Sock::Tcp(s)
            }
            Addr::Unix(p) => Sock::Unix(UnixStream::connect(p)?),
        })
    }

    /// The socket itself (under the TLS layer, if any).
    fn base(&self) -> &Sock {
        match self {
            Sock::Tls(t) => t.raw(),
            s => s,
        }
    }

    /// Whether the connection is authenticated and encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Sock::Tls(_))
    }

    /// The identity the peer authenticated with (None for plaintext, or mid-handshake).
    pub fn peer_identity(&self) -> Option<String> {
        match self {
            Sock::Tls(t) => t.peer_identity(),
            _ => None,
        }
    }

    /// The peer's address, for messages.
    pub fn peer_name(&self) -> String {
        let a = match self.base() {
            Sock::Tcp(s) => s.peer_addr().map(|a| a.to_string()),
            Sock::Unix(s) => s.peer_addr().map(|a| {
                a.as_pathname()
                    .map_or("unix socket".into(), |p| p.display().to_string())
            }),
            Sock::Tls(_) => unreachable!("base() is never TLS"),
        };
        a.unwrap_or_else(|e| format!("(peer address unknown: {e})"))
    }

    /// The local address of a TCP socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self.base() {
            Sock::Tcp(s) => s.local_addr().ok(),
            _ => None,
        }
    }

    /// See [`set_liveness`]; a no-op for Unix sockets.
    pub fn set_liveness(&self, timeout: Duration) -> io::Result<()> {
        match self.base() {
            Sock::Tcp(s) => set_liveness_on(s.as_fd(), timeout),
            _ => Ok(()),
        }
    }

    /// The kernel's smoothed round-trip time of a TCP connection (None for Unix sockets).
    pub fn rtt(&self) -> Option<Duration> {
        use std::os::fd::AsRawFd;
        let Sock::Tcp(s) = self.base() else {
            return None;
        };
        // SAFETY: tcp_info is plain old data; all-zero is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt(TCP_INFO) writes at most `len` bytes into `info`, which we own.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        (rc == 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
    }

    /// Another handle on the same socket (a TLS connection is shared, not duplicated).
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tls(t) => Sock::Tls(t.clone()),
        })
    }

    /// Shuts the socket down (wakes any thread blocked on it).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self.base() {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
            Sock::Tls(_) => unreachable!("base() is never TLS"),
        }
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self.base() {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tls(_) => unreachable!("base() is never TLS"),
        }
    }

    /// Sets the write timeout.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self.base() {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
            Sock::Tls(_) => unreachable!("base() is never TLS"),
        }
    }

    /// Switches blocking mode.
    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_nonblocking(nb),
            Sock::Unix(s) => s.set_nonblocking(nb),
            Sock::Tls(t) => t.set_nonblocking(nb),
        }
    }

    /// Sets the socket buffer sizes (best effort).
    pub fn set_buffers(&self, bytes: usize) {
        use nix::sys::socket::{setsockopt, sockopt};
        let _ = setsockopt(self, sockopt::SndBuf, &bytes);
        let _ = setsockopt(self, sockopt::RcvBuf, &bytes);
    }

    /// Reads what is there without blocking, whatever the socket's mode: Ok(0) at end of
    /// stream, WouldBlock when nothing is ready.
    pub fn recv_dontwait(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tls(t) => t.recv_dontwait(buf),
            s => s.recv_dontwait_plain(buf),
        }
    }

    /// Whether input is held in this process, unread (TLS records decrypted or not yet):
    /// poll(2) does not see it, so a reader must read before it waits.
    pub fn has_buffered_input(&self) -> bool {
        match self {
            Sock::Tls(t) => t.has_buffered_input(),
            _ => false,
        }
    }

    /// After a read that returned less than asked (`short`), or none: whether the socket is
    /// drained, so that a reader may wait for it (edge-triggered polling needs it drained).
    /// A plain socket is after a short read; under TLS, a read returns what one batch of
    /// records held, so it is when the last read(2) of ciphertext was short and nothing read
    /// is left in this process.
    pub fn drained_after(&self, short: bool) -> bool {
        match self {
            Sock::Tls(t) => t.drained(),
            _ => short,
        }
    }

    /// Whether output waits in this process for a non-blocking socket to take it.
    pub fn pending_out(&self) -> bool {
        match self {
            Sock::Tls(t) => t.pending_out(),
            _ => false,
        }
    }

    /// Writes output waiting in this process (WouldBlock: the socket is still full).
    pub fn flush_pending(&self) -> io::Result<()> {
        match self {
            Sock::Tls(t) => t.flush_pending(),
            _ => Ok(()),
        }
    }

    /// Fills every buffer of `iov`, in order (readv(2) straight into them for a plain socket).
    pub fn read_exact_vectored(&mut self, mut iov: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        if let Sock::Tls(t) = self {
            let mut t: &TlsStream<Sock> = t;
            for b in iov.iter_mut() {
                t.read_exact(b)?;
            }
            return Ok(());
        }
        while !iov.is_empty() {
            let cnt = iov.len().min(1024);
            let n = match nix::sys::uio::readv(&*self, &mut iov[..cnt]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            IoSliceMut::advance_slices(&mut iov, n);
        }
        Ok(())
    }

    /// read(2) on the socket itself (ciphertext under TLS).
    pub(crate) fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.base() {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
            Sock::Tls(_) => unreachable!("base() is never TLS"),
        }
    }

    /// recv(2, MSG_DONTWAIT) on the socket itself.
    pub(crate) fn recv_dontwait_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        loop {
            match recv(self.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// write(2) on the socket itself.
    pub(crate) fn write_plain(&self, buf: &[u8]) -> io::Result<usize> {
        match self.base() {
            Sock::Tcp(s) => (&*s).write(buf),
            Sock::Unix(s) => (&*s).write(buf),
            Sock::Tls(_) => unreachable!("base() is never TLS"),
        }
    }

    /// Writes every byte of `bufs`, in order, with as few syscalls as the kernel allows.
    pub fn write_all_vectored(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        let mut idx = 0;
        let mut off = 0;
        while idx < bufs.len() {
            let slices: Vec<IoSlice<'_>> = std::iter::once(&bufs[idx][off..])
                .chain(bufs[idx + 1..].iter().copied())
                .take(512)
                .map(IoSlice::new)
                .collect();
            let mut n = match self.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while idx < bufs.len() && n >= bufs[idx].len() - off {
                n -= bufs[idx].len() - off;
                idx += 1;
                off = 0;
            }
            off += n;
        }
        Ok(())
    }
}

impl RawIo for Sock {
    fn read_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(buf)
    }
    fn recv_raw_dontwait(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_dontwait_plain(buf)
    }
    fn write_raw(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_plain(buf)
    }
    fn send_raw_dontwait(&self, buf: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        send(self.as_raw_fd(), buf, flags).map_err(io::Error::from)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        Sock::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        Sock::set_write_timeout(self, t)
    }
    fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        Sock::set_nonblocking(self, nb)
    }
}

impl Security {
    /// Secures a connection this side opened: the TLS handshake as client, within `timeout`.
    /// Plaintext passes `sock` through.
    pub fn client(&self, sock: Sock, timeout: Duration) -> io::Result<Sock> {
        match self.client_conn()? {
            None => Ok(sock),
            Some(conn) => {
                let s = TlsStream::new(sock, conn);
                s.handshake(std::time::Instant::now() + timeout)?;
                Ok(Sock::Tls(Arc::new(s)))
            }
        }
    }

    /// Secures a connection this side accepted, with a blocking handshake as server within
    /// `timeout`. Plaintext passes `sock` through.
    pub fn server(&self, sock: Sock, timeout: Duration) -> io::Result<Sock> {
        let s = self.server_start(sock)?;
        if let Sock::Tls(t) = &s {
            t.handshake(std::time::Instant::now() + timeout)?;
        }
        Ok(s)
    }

    /// Secures an accepted connection without waiting: the handshake runs as the connection
    /// is read and written (for an event loop on a non-blocking socket; pending handshake
    /// output is sent by [`Sock::flush_pending`]). Plaintext passes `sock` through.
    pub fn server_start(&self, sock: Sock) -> io::Result<Sock> {
        Ok(match self.server_conn()? {
            None => sock,
            Some(conn) => Sock::Tls(Arc::new(TlsStream::new(sock, conn))),
        })
    }
}

impl std::os::fd::AsRawFd for Sock {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self.base() {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tls(_) => unreachable!("base() is never TLS"),
        }
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self.base() {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
            Sock::Tls(_) => unreachable!("base() is never TLS"),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
            Sock::Tls(t) => (&**t).read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
            Sock::Tls(t) => (&**t).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
            Sock::Tls(t) => (&**t).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a socket nobody serves is removed; a live one, a file and a symlink stay.
    #[test]
    fn only_a_stale_socket_is_cleared() {
        let dir = std::env::temp_dir().join(format!("transport-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let nothing = dir.join("nothing");
        assert!(clear_stale_socket(&nothing).is_ok());
        let file = dir.join("file");
        std::fs::write(&file, b"precious").unwrap();
        let e = clear_stale_socket(&file).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(clear_stale_socket(&link).is_err());
        assert!(link.symlink_metadata().is_ok() && file.exists());
        let live = dir.join("live.sock");
        let l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let e = clear_stale_socket(&live).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(live.exists());
        drop(l);
        // the listener is gone, its socket file stays: stale, removed
        assert!(clear_stale_socket(&live).is_ok());
        assert!(!live.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
