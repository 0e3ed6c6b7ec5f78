//! Listening and accepting: TCP or a Unix socket, chosen by the address's form; accepted
//! TCP connections get TCP_NODELAY and the liveness options (see [`transport::set_liveness`]).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::Duration;

use log::debug;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::error::ServerError;
use transport::{Addr, Sock};

pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

pub(crate) enum MioSock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl MioSock {
    pub(crate) fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            MioSock::Tcp(s) => s,
            MioSock::Unix(s) => s,
        }
    }
    /// The blocking std socket behind this one.
    pub(crate) fn into_blocking(self) -> io::Result<Sock> {
        let s = match self {
            MioSock::Tcp(s) => {
                let fd = s.into_raw_fd();
                // SAFETY: into_raw_fd gave up ownership of `fd`; it gets exactly one new owner.
                let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
                Sock::Tcp(std)
            }
            MioSock::Unix(s) => {
                let fd = s.into_raw_fd();
                // SAFETY: as above.
                let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
                Sock::Unix(std)
            }
        };
        s.set_nonblocking(false)?;
        Ok(s)
    }
}

impl Read for MioSock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            MioSock::Tcp(s) => s.read(b),
            MioSock::Unix(s) => s.read(b),
        }
    }
}

impl Write for MioSock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            MioSock::Tcp(s) => s.write(b),
            MioSock::Unix(s) => s.write(b),
        }
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

/// Accepts one client (WouldBlock when none is waiting); returns it with a name for logs.
pub(crate) fn accept(listener: &mut Listener, liveness: Duration) -> io::Result<(MioSock, String)> {
    match listener {
        Listener::Tcp(l) => l.accept().map(|(s, a)| {
            let _ = s.set_nodelay(true);
            if let Err(e) = transport::set_liveness(s.as_raw_fd(), liveness) {
                debug!("client {a}: keepalive options: {e}");
            }
            (MioSock::Tcp(s), a.to_string())
        }),
        Listener::Unix(l) => l
            .accept()
            .map(|(s, _)| (MioSock::Unix(s), "unix".to_string())),
    }
}
