//! Listening and accepting: TCP or a Unix socket, chosen by the address's form; accepted
//! TCP connections get TCP_NODELAY and the liveness options (see [`transport::set_liveness`]),
//! and every connection is secured as the server's [`transport::Security`] says.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::Duration;

use log::debug;
use mio::net::{TcpListener, UnixListener};

use crate::error::ServerError;
use transport::{Addr, Sock};

pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection on the event loop: a non-blocking [`Sock`] (TLS from the first
/// byte unless the server runs insecure), registered with mio by its descriptor.
pub(crate) struct MioSock(pub(crate) Sock);

impl MioSock {
    /// Registers with `poll` (or changes the interest, when `again`).
    pub(crate) fn register(
        &self,
        poll: &mio::Poll,
        t: mio::Token,
        interest: mio::Interest,
        again: bool,
    ) -> io::Result<()> {
        let fd = self.0.as_raw_fd();
        let mut src = mio::unix::SourceFd(&fd);
        if again {
            poll.registry().reregister(&mut src, t, interest)
        } else {
            poll.registry().register(&mut src, t, interest)
        }
    }

    pub(crate) fn deregister(&self, poll: &mio::Poll) {
        let fd = self.0.as_raw_fd();
        let _ = poll.registry().deregister(&mut mio::unix::SourceFd(&fd));
    }

    /// The blocking socket for a bulk thread (TLS state and all).
    pub(crate) fn into_blocking(self) -> io::Result<Sock> {
        self.0.set_nonblocking(false)?;
        Ok(self.0)
    }
}

impl Read for MioSock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for MioSock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Binds `addr` (port 0 picks a free port); returns the listener and the real address.
pub(crate) fn bind(addr: &Addr) -> Result<(Listener, Addr), ServerError> {
    let bind_err = |source| ServerError::Bind {
        addr: addr.to_string(),
        source,
    };
    Ok(match addr {
        Addr::Tcp(a) => {
            let l = std::net::TcpListener::bind(a).map_err(bind_err)?;
            l.set_nonblocking(true).map_err(bind_err)?;
            let real = l.local_addr().map_err(bind_err)?;
            (Listener::Tcp(TcpListener::from_std(l)), Addr::Tcp(real))
        }
        Addr::Unix(p) => {
            // a live socket of another process is not taken over, a non-socket not removed
            transport::clear_stale_socket(p).map_err(bind_err)?;
            let l = std::os::unix::net::UnixListener::bind(p).map_err(bind_err)?;
            l.set_nonblocking(true).map_err(bind_err)?;
            (Listener::Unix(UnixListener::from_std(l)), addr.clone())
        }
    })
}

/// Accepts one client (WouldBlock when none is waiting); returns it, secured as `security`
/// says (its handshake runs as the event loop reads and writes it), with a name for logs.
pub(crate) fn accept(
    listener: &mut Listener,
    liveness: Duration,
    security: &transport::Security,
) -> io::Result<(MioSock, String)> {
    let (sock, peer) = match listener {
        Listener::Tcp(l) => {
            let (s, a) = l.accept()?;
            let _ = s.set_nodelay(true);
            if let Err(e) = transport::set_liveness(s.as_raw_fd(), liveness) {
                debug!("client {a}: keepalive options: {e}");
            }
            // SAFETY: into_raw_fd gave up ownership of the descriptor; it gets exactly one
            // new owner.
            let std = unsafe { std::net::TcpStream::from_raw_fd(s.into_raw_fd()) };
            (Sock::Tcp(std), a.to_string())
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept()?;
            // SAFETY: as above.
            let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(s.into_raw_fd()) };
            (Sock::Unix(std), "unix".to_string())
        }
    };
    sock.set_nonblocking(true)?;
    let sock = security.server_start(sock)?;
    sock.set_nonblocking(true)?;
    Ok((MioSock(sock), peer))
}
