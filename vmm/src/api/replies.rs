//! The body of every reply, one type per request (`docs/api.md` has the table). Each serializes
//! to the fields of the reply object, beside `ok`. Optional figures that a reply always carries
//! (as `null` when unknown) are plain `Option`s; fields that appear only in some replies are
//! skipped when absent.

use serde::{Deserialize, Serialize};

/// `status` of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// [`super::VERSION`].
    pub api_version: u32,
    /// `running`, `paused`, `migrating`, `migrating (paused here)`, `source_lost (...)`, or
    /// `paused after a migration of unknown outcome`.
    pub state: String,
    /// This VM arrived by migration and the link to its source is still open.
    pub incoming_migration_open: bool,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// What was booted.
    pub boot: String,
    /// Since the VM was created.
    pub uptime_ms: u64,
    /// From process start to the vCPUs running.
    pub running_after_start_ms: f64,
    /// Restore: loading the state file.
    pub state_load_ms: f64,
    /// Restore: loading the memory file (0 when lazy).
    pub memory_load_ms: f64,
    /// Memory comes in through a pager.
    pub lazy: bool,
    /// Pages present (lazy).
    pub pages_present: u64,
    /// Pages in all (lazy; 0 otherwise).
    pub pages_total: u64,
    /// When every page was present (lazy).
    pub memory_complete_ms: Option<f64>,
    /// The pager's figures (lazy).
    pub pager: Option<pager::Report>,
    /// One entry per virtio slot.
    pub devices: Vec<DeviceStatus>,
    /// The memory source is gone for good (the VM stays paused).
    pub source_lost: Option<SourceLost>,
}

/// Why and since when a VM has lost its memory source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceLost {
    /// What happened.
    pub reason: String,
    /// Since then.
    pub since_ms: u64,
    /// Pages that never came.
    pub pages_missing: u64,
}

/// `status` of a `vmm --incoming` still waiting for its migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingStatus {
    /// [`super::VERSION`].
    pub api_version: u32,
    /// `incoming`.
    pub state: String,
    /// The address it listens on.
    pub listening: String,
    /// Migrations tried so far.
    pub attempts: u32,
    /// Why the last one failed.
    pub last_error: Option<String>,
}

/// One virtio slot in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// MMIO slot.
    pub slot: u32,
    /// What it is (e.g. `virtio-blk /path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The driver has set DRIVER_OK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_ok: Option<bool>,
    /// The device could not be looked at (an access was in flight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<String>,
    /// A block device's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockStats>,
    /// A network device's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetStats>,
}

/// A virtio-blk device's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    /// Backing file.
    pub path: std::path::PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// A virtio-net device's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Tap device.
    pub tap: String,
    /// Guest MAC, `aa:bb:...`.
    pub mac: String,
    /// Frames to the guest.
    pub rx_frames: u64,
    /// Bytes to the guest.
    pub rx_bytes: u64,
    /// Frames for the guest dropped (no buffer).
    pub rx_dropped: u64,
    /// Frames from the guest.
    pub tx_frames: u64,
    /// Bytes from the guest.
    pub tx_bytes: u64,
    /// Frames from the guest dropped.
    pub tx_dropped: u64,
    /// Announcements (gratuitous ARP) after a migration.
    pub announces: u64,
}

/// `pause`, `resume`, `shutdown`: the state now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateNow {
    /// `paused`, `running` or `shutdown`.
    pub state: String,
}

/// `snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// State file bytes.
    pub state_bytes: u64,
    /// Memory file bytes.
    pub memory_bytes: u64,
    /// Checksum of guest RAM, hex.
    pub ram_checksum: String,
    /// How long it took.
    pub ms: f64,
    /// Always true: the VM stays paused.
    pub paused: bool,
}

/// `dirty_rate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirtyRate {
    /// `kvm` or `uffd-wp-async`.
    pub backend: String,
    /// How long it measured.
    pub ms: f64,
    /// Pages written meanwhile.
    pub dirty_pages: u64,
    /// Pages of guest RAM.
    pub total_pages: u64,
    /// Rate.
    pub pages_per_s: f64,
    /// Rate.
    pub mib_per_s: f64,
    /// The VM was paused.
    pub paused: bool,
}

/// `write_memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// Bytes written.
    pub written: usize,
}

/// `read_memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRead {
    /// The bytes, hex.
    pub hex: String,
}

/// `checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    /// Of all guest RAM, hex.
    pub ram_checksum: String,
    /// The VM was paused (only then are the two below given).
    pub paused: bool,
    /// Without the pages KVM itself rewrites (kvmclock, steal time), hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_checksum_except_kvm: Option<String>,
    /// Those pages' addresses, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_pages: Option<Vec<String>>,
}

/// `serial_input`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    /// Bytes queued for the guest.
    pub queued: usize,
}

/// `migrate_switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// `requested`.
    pub switchover: String,
}

/// A progress line of `migrate` (sent with `"progress":true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Progress {
    /// The destination took the offer.
    Connected,
    /// A pre-copy pass ended.
    Precopy {
        /// Its number, from 1.
        pass: u32,
        /// Pages it sent.
        pages_sent: u64,
        /// Pages written again meanwhile.
        pages_dirtied: u64,
        /// Since the migration began.
        elapsed_ms: f64,
    },
    /// After the switch: how much the destination has.
    Postcopy {
        /// Pages present there.
        pages_present: u64,
        /// Pages in all.
        pages_total: u64,
        /// Of pages present.
        percent: f64,
        /// Since the last progress line.
        mb_per_s: f64,
        /// Since the migration began.
        elapsed_ms: f64,
    },
}

/// The final reply of `migrate`: the source's figures, with the destination's
/// ([`DestinationReport`]) beside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// `postcopy`, `hybrid` or `precopy`.
    pub mode: String,
    /// The destination.
    pub to: String,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Source pause to destination running.
    pub downtime_ms: f64,
    /// Source pause to the destination having every page.
    pub total_ms: f64,
    /// Pause and save on the source.
    pub pause_ms: f64,
    /// Connect to destination ready.
    pub handshake_ms: f64,
    /// The destination's preparation, within the handshake.
    pub prepare_ms: f64,
    /// Applying the state on the destination.
    pub apply_ms: f64,
    /// State bytes sent.
    pub state_bytes: u64,
    /// The migration link's round trip.
    pub rtt_us: f64,
    /// The destination's monotonic clock minus ours.
    pub clock_offset_us: f64,
    /// What the source's page-server sent.
    pub source: page_server::ServerStats,
    /// The pre-copy passes (hybrid, precopy).
    pub precopy: Option<PrecopyReport>,
    /// Page bytes sent.
    pub bytes_sent: u64,
    /// Disk bytes sent (`copy_disk`).
    pub disk_bytes_sent: u64,
    /// Pages sent.
    pub pages_sent: u64,
    /// What recovery there was after the switch.
    pub recovery: Recovery,
    /// `verify`: the checksum of guest RAM at the pause, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ram_checksum: Option<String>,
    /// `verify`: the same without the pages KVM rewrites, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ram_checksum_except_kvm: Option<String>,
    /// The destination's figures.
    #[serde(flatten)]
    pub destination: DestinationReport,
}

/// Recovery after the switch, in a [`MigrationReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// The destination's pagers' sessions beyond the first: their reconnections.
    pub page_server_reconnects: u64,
    /// Why the migration link was lost, if it was.
    pub migration_link_lost: Option<String>,
    /// For how long the source went without it.
    pub without_migration_link_ms: Option<f64>,
}

/// The pre-copy phase, in a [`MigrationReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrecopyReport {
    /// `kvm` or `uffd-wp-async`.
    pub dirty_tracking: String,
    /// Each pass.
    pub passes: Vec<PassReport>,
    /// Why the passes ended.
    pub stop_reason: String,
    /// Pages still dirty at the switch.
    pub pages_dirty_at_switchover: u64,
    /// How long the passes took.
    pub ms: f64,
}

/// One pre-copy pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassReport {
    /// Its number, from 1.
    pub pass: u32,
    /// Pages it sent.
    pub pages_sent: u64,
    /// Pages written again meanwhile.
    pub pages_dirtied: u64,
    /// Their rate.
    pub dirty_rate_pages_s: f64,
    /// How long it took.
    pub ms: f64,
}

/// The destination's figures, as its `Complete` carries them to the source (JSON in the
/// migration wire format) and as they appear, flattened, in a [`MigrationReport`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationReport {
    /// The destination's pager.
    #[serde(flatten)]
    pub pager: Option<pager::Report>,
    /// Disks copied in (`copy_disk`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_copies: Vec<DiskCopy>,
    /// Set when the source learnt the outcome from its page-servers, not from the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
}

/// One disk copied in by a `copy_disk` migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskCopy {
    /// MMIO slot.
    pub slot: u32,
    /// Disk bytes.
    pub bytes: u64,
    /// How long the copy took.
    pub ms: f64,
    /// Of that, writing the local file.
    pub write_back_ms: f64,
    /// The disk's pager.
    pub pager: Option<pager::Report>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_report_without_a_pager_parses_and_keeps_its_shape() {
        let r: DestinationReport =
            serde_json::from_str(r#"{"completion":"learnt from the page-servers"}"#).unwrap();
        assert!(r.pager.is_none());
        assert_eq!(
            r.completion.as_deref(),
            Some("learnt from the page-servers")
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"completion":"learnt from the page-servers"}"#
        );
        let garbage: DestinationReport = serde_json::from_str("{}").unwrap();
        assert_eq!(garbage, DestinationReport::default());
    }

    #[test]
    fn progress_lines_carry_their_phase() {
        let p = Progress::Precopy {
            pass: 2,
            pages_sent: 10,
            pages_dirtied: 3,
            elapsed_ms: 1.5,
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["phase"], "precopy");
        assert_eq!(serde_json::from_value::<Progress>(v).unwrap(), p);
        let c = serde_json::to_string(&Progress::Connected).unwrap();
        assert_eq!(c, r#"{"phase":"connected"}"#);
    }
}
