//! The client side of the control socket, as `vmm ctl`, the tests and the benches use it: one
//! request, its progress lines, its final reply ([`request_with_progress`]), or a typed body
//! ([`call`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{ControlError, Reply, Request};

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

/// Sends `req` and returns its reply's body as `T` (an error reply becomes
/// [`ControlError::Refused`]).
pub fn call<T: DeserializeOwned>(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<T, ControlError> {
    let reply = request(path, req, timeout)?;
    reply.body().map_err(|source| ControlError::Refused {
        path: path.display().to_string(),
        source,
    })
}
