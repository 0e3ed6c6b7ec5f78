//! The `vmm` command line (a library module so test fixtures run the very same code).
//! Session ids come from `libc::getrandom` (nix has no wrapper for it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::api;
use crate::config::{BootSource, Exit, RestoreConfig, RestoreMemory, RunConfig, SerialOut};
use crate::migration::incoming::{self, IncomingConfig};
use crate::virtio::{blk::BlockConfig, net::NetConfig, DeviceConfig};
use crate::vm::{self, Event, Vm};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use page_server::cli::SecurityArgs;
use pager::PagerConfig;
use transport::Addr;

use parse::{parse_cpu_list, parse_map, parse_size, CpuList};

mod ctl;
mod parse;

/// A KVM VMM with post-copy live migration, snapshot and restore (eager, or lazy through
/// userfaultfd).
///
/// Live migration: start `vmm --incoming tcp:HOST:PORT` on the destination, then
/// `vmm ctl --api-socket SOURCE.sock migrate --to HOST:PORT` on the source.
///
/// Exit codes: 0 the VM ended cleanly (shutdown, guest reset or poweroff) or
/// was migrated away; 1 bad arguments or the VM could not be built / restored
/// / received; 2 a vCPU hit an error KVM cannot go on from; 3 lazy restore or
/// an incoming migration lost its memory source for good (the VM was paused,
/// never run on missing memory).
#[derive(Parser, Debug)]
#[command(name = "vmm", version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Wait for a live migration on this address (`tcp:HOST:PORT`, `HOST:PORT` or a Unix
    /// socket path), then run the migrated VM. The VM's shape comes from the source.
    #[arg(long, value_name = "ADDR")]
    incoming: Option<String>,
    #[command(flatten)]
    incoming_args: IncomingArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Args, Debug)]
struct IncomingArgs {
    /// With --incoming: refuse VMs with more guest memory than this (e.g. 8G). Default: this
    /// host's RAM (MemTotal).
    #[arg(long, value_parser = parse_size, requires = "incoming")]
    max_mem: Option<u64>,
    /// With --incoming: refuse VMs with more vCPUs than this.
    #[arg(long, requires = "incoming")]
    max_vcpus: Option<u32>,
    /// With --incoming: give up if no migration arrived within this many seconds (default:
    /// wait forever).
    #[arg(long, requires = "incoming")]
    wait_timeout_s: Option<u64>,
    /// With --incoming: no background stream, pages come on faults only.
    #[arg(long, requires = "incoming")]
    no_stream: bool,
    /// With --incoming: after the switch, keep reconnecting to a lost or silent source this
    /// many seconds before giving it up (the VM then stays paused, never run on missing
    /// memory; exit 3). Default: as long as the source waits (its `migrate
    /// --recover-timeout-s`, 120 unless set).
    #[arg(long, alias = "reconnect-timeout-s", requires = "incoming")]
    recover_timeout_s: Option<u64>,
    /// With --incoming: leave the migrated VM paused (resume with `vmm ctl resume`); its memory
    /// is still paged in.
    #[arg(long, requires = "incoming")]
    paused: bool,
    /// With --incoming: control socket (answers `status` while waiting).
    #[arg(long, requires = "incoming")]
    api_socket: Option<PathBuf>,
    /// With --incoming: the source's disk FROM is at TO on this host (repeatable; a bare PATH:
    /// at the same path, shared storage). Every disk of an incoming VM needs one: the
    /// destination opens only what its operator names, never a path the peer sends. With
    /// `migrate --copy-disk`, TO is the new local image (it must not exist).
    #[arg(long, value_name = "FROM=TO", requires = "incoming")]
    disk_map: Vec<String>,
    /// With --incoming: attach the source's tap FROM to tap TO here (repeatable; a bare NAME:
    /// the same name). Every NIC of an incoming VM needs one: the destination attaches only
    /// taps its operator names (two VMMs on one host need two taps on the bridge).
    #[arg(long, value_name = "FROM=TO", requires = "incoming")]
    tap_map: Vec<String>,
    /// With --incoming: serial console of the migrated VM, `stdout` or a file.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// With --incoming: run the vCPU threads only on these host CPUs (a list as `taskset -c` takes: `2`, `2,3`,
    /// `2-5`); the VMM's other threads (paging, migration, devices) keep every CPU.
    #[arg(long, requires = "incoming", value_name = "CPUS", value_parser = parse_cpu_list)]
    vcpu_cpus: Option<CpuList>,
    /// How the source is authenticated and everything from it decrypted (required with
    /// --incoming: a pre-shared key, certificates, or --insecure).
    #[command(flatten, next_help_heading = "Security")]
    security: SecurityArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a VM: our embedded test guest by default, a PVH ELF with --guest, or Linux with
    /// --kernel.
    Run(RunArgs),
    /// Resume a VM from a snapshot in this new process.
    Restore(RestoreArgs),
    /// Send one command to a running vmm over its control socket.
    Ctl(ctl::CtlArgs),
    /// Make credentials for migrations: a pre-shared key, or a CA and node certificates.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// Write the embedded guest ELF to a file (e.g. for `qemu -kernel`).
    GuestElf {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TlsCmd {
    /// Write a new random pre-shared key (64 hex digits, mode 0600) to FILE; copy it to every
    /// host that may take part, and pass it as --tls-psk-file FILE on both sides.
    Psk {
        /// The key file to create (an existing one is not overwritten).
        file: PathBuf,
    },
    /// Write a new CA (ca.pem, ca-key.pem) and, for each name, a certificate it signs
    /// (NAME.pem, NAME-key.pem: the name is the node's identity) into DIR. Keys are 0600;
    /// keep ca-key.pem off the migration hosts.
    Certs {
        /// Directory to write into (created if missing; existing files are not overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Node names, e.g. `--names src,dst` (each becomes a DNS name in its certificate).
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
    },
}

fn tls(cmd: TlsCmd) -> Result<ExitCode> {
    match cmd {
        TlsCmd::Psk { file } => {
            transport::tls::make_psk(&file)?;
            println!("wrote {} (mode 0600)", file.display());
        }
        TlsCmd::Certs { dir, names } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for f in transport::tls::make_certificates(&dir, &names)?.files {
                println!("wrote {}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
struct Common {
    /// Control socket (JSON lines, created with mode 0600).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Serial console: `stdout` (stdin is forwarded as input) or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// Run the vCPU threads only on these host CPUs (a list as `taskset -c` takes: `2`, `2,3`,
    /// `2-5`); the VMM's other threads (paging, migration, devices) keep every CPU.
    #[arg(long, value_name = "CPUS", value_parser = parse_cpu_list)]
    vcpu_cpus: Option<CpuList>,
    /// How a migration away from this VM (and a lazy restore's page-server) is authenticated
    /// and encrypted. Without any, a migration is refused with the reason.
    #[command(flatten, next_help_heading = "Security")]
    security: SecurityArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest memory, e.g. 512M, 1G, 4G (split around the PCI hole at 3 GiB).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs (1-16).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// A PVH ELF to boot instead of the embedded guest.
    #[arg(long, conflicts_with = "kernel")]
    guest: Option<PathBuf>,
    /// A Linux bzImage or vmlinux.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Command line. Our guest takes `fill=MIB rate=PAGES/S hot=PERCENT hb=MS` (cpus= is
    /// added), `blk=SECTORS` (its disk workload, default 256) and `ip=A.B.C.D` (its network
    /// responder: ARP, ping, UDP echo on port 7); Linux defaults to
    /// `console=ttyS0 earlyprintk=serial` (virtio-mmio devices are added to it).
    #[arg(long)]
    cmdline: Option<String>,
    /// A virtio-blk disk on a raw image: `PATH[,readonly]` (repeatable). For migration the
    /// image must be on storage both hosts share, at the same path (or moved with
    /// `migrate --copy-disk`).
    #[arg(long, value_name = "PATH[,readonly]")]
    disk: Vec<String>,
    /// A virtio-net NIC on an existing tap: `tap=NAME,mac=MAC` or
    /// `tap=NAME,mac-namespace=OUI` (MAC = the administrator's prefix + a hash of --id).
    /// The tap must exist under the same name on every host the VM migrates to.
    #[arg(long, value_name = "tap=NAME,mac=MAC")]
    net: Vec<String>,
    /// The VM's id (names it in logs; seeds MACs from a mac-namespace). Default: random.
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// State file written by `vmm ctl snapshot`.
    #[arg(long)]
    state: PathBuf,
    /// Memory file: read all of it before resuming (eager restore).
    #[arg(
        long,
        conflicts_with = "memory_from",
        required_unless_present = "memory_from"
    )]
    memory: Option<PathBuf>,
    /// page-server address (host:port, tcp:host:port, or a Unix socket path): resume at once
    /// and page memory in on demand, the rest streamed in the background (lazy restore).
    #[arg(long)]
    memory_from: Option<String>,
    /// Lazy restore: no background stream, faults only.
    #[arg(long)]
    no_stream: bool,
    /// Lazy restore: keep reconnecting to a lost page-server this many seconds before giving
    /// it up (the VM then stays paused, never run on missing memory; exit 3 at shutdown).
    #[arg(long, alias = "recover-timeout-s", default_value_t = 10)]
    reconnect_timeout_s: u64,
    /// Leave the vCPUs paused (resume with `vmm ctl resume`).
    #[arg(long)]
    paused: bool,
    #[command(flatten)]
    common: Common,
}

fn serial(s: &str) -> SerialOut {
    if s == "stdout" {
        SerialOut::Stdout
    } else {
        SerialOut::File(PathBuf::from(s))
    }
}

fn forward_signals(tx: std::sync::mpsc::Sender<Event>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if tx.send(Event::Signal(s)).is_err() {
                    return;
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

fn serve(mut vm: Vm) -> Result<ExitCode> {
    forward_signals(vm.sender())?;
    let exit = vm.run();
    match &exit {
        Exit::Shutdown | Exit::GuestReset => log::info!("VM ended: {exit:?}"),
        Exit::Migrated => {
            log::info!("VM migrated away; guest memory freed");
            api::server::drain(Duration::from_secs(2));
        }
        Exit::Fatal(w) => log::error!("VM stopped: {w}"),
        Exit::SourceLost(w) => {
            log::error!("memory source lost for good: {w}; the VM stays paused and is not run")
        }
    }
    vm.stop();
    Ok(ExitCode::from(exit.code() as u8))
}

fn run(a: RunArgs) -> Result<ExitCode> {
    let boot = match (a.kernel, a.guest) {
        (Some(kernel), _) => BootSource::Linux {
            kernel,
            initrd: a.initrd,
            cmdline: a
                .cmdline
                .unwrap_or_else(|| "console=ttyS0 earlyprintk=serial".into()),
        },
        (None, elf) => BootSource::Guest {
            elf,
            cmdline: a.cmdline.unwrap_or_default(),
        },
    };
    let id = a.id.unwrap_or_else(random_id);
    let mut devices = Vec::new();
    for d in &a.disk {
        devices.push(DeviceConfig::Block(
            BlockConfig::parse(d).map_err(|e| anyhow::anyhow!("--disk {d:?}: {e}"))?,
        ));
    }
    for n in &a.net {
        devices.push(DeviceConfig::Net(
            NetConfig::parse(n, &id).map_err(|e| anyhow::anyhow!("--net {n:?}: {e}"))?,
        ));
    }
    let cfg = RunConfig {
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        devices,
        boot,
        serial: serial(&a.common.serial),
        api_socket: a.common.api_socket,
        security: a.common.security.chosen()?.unwrap_or_default(),
    };
    let vm = Vm::boot(&cfg).context("booting the VM")?;
    serve(vm)
}

/// 16 hex digits from the kernel's random pool.
fn random_id() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom fills the 8-byte buffer it is given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn restore(a: RestoreArgs) -> Result<ExitCode> {
    let security = if a.memory_from.is_some() {
        a.common.security.security()?
    } else {
        a.common.security.chosen()?.unwrap_or_default()
    };
    let memory = match (a.memory, a.memory_from) {
        (Some(f), _) => RestoreMemory::File(f),
        (None, Some(addr)) => {
            let addr: Addr = addr
                .parse()
                .map_err(|e| anyhow::anyhow!("--memory-from {addr:?}: {e}"))?;
            let cfg = PagerConfig {
                stream: !a.no_stream,
                reconnect_timeout: Duration::from_secs(a.reconnect_timeout_s),
                security: security.clone(),
                ..PagerConfig::default()
            };
            RestoreMemory::Remote(addr, cfg)
        }
        (None, None) => bail!("one of --memory or --memory-from is required"),
    };
    let cfg = RestoreConfig {
        state: a.state,
        memory,
        serial: serial(&a.common.serial),
        api_socket: a.common.api_socket,
        paused: a.paused,
        security,
    };
    let vm = Vm::restore(&cfg).context("restoring the VM")?;
    serve(vm)
}

fn incoming(addr: &str, a: IncomingArgs) -> Result<ExitCode> {
    let listen: Addr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("--incoming {addr:?}: {e}"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for s in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(s, stop.clone()).context("installing signal handlers")?;
    }
    let cfg = IncomingConfig {
        listen,
        serial: serial(&a.serial),
        api_socket: a.api_socket,
        max_mem: a.max_mem,
        max_vcpus: a.max_vcpus,
        pager: PagerConfig {
            stream: !a.no_stream,
            ..PagerConfig::default()
        },
        recover_timeout: a.recover_timeout_s.map(Duration::from_secs),
        timeout: a.wait_timeout_s.map(Duration::from_secs),
        paused: a.paused,
        disk_map: parse_map("--disk-map", &a.disk_map)?,
        tap_map: parse_map("--tap-map", &a.tap_map)?,
        security: a.security.security()?,
    };
    let vm = incoming::receive(&cfg, &stop).context("receiving the VM")?;
    serve(vm)
}

/// Parses argv and runs; returns the documented exit code.
pub fn main() -> ExitCode {
    page_server::cli::exit_quietly_on_broken_pipe();
    let _ = vm::PROCESS_START.set(std::time::Instant::now());
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    // Usage errors exit 1 like every other setup error (2 is reserved for a fatal vCPU error).
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let vcpu_cpus = match &cli.cmd {
        Some(Cmd::Run(a)) => a.common.vcpu_cpus.clone(),
        Some(Cmd::Restore(a)) => a.common.vcpu_cpus.clone(),
        _ => cli.incoming_args.vcpu_cpus.clone(),
    };
    if let Some(CpuList(cpus)) = vcpu_cpus {
        let _ = crate::vcpu::VCPU_CPUS.set(cpus);
    }
    let r = match (cli.incoming, cli.cmd) {
        (Some(addr), _) => incoming(&addr, cli.incoming_args),
        (None, None) => {
            eprintln!("vmm: a subcommand or --incoming ADDR is required (try --help)");
            return ExitCode::from(1);
        }
        (None, Some(cmd)) => match cmd {
            Cmd::Run(a) => run(a),
            Cmd::Restore(a) => restore(a),
            Cmd::Ctl(a) => ctl::ctl(a),
            Cmd::Tls(c) => tls(c),
            Cmd::GuestElf { out } => std::fs::write(&out, guest::ELF)
                .with_context(|| format!("writing {}", out.display()))
                .map(|_| ExitCode::SUCCESS),
        },
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_takes_cpu_lists() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from(["vmm", "run", "--vcpu-cpus", "0-1,3"]).unwrap();
        let Some(Cmd::Run(a)) = c.cmd else {
            panic!("not run")
        };
        assert_eq!(a.common.vcpu_cpus, Some(CpuList(vec![0, 1, 3])));
        let c = Cli::try_parse_from(["vmm", "--incoming", "tcp:127.0.0.1:1", "--vcpu-cpus", "0"])
            .unwrap();
        assert_eq!(c.incoming_args.vcpu_cpus, Some(CpuList(vec![0])));
        assert!(Cli::try_parse_from(["vmm", "run", "--vcpu-cpus", "1-0"]).is_err());
    }
}
