//! The control API: JSON lines over a Unix socket (mode 0600, peers of another user refused),
//! one request and one reply per line. Every request is a [`Request`]; every reply is a
//! [`Reply`] envelope around one of the typed bodies of [`replies`]. The server side is
//! [`server`], the client side (`vmm ctl`, tests, benches) is [`client`]; `docs/api.md` lists
//! every request with its reply.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`,
//! `{"cmd":"snapshot","state":PATH,"memory":PATH}`, `{"cmd":"shutdown"}`,
//! `{"cmd":"serial_input","data":TEXT}`, `{"cmd":"checksum"}`,
//! `{"cmd":"migrate","to":ADDR}`, `{"cmd":"dirty_rate","ms":N}`.
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":{"kind":K,"message":M}}`. A long request
//! (`migrate`) first sends any number of progress lines, `{"ok":true,"progress":true,...}`, then
//! its final reply.
//!
//! Versioning ([`VERSION`], reported by `status` as `api_version`): within a version, reply
//! bodies only gain fields (clients ignore fields they do not know); a request with an unknown
//! command or field is refused with `bad_request`. Removing a field, or changing what one
//! means, makes a new version.

use std::path::PathBuf;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

pub mod client;
pub mod replies;
pub mod server;

/// The version of the control API this VMM speaks.
pub const VERSION: u32 = 1;

/// Longest request line.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// Commands without arguments are empty struct variants (`Status {}`), not unit variants: serde
/// lets a unit variant of an internally tagged enum take any extra field, an empty struct
/// variant with `deny_unknown_fields` refuses it.
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// State, shape, timings.
    Status {},
    /// Stop every vCPU.
    Pause {},
    /// Run every vCPU.
    Resume {},
    /// Pause and write state + memory.
    Snapshot {
        /// State file.
        state: PathBuf,
        /// Memory file.
        memory: PathBuf,
    },
    /// End the VM.
    Shutdown {},
    /// Bytes for the guest's serial input.
    SerialInput {
        /// The bytes (UTF-8 text).
        data: String,
    },
    /// Checksum of guest RAM (meaningful while paused).
    Checksum {},
    /// End the pre-copy passes of a running hybrid migration now and switch over.
    MigrateSwitchover {},
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
    /// Success with `body` (one of [`replies`]' types; it serializes to a JSON object).
    pub fn ok(body: &impl Serialize) -> Reply {
        Reply {
            ok: true,
            error: None,
            fields: match serde_json::to_value(body) {
                Ok(Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            },
        }
    }

    /// An intermediate progress line of a long request.
    pub fn progress(p: &replies::Progress) -> Reply {
        let mut r = Reply::ok(p);
        r.fields.insert("progress".into(), Value::Bool(true));
        r
    }

    /// The body of a successful reply as `T`, or the error the VMM replied with.
    pub fn body<T: DeserializeOwned>(&self) -> Result<T, ReplyError> {
        if let Some(e) = &self.error {
            return Err(ReplyError::Refused(e.clone()));
        }
        if !self.ok {
            return Err(ReplyError::Refused(ErrorReply {
                kind: "unknown".into(),
                message: "the reply says not ok, with no error".into(),
            }));
        }
        serde_json::from_value(Value::Object(self.fields.clone())).map_err(ReplyError::Shape)
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
    /// The VMM answered with an error, or not with the body asked for.
    #[error("{path}")]
    Refused {
        /// The path.
        path: String,
        /// What was wrong.
        #[source]
        source: ReplyError,
    },
}

/// A reply that is not the body the caller expected.
#[derive(Debug, Error)]
pub enum ReplyError {
    /// The VMM refused or failed the request.
    #[error("{}: {}", .0.kind, .0.message)]
    Refused(ErrorReply),
    /// The reply's fields do not make the expected body.
    #[error("the reply does not have the expected fields")]
    Shape(#[source] serde_json::Error),
}

/// Parses one request line as the control socket receives it (JSON; a trailing newline may be
/// left on). The fuzz target `control` feeds it arbitrary bytes.
pub fn parse_request(line: &[u8]) -> Result<Request, serde_json::Error> {
    serde_json::from_slice(line)
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
        // an unknown field is refused, on a request with fields and on one without, and the
        // error names it
        let e = parse_request(br#"{"cmd":"checksum","verbose":true}"#).unwrap_err();
        assert!(e.to_string().contains("verbose"), "{e}");
        let e = parse_request(br#"{"cmd":"migrate","to":"h:1","mod":"hybrid"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `mod`"), "{e}");
        assert_eq!(
            serde_json::to_string(&Request::Status {}).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            parse_request(b"{\"cmd\":\"status\"}\n").unwrap(),
            Request::Status {}
        );
        let e = parse_request(br#"{"cmd":"format_disk"}"#).unwrap_err();
        assert!(e.to_string().contains("format_disk"), "{e}");
        let e = serde_json::to_string(&Reply::err("busy", "no")).unwrap();
        assert_eq!(e, r#"{"ok":false,"error":{"kind":"busy","message":"no"}}"#);
    }

    #[test]
    fn typed_bodies_round_trip_through_the_envelope() {
        for p in [
            replies::Progress::Connected,
            replies::Progress::Postcopy {
                pages_present: 5,
                pages_total: 10,
                percent: 50.0,
                mb_per_s: 1.0,
                elapsed_ms: 2.0,
            },
        ] {
            let line = serde_json::to_string(&Reply::progress(&p)).unwrap();
            let back: Reply = serde_json::from_str(&line).unwrap();
            assert!(back.is_progress());
            assert_eq!(back.body::<replies::Progress>().unwrap(), p);
        }
        let now = replies::StateNow {
            state: "paused".into(),
        };
        let line = serde_json::to_string(&Reply::ok(&now)).unwrap();
        assert_eq!(line, r#"{"ok":true,"state":"paused"}"#);
        let back: Reply = serde_json::from_str(&line).unwrap();
        assert_eq!(back.body::<replies::StateNow>().unwrap(), now);
        // a body the reply does not hold, and an error reply, are errors that say so
        assert!(matches!(
            back.body::<replies::Written>(),
            Err(ReplyError::Shape(_))
        ));
        let refused = Reply::err("busy", "no");
        let e = refused.body::<replies::StateNow>().unwrap_err();
        assert_eq!(e.to_string(), "busy: no");
    }
}
