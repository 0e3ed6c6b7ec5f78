//! The server side of the control socket: binds it (0600, in place only once private), refuses
//! peers of another user, reads request lines (each at most [`MAX_REQUEST_BYTES`]) and hands
//! each parsed [`Request`] to the VM with a channel for its replies.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::geteuid;

use super::{parse_request, ControlError, Reply, Request, MAX_REQUEST_BYTES};

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

/// Binds the control socket (0600) and serves it on a thread, handing each
/// request to `to_vm` (which `forward` wraps into the VM's event type).
pub fn serve<E: Send + 'static>(
    path: &Path,
    to_vm: Sender<E>,
    forward: fn(Incoming) -> E,
) -> Result<(), ControlError> {
    let p = path.display().to_string();
    let sock_err = |what, source| ControlError::Socket {
        path: p.clone(),
        what,
        source,
    };
    match transport::clear_stale_socket(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(ControlError::InUse { path: p })
        }
        Err(e) => return Err(sock_err("clear the path", e)),
        Ok(()) => {}
    }
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
    getsockopt(s, sockopt::PeerCredentials)
        .ok()
        .map(|c| c.uid())
}

fn connection<E>(conn: UnixStream, to_vm: Sender<E>, forward: fn(Incoming) -> E) {
    let me = geteuid().as_raw();
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
