//! The migration link: one connection carrying the conversation, its clock, and the socket
//! sizes derived from its round trip.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};
use nix::time::{clock_gettime, ClockId};

use proto::{read_frame, HEADER_LEN};
use transport::Sock;

use super::error::MigrationError;
use super::wire::{decode, encode, name, Wire};

/// Silence from the destination after which the link counts as lost (it reports every 250 ms).
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// CLOCK_MONOTONIC in ns (the clock both sides timestamp with; aligned through Ping/Pong).
pub fn mono_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only show as a huge offset
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// The migration connection: framed [`Wire`] messages.
pub struct Link {
    pub(super) sock: Sock,
    pub(super) buf: Vec<u8>,
    pub(super) peer: String,
}

impl Link {
    /// Wraps a connected socket. A peer that stops answering (cut link, lost host) fails it
    /// within [`transport::DEFAULT_LIVENESS_TIMEOUT`] instead of TCP's ~15 minutes, and one
    /// that restarted resets it at the first keepalive after the link is back.
    pub fn new(sock: Sock, peer: String) -> Link {
        if let Err(e) = sock.set_liveness(transport::DEFAULT_LIVENESS_TIMEOUT) {
            log::debug!("migration link to {peer}: keepalive options: {e}");
        }
        Link {
            sock,
            buf: Vec::new(),
            peer,
        }
    }

    /// Whether a frame has started to arrive (or the connection ended) within `timeout`:
    /// waiting without reading keeps a slow frame from being cut by a receive timeout.
    pub fn readable(&self, timeout: Duration) -> bool {
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
    }

    /// Whether the peer has closed the link or it failed (a reset, a liveness timeout), without
    /// consuming anything: a peek. None while it is up (with or without data waiting).
    pub fn gone(&self) -> Option<String> {
        let mut b = [0u8; 1];
        match recv(
            self.sock.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => Some(format!("{} closed the migration link", self.peer)),
            Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => None,
            Err(e) => Some(format!(
                "migration link to {}: {}",
                self.peer,
                std::io::Error::from(e)
            )),
        }
    }

    /// The peer, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The socket.
    pub fn sock(&self) -> &Sock {
        &self.sock
    }

    /// Sends one message.
    pub fn send(&mut self, w: &Wire) -> Result<(), MigrationError> {
        let bytes = encode(w)?;
        self.sock
            .write_all(&bytes)
            .map_err(|source| MigrationError::Io {
                what: format!("sending {} to {}", name(w), self.peer),
                source,
            })
    }

    /// Receives one message, waiting at most `timeout` (None: forever).
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Wire, MigrationError> {
        let io = |what: String| move |source| MigrationError::Io { what, source };
        self.sock
            .set_read_timeout(timeout)
            .map_err(io(format!("setting a timeout on {}", self.peer)))?;
        let header = read_frame(&mut self.sock, &mut self.buf).map_err(|e| match e {
            proto::ReadError::Io(source) => MigrationError::Io {
                what: format!("receiving from {}", self.peer),
                source,
            },
            e @ (proto::ReadError::Closed | proto::ReadError::TruncatedFrame { .. }) => {
                MigrationError::Io {
                    what: format!("receiving from {}", self.peer),
                    source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e.to_string()),
                }
            }
            other => MigrationError::Protocol(format!(
                "from {}: {}",
                self.peer,
                transport::error_chain(&other)
            )),
        })?;
        let mut frame = Vec::with_capacity(HEADER_LEN + self.buf.len());
        frame.extend_from_slice(&header.encode());
        frame.extend_from_slice(&self.buf);
        decode(&frame)
    }
}

/// The kernel's smoothed round-trip estimate of a TCP connection (None for a Unix socket).
pub fn tcp_rtt(sock: &Sock) -> Option<Duration> {
    sock.rtt()
}

/// Socket buffer for the bulk (stream) connections of a link with round trip `rtt`: twice the
/// bandwidth-delay product at 10 Gbit/s, within 512 KiB – 4 MiB. Pages queued in these buffers
/// are already sent, and a fault on one waits for the stream to deliver it, so the buffers are
/// kept as small as the link allows (measured on loopback with the guest writing 100 MiB/s:
/// 512 KiB against 2 MiB halves the fault p99 and cuts the longest heartbeat gap by a third,
/// for ~10 % more total time).
pub fn bulk_buffer_for(rtt: Option<Duration>) -> usize {
    const BYTES_PER_S: f64 = 10e9 / 8.0;
    let bdp = rtt.map_or(0.0, |r| r.as_secs_f64() * BYTES_PER_S);
    ((2.0 * bdp) as usize).clamp(512 << 10, 4 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_buffers_follow_the_round_trip() {
        assert_eq!(bulk_buffer_for(None), 512 << 10);
        assert_eq!(bulk_buffer_for(Some(Duration::from_micros(50))), 512 << 10);
        let ms = bulk_buffer_for(Some(Duration::from_millis(1)));
        assert_eq!(ms, 2_500_000);
        assert_eq!(bulk_buffer_for(Some(Duration::from_millis(50))), 4 << 20);
    }
}
