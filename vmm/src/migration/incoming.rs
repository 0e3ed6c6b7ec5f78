//! The destination side (`vmm --incoming ADDR`): listens, and for each source that connects,
//! checks its offer, builds the VM shell (RAM mapped and registered with userfaultfd, vCPUs
//! created), takes the state, resumes the vCPUs at once and hands the running VM to the
//! controller. A failed attempt (bad peer, incompatible VM, state that does not apply) is logged
//! and the next connection is awaited.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use pager::PagerConfig;
use transport::{Addr, Sock};

use super::{mono_ns, Link, MigrationError, Offer, Wire};
use crate::api::replies::IncomingStatus;
use crate::api::{self, Reply, Request};
use crate::config::SerialOut;
use crate::memory::{self, PAGE_SIZE};
use crate::state;
use crate::vm::restore::{Finish, Prepared, ServedAs};
use crate::vm::{Event, Vm};
use transport::error_chain;

/// Time allowed for a connected source to send its offer, all of it.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed between Accept and the state (the source pauses in between), all of it.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads with one deadline for a whole message: a per-read timeout would let a peer that
/// trickles a byte now and then hold the destination, which takes one source at a time, for
/// as long as it likes.
struct Deadline<'a> {
    sock: &'a mut Sock,
    until: Instant,
    got: usize,
}

impl std::io::Read for Deadline<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.sock.set_read_timeout(Some(left))?;
        let n = self.sock.read(b)?;
        self.got += n;
        Ok(n)
    }
}

/// Receives one message, which must have arrived whole by `until` (`what` and `allowed` name
/// it and its time limit in the error).
fn recv_by(
    link: &mut Link,
    until: Instant,
    what: &str,
    allowed: Duration,
) -> Result<Wire, MigrationError> {
    let peer = link.peer.clone();
    let mut r = Deadline {
        sock: &mut link.sock,
        until,
        got: 0,
    };
    let header = match proto::read_frame(&mut r, &mut link.buf) {
        Ok(h) => h,
        Err(proto::ReadError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(MigrationError::Io {
                what: format!(
                    "no complete {what} from {peer} within {allowed:?} ({} bytes received)",
                    r.got
                ),
                source: std::io::ErrorKind::TimedOut.into(),
            })
        }
        Err(proto::ReadError::Io(source)) => {
            return Err(MigrationError::Io {
                what: format!("receiving from {peer}"),
                source,
            })
        }
        Err(e @ (proto::ReadError::Closed | proto::ReadError::TruncatedFrame { .. })) => {
            return Err(MigrationError::Io {
                what: format!("receiving from {peer}"),
                source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e.to_string()),
            })
        }
        Err(e) => {
            return Err(MigrationError::Protocol(format!(
                "from {peer}: {}",
                error_chain(&e)
            )))
        }
    };
    let mut frame = Vec::with_capacity(proto::HEADER_LEN + link.buf.len());
    frame.extend_from_slice(&header.encode());
    frame.extend_from_slice(&link.buf);
    super::decode(&frame)
}

/// How the destination waits and what it accepts.
#[derive(Debug, Clone)]
pub struct IncomingConfig {
    /// Where to listen.
    pub listen: Addr,
    /// Console output of the migrated VM.
    pub serial: SerialOut,
    /// Control socket (served while waiting, then by the VM).
    pub api_socket: Option<PathBuf>,
    /// Refuse VMs with more memory than this.
    pub max_mem: Option<u64>,
    /// Refuse VMs with more vCPUs than this.
    pub max_vcpus: Option<u32>,
    /// Pager tunables. Its `reconnect_timeout` is replaced by the source's recover timeout
    /// (from the offer) unless `recover_timeout` is set.
    pub pager: PagerConfig,
    /// Keep reconnecting to a lost source this long (default: as long as the source waits).
    pub recover_timeout: Option<Duration>,
    /// Give up when no migration arrived within this time.
    pub timeout: Option<Duration>,
    /// Leave the migrated VM paused.
    pub paused: bool,
    /// Disk paths that differ here: (source path, path on this host).
    pub disk_map: Vec<(PathBuf, PathBuf)>,
    /// Tap names that differ here: (source tap, tap on this host).
    pub tap_map: Vec<(String, String)>,
    /// How the source is authenticated and the link, the pager's channels and disk copies are
    /// encrypted; also what the migrated VM uses when it migrates on.
    pub security: transport::Security,
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    fn bind(addr: &Addr) -> Result<(Listener, Addr), MigrationError> {
        let io = |source| MigrationError::Io {
            what: format!("cannot listen on {addr}"),
            source,
        };
        Ok(match addr {
            Addr::Tcp(a) => {
                let l = std::net::TcpListener::bind(a).map_err(io)?;
                let real = l.local_addr().map_err(io)?;
                (Listener::Tcp(l), Addr::Tcp(real))
            }
            Addr::Unix(p) => {
                transport::clear_stale_socket(p)
                    .map_err(|e| MigrationError::Other(e.to_string()))?;
                (
                    Listener::Unix(std::os::unix::net::UnixListener::bind(p).map_err(io)?),
                    addr.clone(),
                )
            }
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }

    /// Waits up to `ms` for a connection.
    fn accept(&self, ms: i32) -> std::io::Result<Option<(Sock, String)>> {
        let mut p = [PollFd::new(self.fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::NONE);
        if !matches!(poll(&mut p, timeout), Ok(n) if n > 0) {
            return Ok(None);
        }
        Ok(Some(match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nodelay(true)?;
                (Sock::Tcp(s), peer.to_string())
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                (Sock::Unix(s), "unix peer".to_owned())
            }
        }))
    }
}

/// Handshakes in progress at once; a connection beyond them is closed at once (a real source
/// gets in as soon as the flood's handshakes time out, within [`HANDSHAKE_TIMEOUT`]).
const MAX_HANDSHAKES: usize = 128;
/// Lines about refused peers: a few per second, the rest counted.
static REFUSED: transport::LogLimiter = transport::LogLimiter::new(5, Duration::from_secs(1));
use transport::tls::HANDSHAKE_TIMEOUT;

/// Accepts connections and authenticates each on a thread of its own, so a peer that never
/// completes its handshake (or a flood of them) holds up no one: only authenticated
/// connections come out of `rx`. Stops with the value.
struct Gate {
    rx: Receiver<(Sock, String)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gate {
    fn start(listener: Listener, security: transport::Security) -> Result<Gate, MigrationError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::Builder::new()
            .name("incoming-accept".into())
            .spawn(move || {
                let inflight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                while !halt.load(Ordering::Acquire) {
                    let (sock, peer) = match listener.accept(100) {
                        Ok(Some(c)) => c,
                        Ok(None) => continue,
                        Err(e) => {
                            REFUSED.warn(format_args!("accepting a migration connection: {e}"));
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    };
                    if inflight.load(Ordering::Acquire) >= MAX_HANDSHAKES {
                        REFUSED.warn(format_args!(
                            "{peer}: dropped: {MAX_HANDSHAKES} handshakes already in progress"
                        ));
                        continue;
                    }
                    inflight.fetch_add(1, Ordering::AcqRel);
                    let (tx, security, held) = (tx.clone(), security.clone(), inflight.clone());
                    let spawned = std::thread::Builder::new()
                        .name("incoming-tls".into())
                        .stack_size(256 << 10)
                        .spawn(move || {
                            let r = security.server(sock, HANDSHAKE_TIMEOUT);
                            held.fetch_sub(1, Ordering::AcqRel);
                            match r {
                                Ok(s) => {
                                    let _ = tx.send((s, peer));
                                }
                                Err(e) => REFUSED.warn(format_args!(
                                    "migration connection from {peer} refused: {e}"
                                )),
                            }
                        });
                    if let Err(e) = spawned {
                        inflight.fetch_sub(1, Ordering::AcqRel);
                        REFUSED.warn(format_args!("{e}: cannot start a handshake thread"));
                    }
                }
            })
            .map_err(|e| MigrationError::Other(format!("spawning the accept thread: {e}")))?;
        Ok(Gate {
            rx,
            stop,
            thread: Some(thread),
        })
    }

    /// An authenticated connection, waiting at most `timeout` for one.
    fn next(&self, timeout: Duration) -> Option<(Sock, String)> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for a migration and returns the running VM. Ends early (with an error) when `stop` is
/// set or the configured timeout passes.
pub fn receive(cfg: &IncomingConfig, stop: &AtomicBool) -> Result<Vm, MigrationError> {
    let (listener, bound) = Listener::bind(&cfg.listen)?;
    // Control requests go to whoever owns the VM's role: this loop while waiting, the VM after.
    let (wait_tx, wait_rx) = std::sync::mpsc::channel::<Event>();
    let target = Arc::new(Mutex::new(wait_tx));
    if let Some(path) = &cfg.api_socket {
        let (ctl_tx, ctl_rx) = std::sync::mpsc::channel::<Event>();
        api::server::serve(path, ctl_tx, Event::Control)
            .map_err(|e| MigrationError::Other(error_chain(&e)))?;
        let t = target.clone();
        let _ = std::thread::Builder::new()
            .name("control-fwd".into())
            .spawn(move || {
                for ev in ctl_rx {
                    let to = t.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if to.send(ev).is_err() {
                        return;
                    }
                }
            });
    }
    log::info!(
        "waiting for an incoming migration on {bound}; {}",
        cfg.security.describe()
    );
    let gate = Gate::start(listener, cfg.security.clone())?;
    let started = Instant::now();
    let mut attempts = 0u32;
    let mut last_error: Option<String> = None;
    loop {
        if stop.load(Ordering::Acquire) {
            return Err(MigrationError::Other(
                "stopped by a signal while waiting".into(),
            ));
        }
        if cfg.timeout.is_some_and(|t| started.elapsed() > t) {
            return Err(MigrationError::Other(format!(
                "no migration arrived on {bound} within {:?}",
                cfg.timeout.unwrap_or_default()
            )));
        }
        answer_while_waiting(&wait_rx, &bound, attempts, last_error.as_deref());
        let Some((sock, peer)) = gate.next(Duration::from_millis(100)) else {
            continue;
        };
        attempts += 1;
        log::info!(
            "migration connection from {peer}{}",
            sock.peer_identity()
                .map_or(String::new(), |p| format!(" (authenticated as {p})"))
        );
        let mut link = Link::new(sock, peer.clone());
        match attempt(cfg, &mut link) {
            Ok(mut vm) => {
                *target.lock().unwrap_or_else(|p| p.into_inner()) = vm.sender();
                // requests that arrived meanwhile
                while let Ok(ev) = wait_rx.try_recv() {
                    let _ = vm.sender().send(ev);
                }
                vm.attach_incoming(link);
                return Ok(vm);
            }
            Err(e) => {
                let msg = error_chain(&e);
                log::error!("migration from {peer} failed: {msg}; waiting for another");
                last_error = Some(msg);
            }
        }
    }
}

fn answer_while_waiting(rx: &Receiver<Event>, bound: &Addr, attempts: u32, last: Option<&str>) {
    while let Ok(ev) = rx.try_recv() {
        let Event::Control((req, reply)) = ev else {
            continue;
        };
        let r = match req {
            Request::Status {} => Reply::ok(&IncomingStatus {
                api_version: api::VERSION,
                state: "incoming".into(),
                listening: bound.to_string(),
                attempts,
                last_error: last.map(str::to_owned),
            }),
            _ => Reply::err(
                "busy",
                format!("no VM yet: waiting for an incoming migration on {bound}"),
            ),
        };
        let _ = reply.send(r);
    }
}

/// The host's RAM (MemTotal), if /proc/meminfo says.
fn host_ram_bytes() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// Why an offer cannot be taken, or Ok.
fn check_offer(o: &Offer, cfg: &IncomingConfig, kvm: &kvm_ioctls::Kvm) -> Result<(), String> {
    if o.proto_version != proto::PROTOCOL_VERSION {
        return Err(format!(
            "page protocol version {} (this vmm speaks {})",
            o.proto_version,
            proto::PROTOCOL_VERSION
        ));
    }
    if o.page_size != PAGE_SIZE {
        return Err(format!(
            "page size {} (this host: {PAGE_SIZE})",
            o.page_size
        ));
    }
    let c = &o.config;
    if o.devices.len() > crate::virtio::MMIO_SLOTS as usize {
        return Err(format!(
            "{} virtio devices (this VMM has {} slots)",
            o.devices.len(),
            crate::virtio::MMIO_SLOTS
        ));
    }
    if let Some(max) = cfg.max_mem.filter(|&m| c.mem_bytes > m) {
        return Err(format!(
            "{} MiB of guest memory; this destination accepts at most {} MiB (--max-mem)",
            c.mem_bytes >> 20,
            max >> 20
        ));
    }
    // without --max-mem: no more than this host's RAM (an offer is not to make it swap or
    // be killed for memory)
    if let Some(host) = host_ram_bytes().filter(|&h| cfg.max_mem.is_none() && c.mem_bytes > h) {
        return Err(format!(
            "{} MiB of guest memory; this host has {} MiB of RAM (raise with --max-mem)",
            c.mem_bytes >> 20,
            host >> 20
        ));
    }
    if let Some(max) = cfg.max_vcpus.filter(|&m| c.vcpus > m) {
        return Err(format!(
            "{} vCPUs; this destination accepts at most {max} (--max-vcpus)",
            c.vcpus
        ));
    }
    match memory::ram_ranges(c.mem_bytes) {
        Ok(r) if r == c.ram => {}
        Ok(r) => {
            return Err(format!(
                "RAM layout {:?}; this vmm lays it out as {r:?}",
                c.ram
            ))
        }
        Err(e) => return Err(e.to_string()),
    }
    let caps: Vec<&str> = o
        .caps
        .iter()
        .filter(|&&cap| kvm.check_extension_raw(u64::from(cap)) <= 0)
        .map(|&cap| {
            super::REQUIRED_CAPS
                .iter()
                .find(|(c, _)| *c == cap)
                .map_or("an unknown capability", |(_, n)| n)
        })
        .collect();
    if !caps.is_empty() {
        return Err(format!("this host's KVM lacks {}", caps.join(", ")));
    }
    let host = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let missing = super::missing_cpu_features(&o.cpuid, host.as_slice());

    if !missing.is_empty() {
        return Err(format!(
            "the guest uses CPU features this host lacks: {}",
            missing.join(", ")
        ));
    }
    let msrs = kvm
        .get_msr_index_list()
        .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
    let unknown: Vec<String> = o
        .msrs
        .iter()
        .filter(|m| !msrs.as_slice().contains(m))
        .map(|m| format!("{m:#x}"))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "this host's KVM cannot restore MSRs {}",
            unknown.join(", ")
        ));
    }
    Ok(())
}

/// One migration attempt on a connected link.
fn attempt(cfg: &IncomingConfig, link: &mut Link) -> Result<Vm, MigrationError> {
    let offer = match recv_by(link, Instant::now() + OFFER_TIMEOUT, "Offer", OFFER_TIMEOUT)? {
        Wire::Offer(o) => o,
        other => {
            return Err(MigrationError::Protocol(format!(
                "expected an Offer, got {other:?}"
            )))
        }
    };
    let t0 = Instant::now();
    let refuse = |link: &mut Link, reason: String| {
        let _ = link.send(&Wire::Refuse {
            reason: reason.clone(),
        });
        MigrationError::Refused(reason)
    };
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| refuse(link, format!("/dev/kvm: {e}")))?;
    check_offer(&offer, cfg, &kvm).map_err(|r| refuse(link, r))?;
    drop(kvm);
    // Disks and taps are opened (and disks checked to be the source's) before anything is
    // paused: a destination that cannot attach them refuses while the VM still runs there.
    let backends =
        crate::virtio::open_offered(&offer.devices, &cfg.disk_map, &cfg.tap_map, &cfg.security)
            .map_err(|e| {
                // the reason stays here: what exists on this host, and how big, is not the
                // peer's to learn (a refusal naming local files would let it probe them)
                log::warn!("refusing the migration: {e}");
                refuse(
                    link,
                    "its devices cannot be attached on this host (the destination's log says why)"
                        .into(),
                )
            })?;
    let pages: Addr = offer.page_server.parse().map_err(|e| {
        refuse(
            link,
            format!("page-server address {:?}: {e}", offer.page_server),
        )
    })?;
    // The pager connects now, so none of it is left for the downtime; its stream waits until
    // the source has paused (pages read before would be stale).
    let pcfg = PagerConfig {
        stream_deferred: true,
        bulk_buffer_bytes: super::bulk_buffer_for(super::tcp_rtt(link.sock())),
        // pre-copy: pages sent again must come after their older copies: one connection
        precopy: offer.precopy,
        bulk_connections: if offer.precopy {
            1
        } else {
            cfg.pager.bulk_connections
        },
        reconnect_timeout: cfg
            .recover_timeout
            .unwrap_or(Duration::from_millis(offer.recover_timeout_ms.max(1000))),
        security: cfg.security.clone(),
        ..cfg.pager.clone()
    };
    let mut prepared = Prepared::new(&offer.config, Some((&pages, &pcfg, ServedAs::Ranges)))
        .map_err(|e| refuse(link, error_chain(&e)))?;
    prepared.backends = backends;
    let tsc = prepared
        .tsc_khz()
        .map_err(|e| refuse(link, error_chain(&e)))?;
    let scaling = prepared
        .kvm()
        .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_TSC_CONTROL))
        > 0;
    if tsc != offer.tsc_khz && !scaling {
        return Err(refuse(
            link,
            format!(
                "guest TSC runs at {} kHz, this host at {tsc} kHz and its KVM cannot scale it",
                offer.tsc_khz
            ),
        ));
    }
    let prepare_ms = t0.elapsed().as_secs_f64() * 1e3;
    link.send(&Wire::Accept { prepare_ms })?;
    log::info!(
        "accepted: {} MiB, {} vCPUs, pages from {pages}; ready in {prepare_ms:.1} ms",
        offer.config.mem_bytes >> 20,
        offer.config.vcpus
    );
    // post-copy: the probes and the state within STATE_TIMEOUT of Accept, all of them
    let state_by = Instant::now() + STATE_TIMEOUT;
    let (envelope, paused_at, dirty, precopy_pages) = loop {
        // hybrid: the pre-copy passes run while the source VM does (minutes at worst)
        let (until, allowed) = if offer.precopy {
            let wait = Duration::from_secs(600);
            (Instant::now() + wait, wait)
        } else {
            (state_by, STATE_TIMEOUT)
        };
        match recv_by(link, until, "message (Ping or State)", allowed)? {
            Wire::Ping { t } => link.send(&Wire::Pong { t, dest: mono_ns() })?,
            Wire::Precopy if offer.precopy => {
                if let Some(p) = prepared.pager() {
                    p.start_stream()
                        .map_err(|e| MigrationError::Other(error_chain(&e)))?;
                }
                log::info!("pre-copy: taking pages while the VM still runs on the source");
            }
            Wire::State {
                envelope,
                paused_at,
                dirty,
                precopy_pages,
            } => break (envelope, paused_at, dirty, precopy_pages),
            Wire::Abort { reason } => {
                return Err(MigrationError::Other(format!(
                    "the source gave up: {reason}"
                )))
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected Ping or State, got {other:?}"
                )))
            }
        }
    };
    let t_state = Instant::now();
    let fail = |link: &mut Link, e: MigrationError| {
        let _ = link.send(&Wire::Failed {
            reason: error_chain(&e),
        });
        e
    };
    let snap = state::decode(&envelope, "the migrated state")
        .map_err(|e| fail(link, MigrationError::Vm(Box::new(e.into()))))?;
    if offer.precopy {
        let dropped = prepared
            .pager()
            .map(|p| p.end_precopy(&dirty, precopy_pages))
            .transpose()
            .map_err(|e| fail(link, MigrationError::Other(error_chain(&e))))?
            .unwrap_or(0);
        log::info!("pre-copy ended: {dropped} pages modified since they were sent are dropped");
    }
    if offer.copy_before_resume {
        // stop-and-copy: the pages still dirty come now, while the VM is paused everywhere
        prepared.wait_memory(Duration::from_secs(60)).map_err(|e| {
            fail(
                link,
                MigrationError::Other(format!("copying the rest: {e}")),
            )
        })?;
    }
    let mut vm = Vm::finish(
        prepared,
        &snap,
        Finish {
            serial: &cfg.serial,
            api_socket: None,
            paused: true,
            channel: None,
            memory_file: None,
        },
    )
    .map_err(|e| fail(link, e.into()))?;
    // Bridges learn the NICs' new port when the VM first runs here.
    vm.announce_on_resume();
    vm.set_security(cfg.security.clone());
    if !cfg.paused {
        vm.resume();
    }
    let running_at = mono_ns();
    // (what the downtime holds: the stream and disk copies start after the vCPUs run)
    let apply_ms = t_state.elapsed().as_secs_f64() * 1e3;
    if let Err(e) = vm.start_stream() {
        log::warn!("starting the background stream: {}", error_chain(&e));
    }
    vm.start_disk_copies();
    // The VM runs here from now on, whatever happens to the link.
    if let Err(e) = link.send(&Wire::Resumed {
        running_at,
        apply_ms,
    }) {
        log::warn!("telling the source the VM runs here: {}", error_chain(&e));
    }
    log::info!(
        "running {apply_ms:.2} ms after the state arrived ({:.2} ms after the source paused, same-host clocks)",
        running_at.saturating_sub(paused_at) as f64 / 1e6
    );
    Ok(vm)
}
