//! How a page-server runs: chunk size, socket buffers, CPU placement, pre-copy, liveness.

use transport::{DEFAULT_BULK_BUFFER_BYTES, DEFAULT_LIVENESS_TIMEOUT};

/// Server tunables.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Pages a bulk thread claims and sends per round (one or a few frames).
    pub stream_chunk_pages: u32,
    /// Socket buffer size of each bulk connection (SO_SNDBUF / SO_RCVBUF). Pages queued here
    /// are already counted as sent: a fault on one waits until the stream delivers it, so this
    /// bounds that wait (and should still cover the link's bandwidth-delay product).
    pub bulk_buffer_bytes: usize,
    /// Pin the event loop (control + urgent traffic) to this CPU and keep bulk threads off it.
    pub urgent_cpu: Option<usize>,
    /// Start in pre-copy: the memory is still being modified (a running VM). The stream sends
    /// its pages as `Origin::Precopy`, pages marked with [`crate::ServerHandle::resend`] go out again,
    /// and the stream does not end until [`crate::ServerHandle::end_precopy`].
    pub precopy: bool,
    /// A TCP client whose host stops answering (a cut link, a lost host) fails after this long
    /// (keepalive + TCP_USER_TIMEOUT, see [`transport::set_liveness`]), so its session's threads end
    /// instead of blocking in the kernel's retransmissions. Zero: the kernel's defaults.
    pub liveness_timeout: std::time::Duration,
    /// How clients are authenticated and their connections encrypted. The default refuses
    /// every client: choose credentials (or, explicitly, plaintext).
    pub security: transport::Security,
    /// Serve only the peer that authenticated with this identity (a migration's page-server:
    /// the destination the migration link authenticated); None: any authenticated peer.
    pub only_peer: Option<String>,
    /// Refuse a Hello that does not name the layout it expects (an empty one): a peer that
    /// does not know what it migrates is served nothing.
    pub require_layout: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            stream_chunk_pages: 256,
            urgent_cpu: None,
            bulk_buffer_bytes: DEFAULT_BULK_BUFFER_BYTES,
            precopy: false,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            security: transport::Security::default(),
            only_peer: None,
            require_layout: false,
        }
    }
}
