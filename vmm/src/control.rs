//! The control socket: JSON lines over a Unix socket (mode 0600, peers of
//! another user refused), one request and one reply per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`,
//! `{"cmd":"snapshot","state":PATH,"memory":PATH}`, `{"cmd":"shutdown"}`,
//! `{"cmd":"serial_input","data":TEXT}`, `{"cmd":"checksum"}`,
//! `{"cmd":"migrate","to":ADDR}`, `{"cmd":"dirty_rate","ms":N}`.
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":{"kind":K,"message":M}}`. A long request
//! (`migrate`) first sends any number of progress lines, `{"ok":true,"progress":true,...}`, then
//! its final reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// Longest request line.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// State, shape, timings.
    Status,
    /// Stop every vCPU.
    Pause,
    /// Run every vCPU.
    Resume,
    /// Pause and write state + memory.
    Snapshot {
        /// State file.
        state: PathBuf,
        /// Memory file.
        memory: PathBuf,
    },
    /// End the VM.
    Shutdown,
    /// Bytes for the guest's serial input.
    SerialInput {
        /// The bytes (UTF-8 text).
        data: String,
    },
    /// Checksum of guest RAM (meaningful while paused).
    Checksum,
    /// End the pre-copy passes of a running hybrid migration now and switch over.
    MigrateSwitchover,
    /// Write bytes into guest memory on the VMM's behalf, as a device's DMA would (a debugging
    /// and test hook; the pages count as dirty for migration).
    WriteMemory {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes, hex.
        hex: String,
    },
    /// Read guest memory (at most 64 KiB).
    ReadMemory {
        /// Guest-physical address.
        gpa: u64,
        /// Bytes.
        len: usize,
    },
    /// Measure how fast the guest dirties its memory: dirty logging on for `ms` milliseconds
    /// (10 to 10 000; the controller answers nothing else meanwhile).
    DirtyRate {
        /// How long to measure.
        #[serde(default = "default_dirty_rate_ms")]
        ms: u64,
        /// `kvm` (default) or `uffd-wp-async`.
        #[serde(default)]
        backend: Option<String>,
    },
    /// Live-migrate the VM to a `vmm --incoming` at `to`; replies with progress lines, then
    /// the report. On success the source VMM exits 0 after its final reply.
    Migrate {
        /// Destination: `host:port`, `tcp:host:port` or a Unix socket path.
        to: String,
        /// `postcopy` (the default), `hybrid` (pre-copy passes while the VM runs, then
        /// post-copy for the rest) or `precopy` (pre-copy passes, then the rest copied while
        /// paused).
        #[serde(default)]
        mode: Option<String>,
        /// Hybrid: at most this many pre-copy passes.
        #[serde(default)]
        max_passes: Option<u32>,
        /// Hybrid: switch over once a pass leaves at most this many dirty pages.
        #[serde(default)]
        threshold_pages: Option<u64>,
        /// Hybrid / precopy: also switch over once the dirty pages could be sent in this many
        /// milliseconds at the last pass's rate.
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// Hybrid / precopy: `kvm` (default) or `uffd-wp-async`.
        #[serde(default)]
        dirty_tracking: Option<String>,
        /// Add the checksum of guest RAM as it was at the pause to the report (computed after
        /// the destination has every page, so it costs no downtime).
        #[serde(default)]
        verify: bool,
        /// Move the disks too (they are not on storage both hosts share).
        #[serde(default)]
        copy_disk: bool,
        /// Post-copy: seconds to wait out a silent or broken link to the destination.
        #[serde(default)]
        recover_timeout_s: Option<u64>,
    },
}

fn default_dirty_rate_ms() -> u64 {
    1000
}

/// A structured error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-matchable kind (`bad_request`, `state`, `memory`, `busy`, `internal`).
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

/// A reply: `ok` plus fields, or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Success.
    pub ok: bool,
    /// On failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorReply>,
    /// Fields of a successful reply.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, Value>,
}

impl Reply {
    /// Success with `fields` (a JSON object).
    pub fn ok(fields: Value) -> Reply {
        Reply {
            ok: true,
            error: None,
            fields: match fields {
                Value::Object(m) => m,
                _ => serde_json::Map::new(),
            },
        }
    }

    /// An intermediate progress line of a long request.
    pub fn progress(fields: Value) -> Reply {
        let mut r = Reply::ok(fields);
        r.fields.insert("progress".into(), Value::Bool(true));
        r
    }

    /// Whether this is a progress line (more replies follow).
    pub fn is_progress(&self) -> bool {
        self.fields.get("progress") == Some(&Value::Bool(true))
    }

    /// Failure.
    pub fn err(kind: &str, message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(ErrorReply {
                kind: kind.to_owned(),
                message: message.into(),
            }),
            fields: serde_json::Map::new(),
        }
    }
}

/// A request from a connection, with where to send its reply (progress lines first, for a long
/// request, then exactly one final reply).
pub type Incoming = (Request, Sender<Reply>);

/// Requests handed to the VM whose final reply is not written yet.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Waits (up to `timeout`) until every request handed to the VM had its final reply written:
/// call before the process exits after answering (e.g. the source of a migration).
pub fn drain(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while IN_FLIGHT.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The control socket failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Binding or securing the socket.
    #[error("control socket {path}: {what}")]
    Socket {
        /// The path.
        path: String,
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process serves this path.
    #[error("control socket {path} is in use by another process")]
    InUse {
        /// The path.
        path: String,
    },
    /// Talking to a VMM.
    #[error("talking to {path}")]
    Client {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM's reply was not valid.
    #[error("bad reply from {path}: {reply:?}")]
    BadReply {
        /// The path.
        path: String,
        /// What came back.
        reply: String,
    },
}

/// Binds the control socket (0600) and serves it on a thread, handing each
/// request to `to_vm` (which `forward` wraps into the VM's event type).
pub fn serve<E: Send + 'static>(
    path: &Path,
    to_vm: Sender<E>,
    forward: fn(Incoming) -> E,
) -> Result<(), ControlError> {
    let p = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse { path: p });
        }
        let _ = std::fs::remove_file(path);
    }
    let sock_err = |what, source| ControlError::Socket {
        path: p.clone(),
        what,
        source,
    };
    // Bound and listening under a temporary name, made 0600, then renamed into place: the path
    // appears only once it is private and accepts connections (a client that saw the file
    // between bind and listen was refused).
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| sock_err("bind", e))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| sock_err("chmod 0600", e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| sock_err("rename into place", e)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let tx = to_vm.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || connection(conn, tx, forward));
            }
        })
        .map_err(|e| sock_err("spawn thread", e))?;
    Ok(())
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn connection<E>(conn: UnixStream, to_vm: Sender<E>, forward: fn(Incoming) -> E) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    match peer_uid(&conn) {
        Some(uid) if uid == me || uid == 0 => {}
        other => {
            log::warn!("control socket: refused peer uid {other:?}");
            let _ = write_reply(&mut out, &Reply::err("denied", "peer is another user"));
            return;
        }
    }
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST_BYTES {
            let _ = write_reply(
                &mut out,
                &Reply::err(
                    "bad_request",
                    format!("request longer than {MAX_REQUEST_BYTES} bytes"),
                ),
            );
            return;
        }
        let req = match parse_request(&line) {
            Err(e) => {
                let r = Reply::err("bad_request", format!("cannot parse request: {e}"));
                if write_reply(&mut out, &r).is_err() {
                    return;
                }
                continue;
            }
            Ok(req) => req,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        let _guard = InFlight;
        if to_vm.send(forward((req, tx))).is_err() {
            let _ = write_reply(&mut out, &Reply::err("internal", "the VM is gone"));
            return;
        }
        loop {
            let reply = rx
                .recv_timeout(Duration::from_secs(600))
                .unwrap_or_else(|_| Reply::err("internal", "no reply from the VM"));
            if write_reply(&mut out, &reply).is_err() {
                return;
            }
            if !reply.is_progress() {
                break;
            }
        }
    }
}

/// Parses one request line as the control socket receives it (JSON; a trailing newline may be
/// left on). The fuzz target `control` feeds it arbitrary bytes.
pub fn parse_request(line: &[u8]) -> Result<Request, serde_json::Error> {
    serde_json::from_slice(line)
}

/// Counts a request in [`IN_FLIGHT`] until its connection handler is done with it.
struct InFlight;

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

fn write_reply(out: &mut UnixStream, r: &Reply) -> std::io::Result<()> {
    let mut s = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    s.push(b'\n');
    out.write_all(&s)
}

use std::io::Read;

/// Sends one request to the VMM at `path` and returns its reply.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ControlError> {
    request_with_progress(path, req, timeout, |_| {})
}

/// Like [`request`], handing each progress line to `progress`; `timeout` bounds the wait for
/// each line.
pub fn request_with_progress(
    path: &Path,
    req: &Request,
    timeout: Duration,
    mut progress: impl FnMut(&Reply),
) -> Result<Reply, ControlError> {
    let p = path.display().to_string();
    let cerr = |source| ControlError::Client {
        path: p.clone(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(cerr)?;
    s.set_read_timeout(Some(timeout)).map_err(cerr)?;
    let mut line = serde_json::to_vec(req).map_err(|e| cerr(std::io::Error::other(e)))?;
    line.push(b'\n');
    if let Err(e) = s.write_all(&line) {
        // A VMM that refuses a peer (another user) replies and closes without reading: its
        // refusal may already wait in the socket, and it says more than the broken pipe.
        if !matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ) {
            return Err(cerr(e));
        }
    }
    let mut r = BufReader::new(s);
    loop {
        let mut reply = String::new();
        let n = r.read_line(&mut reply).map_err(cerr)?;
        if n == 0 {
            return Err(cerr(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the VMM closed the connection without a final reply",
            )));
        }
        let reply: Reply = serde_json::from_str(&reply).map_err(|_| ControlError::BadReply {
            path: p.clone(),
            reply: reply.trim().to_owned(),
        })?;
        if !reply.is_progress() {
            return Ok(reply);
        }
        progress(&reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_ones_are_refused() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"snapshot","state":"/a","memory":"/b"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                state: "/a".into(),
                memory: "/b".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"snapshot","state":"/a"}"#).is_err());
        let e = serde_json::to_string(&Reply::err("busy", "no")).unwrap();
        assert_eq!(e, r#"{"ok":false,"error":{"kind":"busy","message":"no"}}"#);
    }
}
