//! `fault-latency`: the paging core's benchmark (driven by `bench/fault-latency.sh`).
//!
//! `fault-latency make-image --size-mib N --out PATH` writes the image;
//! `fault-latency measure --addr ADDR --image PATH` measures against a running page-server and
//! its raw baselines, prints a table, writes JSON and an SVG latency CDF.

use bench::{image, measure, plot};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "fault-latency",
    version,
    about = "Fault latency and stream throughput of the paging core, with same-run baselines"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a random memory image with ~30 % zero pages (kept if one of that size exists).
    MakeImage {
        /// Size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Where.
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure against a page-server serving IMAGE at ADDR.
    Measure {
        /// The page-server's address (TLS, with --tls-psk-file's key).
        #[arg(long)]
        addr: String,
        /// The pre-shared key both this program and the page-server at --addr hold.
        #[arg(long, value_name = "FILE")]
        tls_psk_file: PathBuf,
        /// A second page-server serving the same image in plaintext (`--insecure`): the
        /// remote-fault and stream figures are measured against it too, for the cost of TLS.
        #[arg(long, value_name = "ADDR")]
        plain_addr: Option<String>,
        /// The image it serves (for the local-restore figures).
        #[arg(long)]
        image: PathBuf,
        /// Where to write the JSON figures.
        #[arg(long, default_value = "target/bench/fault-latency.json")]
        out: PathBuf,
        /// Fewer samples (for a run under a minute).
        #[arg(long)]
        quick: bool,
        /// Pager: busy-poll for a fault reply this many microseconds before sleeping.
        #[arg(long)]
        reply_spin_us: Option<u64>,
        /// Pager: bulk connections for the stream.
        #[arg(long)]
        bulk: Option<usize>,
        /// Where the latency-critical threads run. `colocated`: the touching thread, the
        /// pager's fault thread (and the page-server's event loop, via its --urgent-cpu) share
        /// CPU 0, as do both ends of the raw baselines; the stream runs on the other CPUs.
        /// `free`: the scheduler places everything.
        #[arg(long, value_enum, default_value_t = Placement::Colocated)]
        placement: Placement,
        /// Only measure one thing (for profiling): `faults` or `stream`; writes nothing.
        #[arg(long, hide = true)]
        only: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Placement {
    Colocated,
    Free,
}

#[derive(Debug, Serialize)]
struct Figures {
    placement: Placement,
    image_bytes: u64,
    raw_rtt_p50_us: f64,
    raw_rtt_p99_us: f64,
    fault_p50_us: f64,
    fault_p99_us: f64,
    fault_under_stream_p50_us: f64,
    fault_under_stream_p99_us: f64,
    stream_gbps: f64,
    tcp_gbps: f64,
    local_fault_p50_us: f64,
    local_fault_p99_us: f64,
    raw_local_fault_p50_us: f64,
    /// What protects the figures above: TLS 1.3 with a pre-shared key.
    security: String,
    /// The same measurements in plaintext, same run (absent without --plain-addr).
    plaintext: Option<Plain>,
    /// Extra detail: samples, wire throughput, the pager's own view of fault latency.
    detail: Detail,
    /// Target ratios (the targets) and whether this run met them.
    targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
struct Detail {
    fault_samples: usize,
    fault_under_stream_samples: usize,
    local_fault_samples: usize,
    fault_p999_us: f64,
    fault_max_us: f64,
    fault_under_stream_p999_us: f64,
    stream_wire_gbps: f64,
    stream_time_ms: f64,
    stream_zero_pages: u64,
    pager_fault_p50_us: f64,
    pager_fault_p99_us: f64,
    pager_under_stream_p50_us: f64,
    pager_under_stream_p99_us: f64,
}

/// Figures measured against the plaintext page-server.
#[derive(Debug, Serialize)]
struct Plain {
    fault_p50_us: f64,
    fault_p99_us: f64,
    stream_gbps: f64,
}

#[derive(Debug, Serialize)]
struct Target {
    what: String,
    at_least: bool,
    ratio: f64,
    limit: f64,
    met: bool,
}

fn target(what: &str, ratio: f64, limit: f64, at_least: bool) -> Target {
    Target {
        what: what.to_string(),
        at_least,
        ratio,
        limit,
        met: if at_least {
            ratio >= limit
        } else {
            ratio <= limit
        },
    }
}

fn main() {
    page_server::cli::exit_quietly_on_broken_pipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("fault-latency: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::MakeImage { size_mib, out } => image::make(&out, size_mib),
        Cmd::Measure {
            addr,
            tls_psk_file,
            plain_addr,
            image,
            out,
            quick,
            reply_spin_us,
            bulk,
            placement,
            only,
        } => {
            let mut cfg = pager::PagerConfig {
                security: transport::Security::psk_file(&tls_psk_file)?,
                ..pager::PagerConfig::default()
            };
            if let Some(us) = reply_spin_us {
                cfg.reply_spin = std::time::Duration::from_micros(us);
            }
            if let Some(b) = bulk {
                cfg.bulk_connections = b;
            }
            let cpu = (placement == Placement::Colocated).then_some(0);
            cfg.fault_cpu = cpu;
            measure::set_touch_cpu(cpu);
            if let Some(what) = only {
                let addr: pager::Addr = addr.parse().map_err(|e: String| anyhow::anyhow!(e))?;
                if what == "stream" {
                    println!("{}", measure::stream_only(&addr, &cfg)?);
                } else {
                    let (s, r) = measure::remote_faults(&addr, 200_000, &cfg)?;
                    let p = r.fault_latency.p50_us;
                    println!(
                        "faults p50 {:.1} p99 {:.1} us; pager p50 {p:.1}",
                        s.q_us(0.5),
                        s.q_us(0.99)
                    );
                }
                return Ok(());
            }
            measure_all(
                &addr,
                plain_addr.as_deref(),
                &image,
                &out,
                quick,
                &cfg,
                placement,
            )
        }
    }
}

fn measure_all(
    addr: &str,
    plain_addr: Option<&str>,
    image: &std::path::Path,
    out: &std::path::Path,
    quick: bool,
    cfg: &pager::PagerConfig,
    placement: Placement,
) -> anyhow::Result<()> {
    let addr: pager::Addr = addr.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let image_bytes = std::fs::metadata(image)
        .with_context(|| format!("image {}", image.display()))?
        .len();
    let n = if quick { 3000 } else { 20000 };
    let step = |s: &str| eprintln!("[fault-latency] {s}");

    step("raw loopback TCP round trip (4 KiB reply)");
    let raw_rtt = measure::raw_rtt(n, cfg.fault_cpu)?;
    step("raw loopback TCP throughput");
    let tcp_gbps = measure::tcp_gbps(image_bytes.min(2 << 30))?;
    step("remote faults, stream off");
    let (fault, fault_rep) = measure::remote_faults(&addr, n, cfg)?;
    step("remote faults while the stream runs");
    let (under, under_rep) = measure::faults_under_stream(&addr, n, cfg)?;
    step("stream throughput (no faults)");
    let stream = measure::stream_only(&addr, cfg)?;
    let plaintext = match plain_addr {
        None => None,
        Some(a) => {
            let a: pager::Addr = a.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let plain = pager::PagerConfig {
                security: transport::Security::Insecure,
                ..cfg.clone()
            };
            step("remote faults, stream off, PLAINTEXT (for the cost of TLS)");
            let (pf, _) = measure::remote_faults(&a, n, &plain)?;
            step("stream throughput, PLAINTEXT");
            let ps = measure::stream_only(&a, &plain)?;
            let ps_s = ps.time_to_complete_ms.unwrap_or(f64::NAN) / 1e3;
            Some(Plain {
                fault_p50_us: pf.q_us(0.5),
                fault_p99_us: pf.q_us(0.99),
                stream_gbps: image_bytes as f64 * 8.0 / ps_s / 1e9,
            })
        }
    };
    step("local-file faults");
    let (local, _) = measure::local_faults(image, n, cfg)?;
    step("bare userfaultfd faults");
    let raw_local =
        measure::raw_local_faults((image_bytes as usize).min(256 << 20), n, cfg.fault_cpu)?;

    let stream_s = stream.time_to_complete_ms.unwrap_or(f64::NAN) / 1e3;
    let wire = stream.stream_bytes + stream.fault_bytes + stream.prefetch_bytes;
    let f = Figures {
        placement,
        image_bytes,
        raw_rtt_p50_us: raw_rtt.q_us(0.5),
        raw_rtt_p99_us: raw_rtt.q_us(0.99),
        fault_p50_us: fault.q_us(0.5),
        fault_p99_us: fault.q_us(0.99),
        fault_under_stream_p50_us: under.q_us(0.5),
        fault_under_stream_p99_us: under.q_us(0.99),
        stream_gbps: image_bytes as f64 * 8.0 / stream_s / 1e9,
        tcp_gbps,
        local_fault_p50_us: local.q_us(0.5),
        local_fault_p99_us: local.q_us(0.99),
        raw_local_fault_p50_us: raw_local.q_us(0.5),
        security: cfg.security.describe(),
        plaintext,
        detail: Detail {
            fault_samples: fault.0.len(),
            fault_under_stream_samples: under.0.len(),
            local_fault_samples: local.0.len(),
            fault_p999_us: fault.q_us(0.999),
            fault_max_us: fault.q_us(1.0),
            fault_under_stream_p999_us: under.q_us(0.999),
            stream_wire_gbps: wire as f64 * 8.0 / stream_s / 1e9,
            stream_time_ms: stream_s * 1e3,
            stream_zero_pages: stream.zero_pages,
            pager_fault_p50_us: fault_rep.fault_latency.p50_us,
            pager_fault_p99_us: fault_rep.fault_latency.p99_us,
            pager_under_stream_p50_us: under_rep.fault_latency.p50_us,
            pager_under_stream_p99_us: under_rep.fault_latency.p99_us,
        },
        targets: Vec::new(),
    };
    let mut targets = vec![
        target(
            "fault_p50 / raw_rtt_p50",
            f.fault_p50_us / f.raw_rtt_p50_us,
            1.5,
            false,
        ),
        target(
            "fault_p99 / raw_rtt_p99",
            f.fault_p99_us / f.raw_rtt_p99_us,
            3.0,
            false,
        ),
        target(
            "fault_under_stream_p99 / fault_p99",
            f.fault_under_stream_p99_us / f.fault_p99_us,
            3.0,
            false,
        ),
        target(
            "stream_gbps / tcp_gbps",
            f.stream_gbps / f.tcp_gbps,
            0.9,
            true,
        ),
        target(
            "local_fault_p50 / raw_local_fault_p50",
            f.local_fault_p50_us / f.raw_local_fault_p50_us,
            1.3,
            false,
        ),
    ];
    if let Some(p) = &f.plaintext {
        targets.push(target(
            "TLS stream_gbps / plaintext stream_gbps",
            f.stream_gbps / p.stream_gbps,
            0.8,
            true,
        ));
        targets.push(target(
            "TLS fault_p50 / plaintext fault_p50",
            f.fault_p50_us / p.fault_p50_us,
            1.1,
            false,
        ));
    }
    let f = Figures { targets, ..f };
    print_table(&f);

    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&f)? + "\n")
        .with_context(|| format!("write {}", out.display()))?;
    let svg_path = out.with_extension("svg");
    let svg = plot::cdf_svg(
        &format!(
            "Fault latency CDF ({} MiB image, loopback)",
            image_bytes >> 20
        ),
        &[
            ("raw TCP 4 KiB RTT", &raw_rtt),
            ("remote fault", &fault),
            ("remote fault, stream on", &under),
            ("local-file fault", &local),
            ("bare uffd fault", &raw_local),
        ],
    );
    let svg = svg.map_err(|e| anyhow::anyhow!("drawing the latency CDF: {e}"))?;
    std::fs::write(&svg_path, svg).with_context(|| format!("write {}", svg_path.display()))?;
    println!("\nwrote {} and {}", out.display(), svg_path.display());
    Ok(())
}

fn print_table(f: &Figures) {
    let row = |name: &str, ours: String, base: String| println!("  {name:<34} {ours:>14}   {base}");
    println!(
        "\nfault-latency: {} MiB image, loopback, placement {:?}",
        f.image_bytes >> 20,
        f.placement
    );
    println!("  {:<34} {:>14}   baseline (same run)", "figure", "ours");
    row(
        "fault p50 / p99 (us)",
        format!("{:.1} / {:.1}", f.fault_p50_us, f.fault_p99_us),
        format!(
            "raw 4 KiB RTT {:.1} / {:.1}",
            f.raw_rtt_p50_us, f.raw_rtt_p99_us
        ),
    );
    row(
        "fault under stream p50 / p99 (us)",
        format!(
            "{:.1} / {:.1}",
            f.fault_under_stream_p50_us, f.fault_under_stream_p99_us
        ),
        format!("stream off {:.1} / {:.1}", f.fault_p50_us, f.fault_p99_us),
    );
    row(
        "stream (Gbit/s of memory)",
        format!("{:.2}", f.stream_gbps),
        format!(
            "raw TCP {:.2} (wire {:.2})",
            f.tcp_gbps, f.detail.stream_wire_gbps
        ),
    );
    row(
        "local-file fault p50 / p99 (us)",
        format!("{:.1} / {:.1}", f.local_fault_p50_us, f.local_fault_p99_us),
        format!("bare uffd {:.1}", f.raw_local_fault_p50_us),
    );
    if let Some(p) = &f.plaintext {
        row(
            "PLAINTEXT fault p50 / p99 (us)",
            format!("{:.1} / {:.1}", p.fault_p50_us, p.fault_p99_us),
            format!("TLS {:.1} / {:.1}", f.fault_p50_us, f.fault_p99_us),
        );
        row(
            "PLAINTEXT stream (Gbit/s)",
            format!("{:.2}", p.stream_gbps),
            format!("TLS {:.2}", f.stream_gbps),
        );
    }
    println!("  (figures above the PLAINTEXT rows: {})", f.security);
    println!("\n  targets:");
    for t in &f.targets {
        let cmp = if t.at_least { ">=" } else { "<=" };
        println!(
            "  {:<42} {:>6.2}  (target {cmp} {})  {}",
            t.what,
            t.ratio,
            t.limit,
            if t.met { "met" } else { "NOT met" }
        );
    }
}
