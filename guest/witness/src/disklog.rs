//! The disk log: fixed-size, checksummed records appended to a file on the guest's virtio disk,
//! each made durable (`fdatasync`) before the next. Verifying drops the page cache first, so the
//! records are read back from the disk (after a migration: from the destination's backend), and
//! finds a record that is missing, torn, out of place or from another run, and a log shorter than
//! what was synced.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Bytes per record (63 characters and a newline).
const REC: usize = 64;
/// Most `WITNESS DISK BAD` lines printed.
const MAX_REPORTS: u64 = 10;

/// The log and what was made durable so far.
pub struct DiskLog {
    path: String,
    run: u64,
    /// The file and the number of records written; held while a record is written and synced,
    /// and while the log is verified.
    file: Mutex<(File, u64)>,
    /// Records known durable (their `fdatasync` returned).
    pub synced: AtomicU64,
    /// Write or sync errors.
    pub errors: AtomicU64,
    /// CLOCK_MONOTONIC ns of the last record synced.
    last_sync_ns: AtomicU64,
}

/// What a verification found.
pub struct LogCheck {
    pub records: u64,
    pub synced: u64,
    pub bad: u64,
}

impl LogCheck {
    pub fn ok(&self) -> bool {
        self.bad == 0 && self.records >= self.synced
    }
}

fn record(run: u64, seq: u64) -> [u8; REC] {
    let sum = crate::mix::mix(run ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let text = format!("WL {run:016x} {seq:016x} {sum:016x}");
    let mut r = [b' '; REC];
    r[..text.len()].copy_from_slice(text.as_bytes());
    r[REC - 1] = b'\n';
    r
}

impl DiskLog {
    /// Creates (truncates) the log at `path`.
    pub fn create(path: &str, run: u64) -> std::io::Result<DiskLog> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(DiskLog {
            path: path.to_owned(),
            run,
            file: Mutex::new((file, 0)),
            synced: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_sync_ns: AtomicU64::new(crate::clock::clock(libc::CLOCK_MONOTONIC)),
        })
    }

    /// Appends one record and syncs it.
    fn append(&self) {
        let mut g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let seq = g.1;
        let r = record(self.run, seq);
        let res =
            g.0.write_all_at(&r, seq * REC as u64)
                .and_then(|()| g.0.sync_data());
        match res {
            Ok(()) => {
                g.1 += 1;
                self.synced.store(g.1, Ordering::Release);
                self.last_sync_ns.store(
                    crate::clock::clock(libc::CLOCK_MONOTONIC),
                    Ordering::Relaxed,
                );
            }
            Err(e) => {
                if self.errors.fetch_add(1, Ordering::Relaxed) < MAX_REPORTS {
                    println!("WITNESS DISK ERROR seq={seq} {e}");
                }
            }
        }
    }

    /// Appends a record every `period`, for ever.
    pub fn run(&self, period: Duration) {
        loop {
            self.append();
            std::thread::sleep(period);
        }
    }

    /// Reads the whole log back from the disk (page cache dropped) and checks every record.
    pub fn verify(&self) -> LogCheck {
        let g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let synced = self.synced.load(Ordering::Acquire);
        // Clean page-cache pages are dropped so that the reads below go to the disk; the
        // witness runs as init's child, as root. Failing that, the check still reads the file.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
        let mut bad = 0u64;
        let mut report = |what: String| {
            if bad < MAX_REPORTS {
                println!("WITNESS DISK BAD {what}");
            }
            bad += 1;
        };
        let data = match File::open(&self.path).and_then(|mut f| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut v).map(|_| v)
        }) {
            Ok(d) => d,
            Err(e) => {
                report(format!("cannot read {}: {e}", self.path));
                return LogCheck {
                    records: 0,
                    synced,
                    bad,
                };
            }
        };
        if data.len() % REC != 0 {
            report(format!("torn tail: {} bytes", data.len()));
        }
        let records = (data.len() / REC) as u64;
        for (seq, got) in data.chunks_exact(REC).enumerate() {
            if got != record(self.run, seq as u64) {
                let text = String::from_utf8_lossy(&got[..REC - 1]).into_owned();
                report(format!("record={seq} holds {:?}", text.trim_end()));
            }
        }
        if records < synced {
            report(format!(
                "{records} records on the disk, {synced} were synced"
            ));
        }
        if records != g.1 {
            report(format!("{records} records on the disk, {} written", g.1));
        }
        // the log must still be going: a disk that stopped completing writes (after a
        // migration, say) leaves the writer stuck in its sync
        let idle_ms = crate::clock::clock(libc::CLOCK_MONOTONIC)
            .saturating_sub(self.last_sync_ns.load(Ordering::Relaxed))
            / 1_000_000;
        if idle_ms > 10_000 {
            report(format!("no record synced for {idle_ms} ms"));
        }
        LogCheck {
            records,
            synced,
            bad,
        }
    }
}
