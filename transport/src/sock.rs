//! Transports: TCP or a Unix socket, chosen by the address's form. One enum for blocking
//! streams (bulk threads, clients) and one for the event loop's non-blocking ones.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

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

/// Makes a dead TCP peer show up as an error within about `timeout` instead of the kernel's
/// ~15 minutes of retransmissions: data left unacknowledged that long (TCP_USER_TIMEOUT) and an
/// idle connection whose keepalive probes go unanswered both fail the socket with ETIMEDOUT.
/// A stopped or busy peer whose kernel still acknowledges is not dead: only a cut link or a
/// vanished host is. No-op for anything but a TCP socket (a Unix socket's peer cannot vanish
/// silently). Best effort: returns the first option the kernel refused.
pub fn set_liveness(fd: std::os::fd::RawFd, timeout: Duration) -> io::Result<()> {
    if timeout.is_zero() {
        return Ok(());
    }
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // keepalive probes start after a quarter of the timeout of silence, one per quarter
    let idle = (ms / 4000).max(1);
    let opts = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, idle),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 4),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms),
    ];
    let mut first_err = None;
    for (level, opt, v) in opts {
        // SAFETY: setsockopt with a caller-provided fd and a pointer to a live c_int of the
        // size passed; a bad fd only makes the call fail.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 && first_err.is_none() {
            first_err = Some(io::Error::last_os_error());
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// A connected blocking stream.
#[derive(Debug)]
pub enum Sock {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Sock {
    /// Connects, with TCP_NODELAY when `nodelay`.
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

    /// See [`set_liveness`]; a no-op for Unix sockets.
    pub fn set_liveness(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                use std::os::fd::AsRawFd;
                set_liveness(s.as_raw_fd(), timeout)
            }
            Sock::Unix(_) => Ok(()),
        }
    }

    /// The kernel's smoothed round-trip time of a TCP connection (None for Unix sockets).
    pub fn rtt(&self) -> Option<Duration> {
        use std::os::fd::AsRawFd;
        let Sock::Tcp(s) = self else {
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

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    /// Shuts the socket down (wakes any thread blocked on it).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the write timeout.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Switches blocking mode.
    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_nonblocking(nb),
            Sock::Unix(s) => s.set_nonblocking(nb),
        }
    }

    /// Sets the socket buffer sizes (best effort).
    pub fn set_buffers(&self, bytes: usize) {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        };
        let v = bytes as libc::c_int;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt with a valid fd and a pointer to a c_int of the right size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
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

impl std::os::fd::AsRawFd for Sock {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
