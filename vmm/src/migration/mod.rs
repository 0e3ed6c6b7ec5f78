//! Live migration, post-copy: the source pauses only while the non-memory state crosses the
//! wire, the destination resumes at once and pages guest RAM in through the pager (faults first,
//! the stream for the rest) from a page-server the source runs over its paused VM's memory.
//!
//! One **migration connection** (TCP or a Unix socket) carries the conversation below; each
//! message is a `proto` State frame (length-checked, CRC32) holding a postcard-encoded [`Wire`]
//! value after a 4-byte [`MIGRATION_VERSION`]. Pages travel on the page-server's own connections.
//!
//! ```text
//! source                                   destination (vmm --incoming)
//!   Offer{config, cpuid, msrs, caps, page-server}  ->
//!                                          checks compatibility, builds the VM shell, maps and
//!                                          registers RAM with userfaultfd, connects the pager
//!                                   <-     Accept | Refuse{reason}
//!   Ping{t} (x N)                   ->
//!                                   <-     Pong{t, t_dest}        (clock offset, RTT)
//!   pause vCPUs, save state
//!   State{snapshot, paused_at}      ->
//!                                          applies it, resumes vCPUs, starts the stream
//!                                   <-     Resumed{running_at} | Failed{reason} (source resumes)
//!                                   <-     Progress{present, total} (every 250 ms)
//!                                   <-     Complete{report}
//!   stops serving, frees RAM, exits 0
//! ```
//!
//! Incompatibilities are refused before the source pauses; a destination that fails before its
//! vCPUs run says `Failed` and the source resumes its VM, so no VM is lost and two copies never
//! run.

pub mod incoming;
pub mod outgoing;

use std::io::Write;
use std::time::Duration;

use kvm_bindings::kvm_cpuid_entry2;
use proto::{read_frame, Message, HEADER_LEN, MAX_PAYLOAD_BYTES};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use transport::Sock;

use crate::state::MachineConfig;

/// Version of the migration conversation (bumped on any change to [`Wire`]).
pub const MIGRATION_VERSION: u32 = 5;

/// How a migration moves memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pause at once; every page follows after the destination resumed.
    Postcopy,
    /// Pre-copy passes while the VM runs (KVM dirty logging), then post-copy for the pages
    /// still dirty.
    Hybrid,
    /// Pre-copy passes, then the pages still dirty are copied while the VM is paused; the
    /// destination resumes with every page present (no post-copy).
    Precopy,
}

/// Default of [`Plan::recover_timeout`].
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the caller asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The mode, or the name of one this vmm does not have.
    pub mode: Result<Mode, String>,
    /// Hybrid: at most this many pre-copy passes.
    pub max_passes: u32,
    /// Hybrid: switch over once a pass leaves at most this many dirty pages.
    pub threshold_pages: u64,
    /// Pre-copy / hybrid: also switch over once the dirty pages could be sent in this many
    /// milliseconds at the rate the last pass sent.
    pub max_downtime_ms: Option<u64>,
    /// Report the RAM checksum at the pause.
    pub verify: bool,
    /// Dirty-tracking backend by name (None: `kvm`).
    pub dirty_tracking: Option<String>,
    /// Serve the disks to the destination (not shared storage).
    pub copy_disk: bool,
    /// Post-copy: how long the source waits for a silent or broken migration link to come
    /// back (or for the destination's pagers to say they have everything) before it gives up
    /// knowing the outcome (the VM then stays paused here).
    pub recover_timeout: Duration,
}

impl Plan {
    /// From the control request's fields (defaults: postcopy; 16 passes at most, switch at 256
    /// dirty pages).
    pub fn parse(
        mode: Option<&str>,
        max_passes: Option<u32>,
        threshold_pages: Option<u64>,
        max_downtime_ms: Option<u64>,
        verify: bool,
    ) -> Plan {
        let mode = match mode {
            None | Some("postcopy") => Ok(Mode::Postcopy),
            Some("hybrid") => Ok(Mode::Hybrid),
            Some("precopy") => Ok(Mode::Precopy),
            Some(m) => Err(format!("unknown mode {m:?} (postcopy, hybrid, precopy)")),
        };
        Plan {
            mode,
            max_passes: max_passes.unwrap_or(16).max(1),
            threshold_pages: threshold_pages.unwrap_or(256),
            max_downtime_ms,
            verify,
            dirty_tracking: None,
            copy_disk: false,
            recover_timeout: DEFAULT_RECOVER_TIMEOUT,
        }
    }

    /// Whether pages are copied while the VM still runs.
    pub fn precopies(&self) -> bool {
        matches!(self.mode, Ok(Mode::Hybrid | Mode::Precopy))
    }
}

/// How often the destination reports progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// KVM capabilities a destination needs to rebuild the state the source sends.
pub const REQUIRED_CAPS: &[(u32, &str)] = &[
    (kvm_bindings::KVM_CAP_IRQCHIP, "IRQCHIP"),
    (kvm_bindings::KVM_CAP_PIT2, "PIT2"),
    (kvm_bindings::KVM_CAP_USER_MEMORY, "USER_MEMORY"),
    (kvm_bindings::KVM_CAP_IRQFD, "IRQFD"),
    (kvm_bindings::KVM_CAP_XSAVE, "XSAVE"),
    (kvm_bindings::KVM_CAP_XCRS, "XCRS"),
    (kvm_bindings::KVM_CAP_VCPU_EVENTS, "VCPU_EVENTS"),
    (kvm_bindings::KVM_CAP_DEBUGREGS, "DEBUGREGS"),
    (kvm_bindings::KVM_CAP_ADJUST_CLOCK, "ADJUST_CLOCK"),
    (kvm_bindings::KVM_CAP_MP_STATE, "MP_STATE"),
    (kvm_bindings::KVM_CAP_GET_TSC_KHZ, "GET_TSC_KHZ"),
];

/// What the source offers: everything the destination needs to decide, and to build the VM
/// shell, before the source pauses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offer {
    /// The page-server protocol version the source speaks.
    pub proto_version: u16,
    /// Page size of guest RAM.
    pub page_size: u32,
    /// Machine shape (memory layout, vCPUs).
    pub config: MachineConfig,
    /// CPUID the guest runs with (vCPU 0); at most KVM's 256 entries (refused from the
    /// length prefix, before anything is allocated).
    #[serde(deserialize_with = "crate::state::cpuid_capped")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs whose values will be sent.
    pub msrs: Vec<u32>,
    /// Guest TSC frequency.
    pub tsc_khz: u32,
    /// KVM capabilities the state needs.
    pub caps: Vec<u32>,
    /// Where the source's page-server listens (an `Addr` string).
    pub page_server: String,
    /// Pages come while the VM still runs on the source (hybrid, precopy): the destination's
    /// pager takes re-sent pages over older copies until the switch.
    pub precopy: bool,
    /// Precopy: the destination resumes only once every page is present.
    pub copy_before_resume: bool,
    /// The VM's virtio devices: the destination attaches the same disks (shared storage, or
    /// copied) and taps before it accepts.
    pub devices: Vec<crate::virtio::OfferedDevice>,
    /// How long the source waits out a broken link after the switch (its
    /// `--recover-timeout-s`): the destination's pager keeps reconnecting as long, unless
    /// `vmm --incoming --recover-timeout-s` says otherwise.
    pub recover_timeout_ms: u64,
}

/// One message of the migration conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Wire {
    /// Source → destination: the proposal.
    Offer(Offer),
    /// Destination: ready; the VM shell is built and the pager connected.
    Accept {
        /// Time the destination took to get ready.
        prepare_ms: f64,
    },
    /// Destination: refused (incompatible, or could not prepare). The source keeps running.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Source: clock probe.
    Ping {
        /// Source clock (CLOCK_MONOTONIC ns).
        t: u64,
    },
    /// Destination: clock probe answer.
    Pong {
        /// The source's `t`, echoed.
        t: u64,
        /// Destination clock when answering.
        dest: u64,
    },
    /// Source (hybrid): start taking pages now, while the VM still runs here.
    Precopy,
    /// Source: the paused VM's non-memory state (a state envelope, as in a state file).
    State {
        /// The envelope bytes.
        envelope: Vec<u8>,
        /// Source clock when the pause began.
        paused_at: u64,
        /// Hybrid: pages modified after they were last sent (bitmap bytes; empty in
        /// post-copy). The destination drops its copies of them before resuming.
        dirty: Vec<u8>,
        /// Pre-copy: pages sent as `Precopy` in all; the destination waits for that many
        /// before dropping and resuming (no older copy may come after).
        precopy_pages: u64,
    },
    /// Destination: vCPUs running.
    Resumed {
        /// Destination clock when the vCPUs were told to run.
        running_at: u64,
        /// Decoding and applying the state.
        apply_ms: f64,
    },
    /// Destination: failed before its vCPUs ran: the source must resume.
    Failed {
        /// Why.
        reason: String,
    },
    /// Destination: pages present so far.
    Progress {
        /// Present.
        present: u64,
        /// Total.
        total: u64,
    },
    /// Destination: every page present; the source may let go.
    Complete {
        /// The destination's report (JSON).
        report: String,
    },
    /// Source: giving up (before the state was sent).
    Abort {
        /// Why.
        reason: String,
    },
}

/// Migration failed.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// Socket I/O.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent something that is not a valid message.
    #[error("bad message from the peer: {0}")]
    Protocol(String),
    /// The peer runs another migration version.
    #[error("migration protocol version {theirs} (this vmm speaks {MIGRATION_VERSION})")]
    Version {
        /// Theirs.
        theirs: u32,
    },
    /// The destination refused.
    #[error("destination refused the migration: {0}")]
    Refused(String),
    /// The destination failed before running the VM.
    #[error("destination failed before resuming the VM: {0}")]
    DestinationFailed(String),
    /// The VM could not be prepared or rebuilt.
    #[error(transparent)]
    Vm(Box<crate::error::VmError>),
    /// Anything else the migration cannot go on from.
    #[error("{0}")]
    Other(String),
}

impl From<crate::error::VmError> for MigrationError {
    fn from(e: crate::error::VmError) -> Self {
        MigrationError::Vm(Box::new(e))
    }
}

/// CLOCK_MONOTONIC in ns (the clock both sides timestamp with; aligned through Ping/Pong).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The migration connection: framed [`Wire`] messages.
pub struct Link {
    sock: Sock,
    buf: Vec<u8>,
    peer: String,
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
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.sock),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for our own socket.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as i32) };
        n > 0
    }

    /// Whether the peer has closed the link or it failed (a reset, a liveness timeout), without
    /// consuming anything: a peek. None while it is up (with or without data waiting).
    pub fn gone(&self) -> Option<String> {
        let mut b = [0u8; 1];
        // SAFETY: peeking at most one byte into a local buffer, without blocking.
        let r = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match r {
            0 => Some(format!("{} closed the migration link", self.peer)),
            r if r < 0 => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
                    _ => Some(format!("migration link to {}: {e}", self.peer)),
                }
            }
            _ => None,
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

fn name(w: &Wire) -> &'static str {
    match w {
        Wire::Offer(_) => "Offer",
        Wire::Accept { .. } => "Accept",
        Wire::Refuse { .. } => "Refuse",
        Wire::Ping { .. } => "Ping",
        Wire::Pong { .. } => "Pong",
        Wire::Precopy => "Precopy",
        Wire::State { .. } => "State",
        Wire::Resumed { .. } => "Resumed",
        Wire::Failed { .. } => "Failed",
        Wire::Progress { .. } => "Progress",
        Wire::Complete { .. } => "Complete",
        Wire::Abort { .. } => "Abort",
    }
}

/// Encodes one message into a frame.
pub fn encode(w: &Wire) -> Result<Vec<u8>, MigrationError> {
    let mut blob = MIGRATION_VERSION.to_le_bytes().to_vec();
    postcard::to_io(w, &mut blob)
        .map_err(|e| MigrationError::Other(format!("encoding {}: {e}", name(w))))?;
    if blob.len() > MAX_PAYLOAD_BYTES as usize - 64 {
        return Err(MigrationError::Other(format!(
            "{} of {} bytes exceeds the frame cap",
            name(w),
            blob.len()
        )));
    }
    let mut out = Vec::with_capacity(blob.len() + 32);
    Message::State { blob: &blob }.encode(&mut out);
    Ok(out)
}

/// Decodes one frame (exactly) into a message.
pub fn decode(frame: &[u8]) -> Result<Wire, MigrationError> {
    let (msg, used) = Message::decode_frame(frame, crate::memory::PAGE_SIZE)
        .map_err(|e| MigrationError::Protocol(e.to_string()))?;
    if used != frame.len() {
        return Err(MigrationError::Protocol(format!(
            "{} bytes after the frame",
            frame.len() - used
        )));
    }
    let Message::State { blob } = msg else {
        return Err(MigrationError::Protocol(format!(
            "a {:?} frame where a migration message belongs (is the peer a vmm?)",
            msg.kind()
        )));
    };
    let Some((v, rest)) = blob.split_first_chunk::<4>() else {
        return Err(MigrationError::Protocol("empty message".into()));
    };
    let theirs = u32::from_le_bytes(*v);
    if theirs != MIGRATION_VERSION {
        return Err(MigrationError::Version { theirs });
    }
    let (w, left) = postcard::take_from_bytes::<Wire>(rest)
        .map_err(|e| MigrationError::Protocol(format!("message does not decode: {e}")))?;
    if !left.is_empty() {
        return Err(MigrationError::Protocol(format!(
            "{} bytes after the message",
            left.len()
        )));
    }
    Ok(w)
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

/// Feature bits a guest may only use if the host supports them: `(leaf, subleaf, register,
/// mask of bits the VMM itself controls and that are not host features)`.
const FEATURE_WORDS: &[(u32, u32, usize, u32)] = &[
    // leaf 1: ecx minus OSXSAVE (27, mirrors CR4) and the hypervisor bit (31, ours)
    (1, 0, 2, (1 << 27) | (1 << 31)),
    // leaf 1 edx minus HTT (28, set by our topology policy)
    (1, 0, 3, 1 << 28),
    // leaf 7.0: ebx, ecx minus OSPKE (4, mirrors CR4), edx
    (7, 0, 1, 0),
    (7, 0, 2, 1 << 4),
    (7, 0, 3, 0),
    (7, 1, 0, 0),
    // xsave features
    (0xd, 1, 0, 0),
    (0x8000_0001, 0, 2, 0),
    (0x8000_0001, 0, 3, 0),
];

fn reg(e: &kvm_cpuid_entry2, r: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][r]
}

/// CPU features the guest was given that `host` (KVM_GET_SUPPORTED_CPUID here) lacks, as
/// `leaf 0x7.0 ebx bit 5` strings. Empty: the guest can run here.
pub fn missing_cpu_features(guest: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let find = |t: &[kvm_cpuid_entry2], leaf: u32, sub: u32| {
        t.iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0))
            .copied()
    };
    let mut missing = Vec::new();
    for &(leaf, sub, r, ignore) in FEATURE_WORDS {
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        let h = find(host, leaf, sub).map_or(0, |h| reg(&h, r));
        let lacking = reg(&g, r) & !h & !ignore;
        for bit in 0..32 {
            if lacking & (1 << bit) != 0 {
                missing.push(format!(
                    "CPUID leaf {leaf:#x}.{sub} {} bit {bit}",
                    ["eax", "ebx", "ecx", "edx"][r]
                ));
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 1,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn messages_round_trip_and_bad_frames_are_named() {
        let w = Wire::Pong { t: 5, dest: 9 };
        let f = encode(&w).unwrap();
        assert!(matches!(decode(&f).unwrap(), Wire::Pong { t: 5, dest: 9 }));
        // truncated
        let e = decode(&f[..f.len() - 1]).unwrap_err();
        assert!(matches!(e, MigrationError::Protocol(_)), "{e}");
        // trailing bytes
        let mut g = f.clone();
        g.push(0);
        assert!(decode(&g)
            .unwrap_err()
            .to_string()
            .contains("after the frame"));
        // garbage
        assert!(decode(b"GET / HTTP/1.1\r\n\r\n").is_err());
        // a valid frame of another kind
        let e = decode(&Message::Done.to_vec()).unwrap_err();
        assert!(e.to_string().contains("is the peer a vmm"), "{e}");
        // another version
        let mut blob = 99u32.to_le_bytes().to_vec();
        blob.extend(postcard::to_stdvec(&w).unwrap());
        let mut v = Vec::new();
        Message::State { blob: &blob }.encode(&mut v);
        assert!(matches!(
            decode(&v).unwrap_err(),
            MigrationError::Version { theirs: 99 }
        ));
        // a version-1 blob that is not a message
        let mut blob = MIGRATION_VERSION.to_le_bytes().to_vec();
        blob.extend([0xff; 8]);
        let mut v = Vec::new();
        Message::State { blob: &blob }.encode(&mut v);
        assert!(decode(&v).unwrap_err().to_string().contains("decode"));
    }

    #[test]
    fn bulk_buffers_follow_the_round_trip() {
        assert_eq!(bulk_buffer_for(None), 512 << 10);
        assert_eq!(bulk_buffer_for(Some(Duration::from_micros(50))), 512 << 10);
        let ms = bulk_buffer_for(Some(Duration::from_millis(1)));
        assert_eq!(ms, 2_500_000);
        assert_eq!(bulk_buffer_for(Some(Duration::from_millis(50))), 4 << 20);
    }

    #[test]
    fn cpu_features_the_host_lacks_are_named() {
        let host = vec![entry(1, 0, 0b0110 | (1 << 31)), entry(7, 0, 0)];
        let same = vec![entry(1, 0, 0b0110)];
        assert!(missing_cpu_features(&same, &host).is_empty());
        // OSXSAVE and the hypervisor bit are not host features
        let os = vec![entry(1, 0, (1 << 27) | (1 << 31))];
        assert!(missing_cpu_features(&os, &host).is_empty());
        let more = vec![entry(1, 0, 0b1110), entry(7, 0, 1 << 3)];
        assert_eq!(
            missing_cpu_features(&more, &host),
            vec![
                "CPUID leaf 0x1.0 ecx bit 3".to_owned(),
                "CPUID leaf 0x7.0 ecx bit 3".to_owned()
            ]
        );
    }
}
