//! The messages of the migration conversation ([`Wire`], with the source's [`Offer`]) and their
//! encoding: a `proto` State frame holding a 4-byte [`MIGRATION_VERSION`] and a postcard value.

use kvm_bindings::kvm_cpuid_entry2;
use proto::MAX_PAYLOAD_BYTES;
use serde::{Deserialize, Serialize};

use super::error::MigrationError;
use crate::envelope::{self, EnvelopeError};
use crate::state::MachineConfig;

/// Version of the migration conversation (bumped on any change to [`Wire`]).
pub const MIGRATION_VERSION: u32 = 5;

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

pub(super) fn name(w: &Wire) -> &'static str {
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
    envelope::seal(MIGRATION_VERSION, w, MAX_PAYLOAD_BYTES as usize - 64).map_err(|e| match e {
        EnvelopeError::TooLarge { bytes } => MigrationError::Other(format!(
            "{} of {bytes} bytes exceeds the frame cap",
            name(w)
        )),
        EnvelopeError::Encode(e) => MigrationError::Other(format!("encoding {}: {e}", name(w))),
        other => MigrationError::Other(format!("encoding {}: {other}", name(w))),
    })
}

/// Decodes one frame (exactly) into a message.
pub fn decode(frame: &[u8]) -> Result<Wire, MigrationError> {
    envelope::open(frame, MIGRATION_VERSION).map_err(|e| match e {
        EnvelopeError::Frame(e) => MigrationError::Protocol(e.to_string()),
        EnvelopeError::Trailing(n) => {
            MigrationError::Protocol(format!("{n} bytes after the frame"))
        }
        EnvelopeError::NotState(kind) => MigrationError::Protocol(format!(
            "a {kind:?} frame where a migration message belongs (is the peer a vmm?)"
        )),
        EnvelopeError::Empty => MigrationError::Protocol("empty message".into()),
        EnvelopeError::Version { found } => MigrationError::Version {
            theirs: found,
            ours: MIGRATION_VERSION,
        },
        EnvelopeError::Decode(e) => {
            MigrationError::Protocol(format!("message does not decode: {e}"))
        }
        EnvelopeError::Left(n) => MigrationError::Protocol(format!("{n} bytes after the message")),
        other => MigrationError::Protocol(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Message;

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
            MigrationError::Version { theirs: 99, .. }
        ));
        // a version-1 blob that is not a message
        let mut blob = MIGRATION_VERSION.to_le_bytes().to_vec();
        blob.extend([0xff; 8]);
        let mut v = Vec::new();
        Message::State { blob: &blob }.encode(&mut v);
        assert!(decode(&v).unwrap_err().to_string().contains("decode"));
    }
}
