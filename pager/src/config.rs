//! Pager tunables.

use std::time::Duration;

/// The longest pause between two reconnect attempts (the back-off doubles from 50 ms to this).
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Pager tunables.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// Run the background stream (off: pure demand paging).
    pub stream: bool,
    /// Open the stream's connections (or, for a local image, its thread) but send no page
    /// until [`crate::Pager::start_stream`]; faults are served meanwhile. Ignored without `stream`.
    pub stream_deferred: bool,
    /// Pre-copy: the source's memory still changes while pages arrive (a running VM being
    /// migrated), and the region is not used yet. Stream pages marked `Precopy` overwrite a
    /// page already present; the pager never completes until [`crate::Pager::end_precopy`] says which
    /// pages changed since they were sent. Needs one bulk connection (pages sent again must
    /// arrive after their older copies).
    pub precopy: bool,
    /// Bulk connections for the stream (remote only).
    pub bulk_connections: usize,
    /// Smallest prefetch window (pages requested per fault).
    pub prefetch_min_pages: u32,
    /// Largest prefetch window, reached while faults walk memory sequentially.
    pub prefetch_max_pages: u32,
    /// How long to keep trying to reach a lost source before failing.
    pub reconnect_timeout: Duration,
    /// Connect timeout of the first connection (and its handshake).
    pub connect_timeout: Duration,
    /// Each reconnect attempt (connect + handshake, per connection) gives up after this long,
    /// or after 4 round trips of the first connection plus 50 ms if that is longer, and the
    /// next starts: short, so that a link that comes back is found within about this long
    /// plus the back-off (at most [`RECONNECT_BACKOFF_MAX`]), not after TCP's own SYN
    /// back-off (1, 2, 4 ... s).
    pub reconnect_attempt_timeout: Duration,
    /// A source whose host stops answering (cut link, lost host) is declared lost after this
    /// long without acknowledgements (TCP keepalive + TCP_USER_TIMEOUT on every connection);
    /// then the pager reconnects on its own. Zero: the kernel's defaults (~15 minutes).
    pub liveness_timeout: Duration,
    /// No page arrives for this long while faults wait on them, although the connections are
    /// up (a source that is stopped, wedged or stalls mid-frame): the source is treated as
    /// lost and the pager reconnects. Zero: never.
    pub stall_timeout: Duration,
    /// Busy-poll for a fault reply this long before sleeping in poll(2). Zero by default: on a
    /// shared CPU, spinning keeps the CPU from the thread that would answer.
    pub reply_spin: Duration,
    /// Pin the fault thread to this CPU (put it next to the threads that fault, e.g. the
    /// vCPUs: a wake-up on the same CPU costs a few µs, across CPUs tens) and keep the
    /// streamers off it.
    pub fault_cpu: Option<usize>,
    /// Page size in bytes.
    pub page_size: u32,
    /// Socket buffer size of each bulk connection (see
    /// [`transport::DEFAULT_BULK_BUFFER_BYTES`]): bounds how long a fault on a page already
    /// streamed, still queued, waits.
    pub bulk_buffer_bytes: usize,
    /// How the pager authenticates the source (and itself) and encrypts every channel. The
    /// default refuses to connect: choose credentials (or, explicitly, plaintext).
    pub security: transport::Security,
    /// Once every page is present, keep the control connection and say nothing until
    /// [`crate::Pager::release_done`]: for an owner that must make the pages safe first (a
    /// disk copy-in syncs its image), so that the source never lets go of data that exists
    /// nowhere else yet.
    pub hold_done: bool,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            stream: true,
            stream_deferred: false,
            precopy: false,
            bulk_connections: 2,
            prefetch_min_pages: 1,
            prefetch_max_pages: 64,
            reconnect_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            reconnect_attempt_timeout: Duration::from_millis(250),
            liveness_timeout: transport::DEFAULT_LIVENESS_TIMEOUT,
            stall_timeout: Duration::from_secs(30),
            reply_spin: Duration::ZERO,
            fault_cpu: None,
            page_size: 4096,
            bulk_buffer_bytes: transport::DEFAULT_BULK_BUFFER_BYTES,
            security: transport::Security::default(),
            hold_done: false,
        }
    }
}
