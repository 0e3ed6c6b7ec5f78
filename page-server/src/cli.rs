//! The `page-server` command line. Lives in the library so test fixtures can run the very same
//! program as a separate process.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use log::info;

use transport::{Addr, FileImage};

use crate::{serve, ServerConfig};

/// Serve the pages of a raw memory image to post-copy pagers.
///
/// Clients (a destination VMM's pager, or `pager` users) connect with a control connection, an
/// urgent connection for fault requests and bulk connections for the background stream. The
/// server runs until SIGINT or SIGTERM. Exit codes: 0 after a clean stop, 1 on any error
/// (cannot open the image, cannot listen).
#[derive(Debug, Parser)]
#[command(name = "page-server", version)]
pub struct Args {
    /// Raw memory image to serve (mapped read-only; its size must be a multiple of the page size).
    #[arg(long, value_name = "IMAGE")]
    pub serve: PathBuf,
    /// Where to listen: HOST:PORT for TCP (port 0 = any free port), or a path for a Unix socket.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Page size in bytes.
    #[arg(long, default_value_t = 4096)]
    pub page_size: u32,
    /// Pages a bulk connection sends per round.
    #[arg(long, default_value_t = 256)]
    pub stream_chunk_pages: u32,
    /// Pin the thread that answers faults to this CPU, and keep the stream's threads off it.
    #[arg(long, value_name = "CPU")]
    pub urgent_cpu: Option<usize>,
    /// Print the listening address on stdout as `listening ADDR` once ready (for scripts).
    #[arg(long)]
    pub print_addr: bool,
    /// How clients are authenticated and their connections encrypted.
    #[command(flatten, next_help_heading = "Security")]
    pub security: SecurityArgs,
}

/// How a program's connections are authenticated and encrypted (the same flags on every
/// program of the project that connects or listens). One of the pre-shared key, the
/// certificate set, or `--insecure` must be given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// Pre-shared key file (mode 0600, at least 32 characters; make one with `vmm tls psk
    /// FILE`): every peer holding the same key is accepted, nobody else. TLS 1.3.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_ca", "insecure"])]
    pub tls_psk_file: Option<PathBuf>,
    /// CA certificate (PEM) that signs every node's certificate (make a CA and node
    /// certificates with `vmm tls certs`). Needs --tls-cert, --tls-key and --tls-peer.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key", "tls_peer"], conflicts_with = "insecure")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by --tls-ca.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM, mode 0600).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// An identity (DNS name in the certificate) of a peer to accept (repeatable, or a comma
    /// list); a certificate of the CA with another name is refused.
    #[arg(long, value_name = "NAME", value_delimiter = ',', requires = "tls_ca")]
    pub tls_peer: Vec<String>,
    /// Plaintext: no authentication, no encryption. Anyone who can reach the sockets can read
    /// guest memory and steer the migration. For tests of the wire format and closed labs only.
    #[arg(long)]
    pub insecure: bool,
}

impl SecurityArgs {
    /// The configuration these flags give; an error when none was chosen.
    pub fn security(&self) -> anyhow::Result<transport::Security> {
        match self.chosen()? {
            Some(s) => Ok(s),
            None => anyhow::bail!(
                "no credentials: give --tls-psk-file FILE (make one with `vmm tls psk FILE`), or --tls-ca, --tls-cert, --tls-key and --tls-peer (make them with `vmm tls certs`), or --insecure for plaintext"
            ),
        }
    }

    /// The configuration these flags give, None when none was chosen (a program that may
    /// never connect: a migration it is later asked for is refused with the reason).
    pub fn chosen(&self) -> anyhow::Result<Option<transport::Security>> {
        use transport::Security;
        if self.insecure {
            log::warn!(
                "--insecure: connections are PLAINTEXT, with no authentication: anyone who can reach them can read guest memory and steer the migration"
            );
            return Ok(Some(Security::Insecure));
        }
        if let Some(f) = &self.tls_psk_file {
            return Ok(Some(Security::psk_file(f)?));
        }
        if let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            return Ok(Some(Security::certificates(ca, cert, key, &self.tls_peer)?));
        }
        Ok(None)
    }
}

/// Makes a closed stdout (`prog | head`) end the process quietly with status 141 (128 +
/// SIGPIPE, what a shell reports for a program killed by the pipe) instead of the panic that
/// `println!` raises on EPIPE. SIGPIPE itself stays ignored, so a socket write to a vanished peer
/// is still an error the code handles, not a silent death. Every binary of the project calls
/// this first.
pub fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info)
    }));
}

/// Runs the program; returns the process exit code.
pub fn main() -> i32 {
    exit_quietly_on_broken_pipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("page-server: error: {e:#}");
            1
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let addr: Addr = args
        .listen
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))
        .context("bad --listen")?;
    // handlers first: a signal that arrives once we say we listen must stop us cleanly
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .context("cannot install signal handlers")?;
    let security = args.security.security()?;
    let image = FileImage::open(&args.serve, args.page_size)?;
    let bytes = image.bytes().len();
    let config = ServerConfig {
        stream_chunk_pages: args.stream_chunk_pages.clamp(1, proto::MAX_PAGES_PER_FRAME),
        urgent_cpu: args.urgent_cpu,
        security: security.clone(),
        ..ServerConfig::default()
    };
    let handle = serve(Arc::new(image), &addr, config)?;
    info!(
        "serving {} ({} MiB) on {}; {}",
        args.serve.display(),
        bytes >> 20,
        handle.addr(),
        security.describe()
    );
    if args.print_addr {
        println!("listening {}", handle.addr());
    }
    let stop = handle.stopper();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            info!("signal {sig}: stopping");
            stop();
        }
    });
    handle.join()?;
    info!("stopped");
    Ok(())
}
