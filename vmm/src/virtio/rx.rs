//! A NIC's receive thread: frames from its tap into the guest's receive queue.
//!
//! Its two poll(2) calls stay on `libc`: the stop signal is a `vmm_sys_util` EventFd (the type
//! the rust-vmm device crates share), which has no `AsFd`, so `nix::poll` would need an unsafe
//! `BorrowedFd::borrow_raw` in place of the unsafe poll.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::backend::Backend;
use super::error::VirtioError;
use super::mmio::{lock, Transport};
use super::net::{mac_string, rarp, RxParts, HDR, RX_QUEUE};
use super::queue::{scatter, QueueError};

/// Delivers one received frame into the receive queue or drops it; false when the guest has
/// no free buffer (the frame waits).
fn deliver(t: &mut Transport, frame: &[u8]) -> bool {
    let ok = !t.is_paused() && t.driver_ok();
    let Backend::Net(n) = &mut t.backend else {
        return true;
    };
    if !ok {
        n.counters.rx_dropped += 1;
        return true;
    }
    let q = &mut t.queues[RX_QUEUE];
    let r = (|| -> Result<bool, QueueError> {
        let Some(chain) = q.pop(&t.ram)? else {
            return Ok(false);
        };
        let mut buf = vec![0u8; HDR + frame.len()];
        buf[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
        buf[HDR..].copy_from_slice(frame);
        let w = scatter(&t.ram, &chain.descs, &buf)?;
        q.push_used(&t.ram, chain.head, w)?;
        Ok(true)
    })();
    match r {
        Ok(true) => {
            n.counters.rx_frames += 1;
            n.counters.rx_bytes += frame.len() as u64;
            t.interrupt();
            true
        }
        Ok(false) => false,
        Err(e) => {
            t.broken(&e.to_string());
            true
        }
    }
}

/// The receive thread of one NIC.
pub struct RxWorker {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
    tap: Arc<File>,
    mac: [u8; 6],
    transport: Arc<Mutex<Transport>>,
}

impl RxWorker {
    pub(super) fn spawn(
        transport: Arc<Mutex<Transport>>,
        parts: RxParts,
    ) -> Result<RxWorker, VirtioError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VirtioError::Config(format!("eventfd: {e}")))?;
        let stop2 = stop
            .try_clone()
            .map_err(|e| VirtioError::Config(format!("eventfd: {e}")))?;
        let tap = Arc::new(parts.tap);
        let rx_tap = tap.clone();
        let t2 = transport.clone();
        let thread = std::thread::Builder::new()
            .name("net-rx".into())
            .spawn(move || rx_loop(t2, rx_tap, stop2))
            .map_err(|e| VirtioError::Config(format!("spawning net-rx: {e}")))?;
        Ok(RxWorker {
            stop,
            thread: Some(thread),
            tap,
            mac: parts.mac,
            transport,
        })
    }

    /// Sends the RARP announcement 5 times (0, 50, 150, 300, 500 ms) from a thread.
    pub fn announce(&self) {
        let tap = self.tap.clone();
        let mac = self.mac;
        let t = self.transport.clone();
        let _ = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                let f = rarp(&mac);
                for (i, wait) in [0u64, 50, 100, 150, 200].into_iter().enumerate() {
                    std::thread::sleep(Duration::from_millis(wait));
                    match (&*tap).write(&f) {
                        Ok(n) if n == f.len() => {
                            if let Backend::Net(n) = &mut lock(&t).backend {
                                n.counters.announces += 1;
                            }
                            log::debug!("announced {} ({})", mac_string(&mac), i + 1);
                        }
                        Ok(n) => log::warn!("announcing {}: short write {n}", mac_string(&mac)),
                        Err(e) => log::warn!("announcing {}: {e}", mac_string(&mac)),
                    }
                }
            });
    }
}

impl Drop for RxWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a frame waits for a receive buffer before the next try (drivers refill on their
/// own schedule; the tap keeps queueing behind it meanwhile).
const RX_RETRY_MS: i32 = 1;
/// A frame that found no buffer for this long is dropped.
const RX_WAIT_MAX: Duration = Duration::from_millis(100);

fn rx_loop(t: Arc<Mutex<Transport>>, tap: Arc<File>, stop: EventFd) {
    let mut buf = vec![0u8; 65536];
    // A frame waiting for a free receive buffer, and since when.
    let mut waiting: Option<(usize, std::time::Instant)> = None;
    loop {
        if let Some((n, since)) = waiting {
            let mut g = lock(&t);
            if deliver(&mut g, &buf[..n]) {
                waiting = None;
            } else if since.elapsed() > RX_WAIT_MAX {
                if let Backend::Net(net) = &mut g.backend {
                    net.counters.rx_dropped += 1;
                }
                waiting = None;
            } else {
                drop(g);
                let mut fds = [libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(fds.as_mut_ptr(), 1, RX_RETRY_MS) } > 0 {
                    return;
                }
                continue;
            }
        }
        let mut fds = [
            libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!("net-rx poll: {}", std::io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            match (&*tap).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if !deliver(&mut lock(&t), &buf[..n]) {
                        waiting = Some((n, std::time::Instant::now()));
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("net-rx read: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
}
