//! The TCP stream: the witness (in the guest) and its peer (`witness peer`, on the host side)
//! each send the other the same endless byte sequence ([`byte_at`]) and check every byte they
//! receive against it, so a lost, repeated, reordered or corrupted byte, or a broken connection,
//! is seen. The peer sends only as many bytes as it received: the guest sets the pace.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most BAD lines printed per side.
const MAX_REPORTS: u64 = 10;

/// Byte `i` of the stream.
pub fn byte_at(i: u64) -> u8 {
    crate::mix::mix((i / 8) ^ 0x5354_5245_414d).to_le_bytes()[(i % 8) as usize]
}

/// Bytes `at..at + buf.len()` of the stream.
fn fill(buf: &mut [u8], at: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = byte_at(at + k as u64);
    }
}

/// Checks `buf` as bytes `at..` of the stream; returns the offset of the first wrong byte.
fn first_wrong(buf: &[u8], at: u64) -> Option<u64> {
    buf.iter()
        .enumerate()
        .find(|(k, b)| **b != byte_at(at + *k as u64))
        .map(|(k, _)| at + k as u64)
}

/// The guest side's counters.
#[derive(Default)]
pub struct Stream {
    pub sent: AtomicU64,
    pub recv: AtomicU64,
    pub bad: AtomicU64,
    pub up: AtomicBool,
    pub broken: AtomicBool,
    /// CLOCK_MONOTONIC ns of the last byte received.
    pub last_recv_ns: AtomicU64,
}

impl Stream {
    /// Connects to `peer` (retrying until it answers) and sends `kib_per_s` KiB/s of the stream
    /// while a second thread checks what comes back. Returns when the connection breaks (the
    /// stream cannot be resumed: that is a failure the verdict reports).
    pub fn run(self: Arc<Self>, peer: String, kib_per_s: u64) {
        let mut tries = 0u64;
        let conn = loop {
            match TcpStream::connect(&peer) {
                Ok(c) => break c,
                Err(e) => {
                    if tries == 0 {
                        println!("WITNESS NET connecting to {peer}: {e} (retrying)");
                    }
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        };
        let _ = conn.set_nodelay(true);
        self.last_recv_ns.store(
            crate::clock::clock(libc::CLOCK_MONOTONIC),
            Ordering::Relaxed,
        );
        self.up.store(true, Ordering::Release);
        println!("WITNESS NET up peer={peer} tries={tries}");
        let reader = match conn.try_clone() {
            Ok(r) => r,
            Err(e) => return self.broke(&format!("clone: {e}")),
        };
        {
            let s = self.clone();
            std::thread::spawn(move || s.receive(reader));
        }
        let mut w = conn;
        let tick = Duration::from_millis(20);
        let chunk = (kib_per_s * 1024 / 50).max(64) as usize;
        let mut buf = vec![0u8; chunk];
        let mut at = 0u64;
        let start = Instant::now();
        loop {
            if self.broken.load(Ordering::Acquire) {
                return;
            }
            fill(&mut buf, at);
            if let Err(e) = w.write_all(&buf) {
                return self.broke(&format!("send at byte {at}: {e}"));
            }
            at += chunk as u64;
            self.sent.store(at, Ordering::Relaxed);
            // paced by wall time: a pause (a migration) is not made up for in a burst
            let due = start.elapsed().as_millis() as u64 * kib_per_s * 1024 / 1000;
            if at >= due {
                std::thread::sleep(tick);
            }
        }
    }

    fn receive(self: Arc<Self>, mut r: TcpStream) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => return self.broke(&format!("peer closed at byte {at}")),
                Ok(n) => n,
                Err(e) => return self.broke(&format!("receive at byte {at}: {e}")),
            };
            if let Some(off) = first_wrong(&buf[..n], at) {
                if self.bad.fetch_add(1, Ordering::Relaxed) < MAX_REPORTS {
                    println!("WITNESS NET BAD byte={off}");
                }
            }
            at += n as u64;
            self.recv.store(at, Ordering::Relaxed);
            self.last_recv_ns.store(
                crate::clock::clock(libc::CLOCK_MONOTONIC),
                Ordering::Relaxed,
            );
        }
    }

    fn broke(&self, why: &str) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            println!("WITNESS NET BROKEN {why}");
        }
        self.up.store(false, Ordering::Release);
    }

    /// `state=` for the verdict: connecting, up, broken.
    pub fn state(&self) -> &'static str {
        if self.broken.load(Ordering::Acquire) {
            "broken"
        } else if self.up.load(Ordering::Acquire) {
            "up"
        } else {
            "connecting"
        }
    }
}

/// `witness peer listen=ADDR`: serves the stream's other end to every connection, one thread
/// each, and prints what it saw (`PEER up`, `PEER BAD`, `PEER end`, and a `PEER stat` line
/// every 2 s while bytes flow).
pub fn peer(listen: &str) -> std::io::Result<()> {
    let l = TcpListener::bind(listen)?;
    println!("PEER listening on {listen}");
    for (id, c) in l.incoming().enumerate() {
        match c {
            Ok(c) => {
                std::thread::spawn(move || serve(id, c));
            }
            Err(e) => println!("PEER accept: {e}"),
        }
    }
    Ok(())
}

fn serve(id: usize, mut c: TcpStream) {
    let from = c
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    println!("PEER up conn={id} from={from}");
    let _ = c.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    let mut bad = 0u64;
    let mut last = Instant::now();
    let end = loop {
        let n = match c.read(&mut buf) {
            Ok(0) => break "closed".to_owned(),
            Ok(n) => n,
            Err(e) => break format!("error {e}"),
        };
        if let Some(off) = first_wrong(&buf[..n], at) {
            if bad < MAX_REPORTS {
                println!("PEER BAD conn={id} byte={off}");
            }
            bad += 1;
        }
        fill(&mut out[..n], at);
        if let Err(e) = c.write_all(&out[..n]) {
            break format!("send error {e}");
        }
        at += n as u64;
        if last.elapsed() >= Duration::from_secs(2) {
            println!("PEER stat conn={id} bytes={at} bad={bad}");
            last = Instant::now();
        }
    };
    println!("PEER end conn={id} bytes={at} bad={bad} {end}");
}
