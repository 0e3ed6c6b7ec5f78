//! The source side: a thread that connects to the destination, runs the page-server over the
//! VM's RAM, asks the controller to pause and save at switchover, then waits for the destination
//! to have every page. The controller alone pauses, saves and resumes the VM; this thread only
//! talks to the network and reports through [`MigEvent`]s (`controller`); the pre-copy passes
//! are `precopy`'s.

use std::net::Shutdown;
use std::ptr::NonNull;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use page_server::{RawRegions, ServerConfig, ServerHandle};
use transport::{Addr, Sock};

use super::controller::{Context, MigEvent};
use super::precopy;
use super::{mono_ns, Link, MigrationError, Mode, Offer, Wire, SILENCE_TIMEOUT};
use crate::api::replies::{DestinationReport, MigrationReport, PrecopyReport, Progress, Recovery};
use crate::memory::PAGE_SIZE;

/// Time allowed for the destination to build its VM shell and answer the offer.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed between the state going out and the destination saying its vCPUs run.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// Clock probes before switchover.
const PINGS: usize = 8;

/// A running migration (source side).
pub struct Outgoing {
    thread: Option<JoinHandle<()>>,
    link: Option<Sock>,
}

impl Outgoing {
    /// Starts the migration thread.
    ///
    /// # Safety
    /// `ctx.regions` must stay mapped and readable until the returned value is dropped (the
    /// page-server reads them from its threads).
    pub unsafe fn start(ctx: Context) -> Result<Outgoing, MigrationError> {
        let addr: Addr = ctx
            .to
            .parse()
            .map_err(|e| MigrationError::Other(format!("destination {:?}: {e}", ctx.to)))?;
        let sock = Sock::connect(&addr, true, Duration::from_secs(5)).map_err(|source| {
            MigrationError::Io {
                what: format!(
                    "cannot reach the destination {addr} (is `vmm --incoming` listening there?)"
                ),
                source,
            }
        })?;
        // both sides prove who they are before a byte of the VM goes out
        let sock = ctx
            .security
            .client(sock, transport::tls::HANDSHAKE_TIMEOUT)
            .map_err(|source| MigrationError::Io {
                what: format!("the destination {addr} is not accepted, or does not accept us"),
                source,
            })?;
        log::info!(
            "migration link to {addr}: {}{}",
            ctx.security.describe(),
            sock.peer_identity()
                .map_or(String::new(), |p| format!(", peer {p}"))
        );
        let link_clone = sock.try_clone().ok();
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || run(ctx, addr, sock))
            .map_err(|e| MigrationError::Other(format!("spawning the migration thread: {e}")))?;
        Ok(Outgoing {
            thread: Some(thread),
            link: link_clone,
        })
    }

    /// Waits for the thread to end.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        // Unblock the thread, then wait: its page-server reads guest RAM, which must outlive it.
        if let Some(s) = &self.link {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.join();
    }
}

fn run(ctx: Context, addr: Addr, sock: Sock) {
    let events = ctx.events.clone();
    let send = |e: MigEvent| {
        events(e);
    };
    let pages = page_server_addr(&sock, &addr);
    let remove_socket = || {
        if let Addr::Unix(p) = &pages {
            let _ = std::fs::remove_file(p);
        }
    };
    match migrate(ctx, addr, sock, &pages) {
        Ok(report) => {
            remove_socket();
            send(MigEvent::Done(Box::new(report)))
        }
        Err(Outcome::NotRun(e)) => {
            remove_socket();
            send(MigEvent::Failed(transport::error_chain(&e)))
        }
        // the page-server goes on serving (a destination that runs the VM needs its pages)
        Err(Outcome::Unknown(e, server)) => {
            send(MigEvent::Stuck(transport::error_chain(&e), server))
        }
    }
}

/// The destination may run the VM: every page-server goes on serving.
fn unknown(e: MigrationError, server: ServerHandle, disks: &mut Vec<ServerHandle>) -> Outcome {
    let mut keep = vec![server];
    keep.append(disks);
    Outcome::Unknown(e, keep)
}

/// How a migration ended badly.
enum Outcome {
    /// The destination never ran the VM.
    NotRun(MigrationError),
    /// The destination may be running it (the page-servers it may still need).
    Unknown(MigrationError, Vec<ServerHandle>),
}

impl From<MigrationError> for Outcome {
    fn from(e: MigrationError) -> Self {
        Outcome::NotRun(e)
    }
}

fn addr_string(a: &Addr) -> String {
    match a {
        Addr::Tcp(a) => format!("tcp:{a}"),
        Addr::Unix(p) => p.display().to_string(),
    }
}

/// `--copy-disk`: a page-server per disk image (read-only mapping of the file; the guest's
/// writes reach it through the page cache until the pause, after which it no longer changes),
/// named in the offer.
fn serve_disks(
    offer: &mut Offer,
    pages: &Addr,
    security: &transport::Security,
    only_peer: Option<String>,
) -> Result<Vec<ServerHandle>, MigrationError> {
    let mut out = Vec::new();
    for (i, d) in offer.devices.iter_mut().enumerate() {
        let crate::virtio::DeviceConfig::Block(b) = &d.config else {
            continue;
        };
        let err = |what: String| {
            MigrationError::Other(format!("--copy-disk {}: {what}", b.path.display()))
        };
        let img = transport::FileImage::open(&b.path, PAGE_SIZE).map_err(|e| {
            err(format!(
                "{e} (copy-disk needs an image whose size is a multiple of {PAGE_SIZE} bytes)"
            ))
        })?;
        let at = match pages {
            Addr::Tcp(a) => Addr::Tcp(*a),
            Addr::Unix(p) => Addr::Unix(p.with_extension(format!("disk{i}"))),
        };
        let server = page_server::serve(
            Arc::new(img),
            &at,
            ServerConfig {
                security: security.clone(),
                only_peer: only_peer.clone(),
                ..ServerConfig::default()
            },
        )
        .map_err(|e| err(transport::error_chain(&e)))?;
        log::info!(
            "serving {} for the destination on {}",
            b.path.display(),
            server.addr()
        );
        d.copy_from = Some(addr_string(server.addr()));
        out.push(server);
    }
    Ok(out)
}

/// Where the page-server listens: next to the migration connection's own address.
fn page_server_addr(sock: &Sock, addr: &Addr) -> Addr {
    match addr {
        Addr::Tcp(_) => match sock.local_addr() {
            Some(a) => Addr::Tcp(std::net::SocketAddr::new(a.ip(), 0)),
            None => Addr::Tcp(([0, 0, 0, 0], 0).into()),
        },
        Addr::Unix(_) => Addr::Unix(std::env::temp_dir().join(format!(
            "vmm-pages-{}-{}.sock",
            std::process::id(),
            mono_ns()
        ))),
    }
}

fn migrate(ctx: Context, addr: Addr, sock: Sock, pages: &Addr) -> Result<MigrationReport, Outcome> {
    let t_start = Instant::now();
    let mut link = Link::new(sock, addr.to_string());
    let hosts = ctx
        .regions
        .iter()
        .map(|&(h, l)| {
            NonNull::new(h as *mut u8)
                .map(|p| (p, l as usize))
                .ok_or_else(|| MigrationError::Other("null RAM region".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: `Outgoing::start`'s contract: the regions stay mapped while this thread runs, and
    // the server is stopped before it returns (or handed to the controller, which keeps RAM).
    let mem = unsafe { RawRegions::new(hosts, ctx.layout.clone(), PAGE_SIZE) };
    let server = page_server::serve(
        Arc::new(mem),
        pages,
        ServerConfig {
            bulk_buffer_bytes: super::bulk_buffer_for(super::tcp_rtt(link.sock())),
            precopy: ctx.plan.precopies(),
            security: ctx.security.clone(),
            // guest RAM goes only to the destination the link authenticated, and only to a
            // pager that names the layout it receives
            only_peer: link.sock().peer_identity(),
            require_layout: true,
            ..ServerConfig::default()
        },
    )
    .map_err(|e| MigrationError::Other(format!("page-server: {}", transport::error_chain(&e))))?;
    let mut offer = ctx.offer.clone();
    offer.page_server = addr_string(server.addr());
    let mut disks = if ctx.plan.copy_disk {
        serve_disks(
            &mut offer,
            pages,
            &ctx.security,
            link.sock().peer_identity(),
        )?
    } else {
        Vec::new()
    };
    log::info!(
        "migrating to {addr}: page-server on {}, {} MiB, {} vCPUs",
        server.addr(),
        offer.config.mem_bytes >> 20,
        offer.config.vcpus
    );
    link.send(&Wire::Offer(offer.clone()))?;
    let prepare_ms = match link.recv(Some(ACCEPT_TIMEOUT))? {
        Wire::Accept { prepare_ms } => prepare_ms,
        Wire::Refuse { reason } => return Err(MigrationError::Refused(reason).into()),
        other => {
            return Err(MigrationError::Protocol(format!("expected Accept, got {other:?}")).into())
        }
    };
    let handshake_ms = t_start.elapsed().as_secs_f64() * 1e3;
    // Clock offset (destination − source) from the probe with the shortest round trip.
    let mut best: Option<(u64, i128)> = None;
    for _ in 0..PINGS {
        let t = mono_ns();
        link.send(&Wire::Ping { t })?;
        let Wire::Pong { t: echo, dest } = link.recv(Some(Duration::from_secs(5)))? else {
            return Err(MigrationError::Protocol("expected Pong".into()).into());
        };
        let back = mono_ns();
        if echo != t {
            return Err(MigrationError::Protocol("Pong for another Ping".into()).into());
        }
        let rtt = back - t;
        let offset = i128::from(dest) - i128::from(t + rtt / 2);
        if best.is_none_or(|(r, _)| rtt < r) {
            best = Some((rtt, offset));
        }
    }
    let (rtt_ns, offset_ns) = best.unwrap_or((0, 0));
    let precopy = if ctx.plan.precopies() {
        Some(precopy::passes(&ctx, &mut link, &server, t_start)?)
    } else {
        None
    };
    // Switchover: the controller pauses and saves.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    if !(ctx.events)(MigEvent::Switchover(tx)) {
        return Err(MigrationError::Other("the VM is gone".into()).into());
    }
    let sw = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(sw)) => sw,
        Ok(Err(why)) => {
            let _ = link.send(&Wire::Abort {
                reason: why.clone(),
            });
            return Err(MigrationError::Other(format!("pausing the VM: {why}")).into());
        }
        Err(_) => {
            let _ = link.send(&Wire::Abort {
                reason: "the source did not pause".into(),
            });
            return Err(MigrationError::Other("the controller did not pause the VM".into()).into());
        }
    };
    let state_bytes = sw.envelope.len();
    // Hybrid: the pages still dirty are those of the last pass plus those written since; the
    // stream sends them again (as final copies) and the destination drops its older ones.
    let mut dirty = Vec::new();
    let mut final_dirty = 0u64;
    let mut precopy_pages = 0u64;
    if let Some(p) = &precopy {
        dirty = p.carry.clone();
        for (d, s) in dirty.iter_mut().zip(&sw.dirty) {
            *d |= *s;
        }
        final_dirty = dirty.iter().map(|b| u64::from(b.count_ones())).sum();
        precopy_pages = server.end_precopy();
        server.resend(&dirty);
    }
    // A failed send means the destination cannot hold the whole state: it will not run the VM.
    link.send(&Wire::State {
        envelope: sw.envelope,
        paused_at: sw.paused_at,
        dirty,
        precopy_pages,
    })?;
    let (running_at, apply_ms) = match link.recv(Some(RESUME_TIMEOUT)) {
        Ok(Wire::Resumed {
            running_at,
            apply_ms,
        }) => (running_at, apply_ms),
        Ok(Wire::Failed { reason }) => return Err(MigrationError::DestinationFailed(reason).into()),
        Ok(other) => {
            let e = MigrationError::Protocol(format!("expected Resumed, got {other:?}"));
            return Err(unknown(e, server, &mut disks));
        }
        Err(e) => return Err(unknown(e, server, &mut disks)),
    };
    let running_src = i128::from(running_at) - offset_ns;
    let downtime_ms = (running_src - i128::from(sw.paused_at)) as f64 / 1e6;
    log::info!(
        "destination running: downtime {downtime_ms:.2} ms (pause+save {:.2} ms, state {state_bytes} bytes, apply {apply_ms:.2} ms, rtt {:.0} µs)",
        sw.pause_ms,
        rtt_ns as f64 / 1e3
    );
    // Post-copy: wait for the destination to have every page.
    let total_bytes = offer.config.mem_bytes;
    let mut last = (Instant::now(), 0u64);
    // The destination runs the VM now: a silent or broken link is waited out (the page-servers
    // keep serving; the destination's pagers reconnect on their own) until the recover timeout.
    // The pagers' `Done` to our page-servers also says the destination has everything.
    let mut heard = Instant::now();
    let mut link_lost: Option<MigrationError> = None;
    let mut lost_at: Option<(Instant, String)> = None;
    let mut all_done_since: Option<Instant> = None;
    let report = loop {
        if all_done_since.is_none()
            && server.stats().clients_done > 0
            && disks.iter().all(|d| d.stats().clients_done > 0)
        {
            all_done_since = Some(Instant::now());
        }
        // the destination's own Complete (with its figures) normally follows its pagers' Done
        // at once; without a link, or without it for a while, the Done is the answer
        if all_done_since.is_some_and(|t| link_lost.is_some() || t.elapsed() > SILENCE_TIMEOUT) {
            if let Some(e) = &link_lost {
                log::info!(
                    "the destination's pagers have every page (the migration link was lost: {})",
                    transport::error_chain(e)
                );
            }
            break DestinationReport {
                completion: Some("learnt from the page-servers (migration link lost)".into()),
                ..DestinationReport::default()
            };
        }
        if link_lost.is_none() && !link.readable(Duration::from_millis(200)) {
            if heard.elapsed() > SILENCE_TIMEOUT
                && heard.elapsed() <= SILENCE_TIMEOUT + Duration::from_millis(250)
            {
                log::warn!(
                    "nothing from the destination for {SILENCE_TIMEOUT:?}; waiting up to {:?} for it (memory stays served)",
                    ctx.plan.recover_timeout
                );
            }
            if heard.elapsed() > ctx.plan.recover_timeout {
                let e = MigrationError::Other(format!(
                    "no word from the destination for {:?}",
                    ctx.plan.recover_timeout
                ));
                return Err(unknown(e, server, &mut disks));
            }
            continue;
        }
        if link_lost.is_some() {
            if heard.elapsed() > ctx.plan.recover_timeout {
                let e = link_lost
                    .take()
                    .unwrap_or_else(|| MigrationError::Other("migration link lost".into()));
                return Err(unknown(e, server, &mut disks));
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let msg = match link.recv(Some(SILENCE_TIMEOUT)) {
            Ok(m) => m,
            Err(e) => {
                log::warn!(
                    "migration link lost after the switch ({}); memory stays served, waiting up to {:?} for the destination's pagers to finish",
                    transport::error_chain(&e),
                    ctx.plan.recover_timeout
                );
                lost_at = Some((Instant::now(), transport::error_chain(&e)));
                link_lost = Some(e);
                continue;
            }
        };
        heard = Instant::now();
        match msg {
            Wire::Progress { present, total } => {
                let dt = last.0.elapsed().as_secs_f64().max(1e-6);
                let mbps =
                    (present.saturating_sub(last.1) * u64::from(PAGE_SIZE)) as f64 / dt / 1e6;
                last = (Instant::now(), present);
                (ctx.events)(MigEvent::Progress(Progress::Postcopy {
                    pages_present: present,
                    pages_total: total,
                    percent: if total > 0 {
                        present as f64 * 100.0 / total as f64
                    } else {
                        100.0
                    },
                    mb_per_s: mbps,
                    elapsed_ms: t_start.elapsed().as_secs_f64() * 1e3,
                }));
            }
            // the destination's figures: JSON from a peer, taken only if it has their shape
            Wire::Complete { report } => break serde_json::from_str(&report).unwrap_or_default(),
            other => {
                let e = MigrationError::Protocol(format!("expected Progress, got {other:?}"));
                return Err(unknown(e, server, &mut disks));
            }
        }
    };
    let done_src = mono_ns();
    let total_ms = (done_src - sw.paused_at) as f64 / 1e6;
    let served = server.stats();
    drop(server);
    let disk_sent: u64 = disks.iter().map(|d| d.stats().data_bytes).sum();
    drop(disks);
    Ok(MigrationReport {
        mode: match ctx.plan.mode {
            Ok(Mode::Hybrid) => "hybrid",
            Ok(Mode::Precopy) => "precopy",
            _ => "postcopy",
        }
        .into(),
        to: addr.to_string(),
        mem_bytes: total_bytes,
        vcpus: offer.config.vcpus,
        downtime_ms,
        total_ms,
        pause_ms: sw.pause_ms,
        handshake_ms,
        prepare_ms,
        apply_ms,
        state_bytes: state_bytes as u64,
        rtt_us: rtt_ns as f64 / 1e3,
        clock_offset_us: offset_ns as f64 / 1e3,
        source: served,
        precopy: precopy.map(|p| PrecopyReport {
            dirty_tracking: ctx.plan.dirty_tracking.as_deref().unwrap_or("kvm").into(),
            passes: p.passes,
            stop_reason: p.stop_reason,
            pages_dirty_at_switchover: final_dirty,
            ms: p.ms,
        }),
        bytes_sent: served.data_bytes,
        disk_bytes_sent: disk_sent,
        pages_sent: served.pages_sent(),
        // what recovery there was after the switch: the destination's pagers' sessions beyond
        // the first are their reconnections (their time without us is `disconnected_ms` in
        // the destination's figures, when its Complete came)
        recovery: Recovery {
            page_server_reconnects: served.sessions_opened.saturating_sub(1),
            migration_link_lost: lost_at.as_ref().map(|(_, why)| why.clone()),
            without_migration_link_ms: lost_at
                .as_ref()
                .map(|(t, _)| t.elapsed().as_secs_f64() * 1e3),
        },
        source_ram_checksum: None,
        source_ram_checksum_except_kvm: None,
        destination: report,
    })
}
