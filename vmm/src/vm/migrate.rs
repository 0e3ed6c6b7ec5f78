//! The controller's side of live migration: starting the source thread and answering its
//! switchover request (pause + save), and on a destination, reporting progress and completion
//! over the migration link.

use std::time::Instant;

use transport::error_chain;

use super::roles::{Dest, Source};
use super::Vm;
use crate::api::replies::{DestinationReport, Progress, Switchover};
use crate::api::{Reply, Request};
use crate::config::Exit;
use crate::migration::controller::{Context, DirtyOp, MigEvent, Switch};
use crate::migration::outgoing::Outgoing;
use crate::migration::{mono_ns, Link, Mode, Offer, Plan, Wire, PROGRESS_EVERY, REQUIRED_CAPS};
use crate::state;

impl Vm {
    /// `migrate` from the control socket: starts the source side, or replies with why not.
    pub(super) fn start_migration(
        &mut self,
        to: String,
        plan: Plan,
        reply: std::sync::mpsc::Sender<Reply>,
    ) {
        let refuse = |kind: &str, msg: String| {
            let _ = reply.send(Reply::err(kind, msg));
        };
        let mode = match &plan.mode {
            Ok(m) => *m,
            Err(why) => return refuse("bad_request", why.clone()),
        };
        if let Err(why) = crate::dirty::Backend::parse(plan.dirty_tracking.as_deref()) {
            return refuse("bad_request", why);
        }
        if let Some(r) = self.lost_refusal("cannot migrate") {
            let _ = reply.send(r);
            return;
        }
        if self.source.is_some() {
            return refuse("busy", "a migration is already running".into());
        }
        if self.devices.virtio.copies_pending() > 0 {
            return refuse(
                "busy",
                "a disk is still being copied in from the previous host; migrate once it is complete".into(),
            );
        }
        if self
            .pager
            .as_ref()
            .is_some_and(|p| p.present_pages() < p.total_pages())
        {
            return refuse(
                "busy",
                "guest memory is still being paged in from the previous host; migrate once it is complete".into(),
            );
        }
        let offer = Offer {
            proto_version: proto::PROTOCOL_VERSION,
            page_size: crate::memory::PAGE_SIZE,
            config: self.config.clone(),
            cpuid: self.guest.cpuid.clone(),
            msrs: self.guest.msrs.clone(),
            tsc_khz: self.guest.tsc_khz,
            caps: REQUIRED_CAPS.iter().map(|(c, _)| *c).collect(),
            page_server: String::new(),
            precopy: mode != Mode::Postcopy,
            copy_before_resume: mode == Mode::Precopy,
            devices: self.devices.virtio.offered(),
            recover_timeout_ms: plan.recover_timeout.as_millis() as u64,
        };
        let verify = plan.verify;
        let switchover = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ctx = Context {
            to,
            offer,
            regions: self
                .ram
                .host_regions()
                .iter()
                .map(|&(_, h, l)| (h, l))
                .collect(),
            layout: self.ram.layout(),
            events: {
                let tx = self.tx.clone();
                std::sync::Arc::new(move |e| tx.send(super::Event::Migration(e)).is_ok())
            },
            plan,
            switchover: switchover.clone(),
            security: self.security.clone(),
        };
        // SAFETY: guest RAM stays mapped while `self.source` lives: Vm::drop drops the source
        // (which joins the thread and its page-server) before the RAM.
        match unsafe { Outgoing::start(ctx) } {
            Ok(run) => {
                let _ = reply.send(Reply::progress(&Progress::Connected));
                self.source = Some(Source {
                    run,
                    reply,
                    paused_it: false,
                    verify,
                    switchover,
                    hybrid: mode != Mode::Postcopy,
                });
            }
            Err(e) => refuse("migration", error_chain(&e)),
        }
    }

    fn switchover(&mut self) -> Result<Switch, String> {
        // Disks written back while the VM still runs: the flush in the pause then has little
        // left to do (it is part of the downtime).
        self.devices.virtio.pre_flush();
        let paused_at = mono_ns();
        let t = Instant::now();
        let was_paused = self.paused;
        let snap = self.save().map_err(|e| error_chain(&e))?;
        if let Some(s) = &mut self.source {
            s.paused_it = !was_paused;
        }
        let envelope = state::encode(&snap).map_err(|e| error_chain(&e))?;
        // pre-copy: what the guest wrote since the last pass. Tracking stays on (turning KVM's
        // off re-registers the memory slots, milliseconds here): the VM does not run again
        // unless the migration fails, and then it is turned off first.
        let mut dirty = Vec::new();
        if let Some(log) = &self.dirty_log {
            dirty = log.collect(&self.fd, &self.ram)?.to_bytes();
        }
        self.kvm_pages_at_pause = state::kvm_owned_pages(&snap);
        Ok(Switch {
            envelope,
            paused_at,
            pause_ms: t.elapsed().as_secs_f64() * 1e3,
            dirty,
        })
    }

    /// Reacts to the migration thread; `Some(exit)` when the VMM should end.
    pub(super) fn on_migration(&mut self, ev: MigEvent) -> Option<Exit> {
        match ev {
            MigEvent::Switchover(tx) => {
                let r = self.switchover();
                if r.is_err() {
                    self.resume_after_migration();
                }
                let _ = tx.send(r);
                None
            }
            MigEvent::Dirty(op, tx) => {
                let _ = tx.send(self.dirty_op(op));
                None
            }
            MigEvent::Progress(v) => {
                if let Some(s) = &self.source {
                    let _ = s.reply.send(Reply::progress(&v));
                }
                None
            }
            MigEvent::Failed(why) => {
                log::error!("migration failed: {why}; the VM runs here");
                self.resume_after_migration();
                if let Some(mut s) = self.source.take() {
                    s.run.join();
                    let _ = s.reply.send(Reply::err("migration", why));
                }
                None
            }
            MigEvent::Stuck(why, server) => {
                log::error!(
                    "migration failed after the state was sent: {why}; the destination may be running the VM, so it stays paused here and its memory stays served"
                );
                self.kept_server = server;
                if let Some(mut s) = self.source.take() {
                    s.run.join();
                    let _ = s.reply.send(Reply::err(
                        "migration_unknown",
                        format!("{why} (the VM stays paused here; the destination may run it)"),
                    ));
                }
                None
            }
            MigEvent::Done(mut report) => {
                if let Some(mut s) = self.source.take() {
                    s.run.join();
                    if s.verify {
                        // RAM has not changed since the pause.
                        report.source_ram_checksum = Some(format!("{:016x}", self.ram.checksum()));
                        let skip = &self.kvm_pages_at_pause;
                        report.source_ram_checksum_except_kvm =
                            Some(format!("{:016x}", self.ram.checksum_except(skip)));
                    }
                    let reply = Reply::ok(&report);
                    log::info!(
                        "migration complete: {}",
                        serde_json::to_string(&reply.fields).unwrap_or_default()
                    );
                    let _ = s.reply.send(reply);
                }
                self.ram.discard();
                Some(Exit::Migrated)
            }
        }
    }

    fn dirty_op(&mut self, op: DirtyOp) -> Result<(Vec<u8>, u64), String> {
        match op {
            DirtyOp::Start(b) => {
                self.dirty_log = Some(crate::dirty::Tracker::start(b, &self.fd, &self.ram)?);
                Ok((Vec::new(), 0))
            }
            DirtyOp::Collect => {
                let log = self.dirty_log.as_ref().ok_or("dirty tracking is off")?;
                let set = log.collect(&self.fd, &self.ram)?;
                Ok((set.to_bytes(), set.count()))
            }
        }
    }

    /// `migrate-switchover`: ends a hybrid migration's pre-copy passes now.
    pub(super) fn force_switchover(&mut self) -> Reply {
        match &self.source {
            Some(s) if s.hybrid => {
                s.switchover
                    .store(true, std::sync::atomic::Ordering::Release);
                Reply::ok(&Switchover {
                    switchover: "requested".into(),
                })
            }
            Some(_) => Reply::err(
                "bad_request",
                "this migration has no pre-copy (mode postcopy)",
            ),
            None => Reply::err("bad_request", "no migration is running"),
        }
    }

    fn resume_after_migration(&mut self) {
        if let Some(log) = self.dirty_log.take() {
            if let Err(e) = log.stop(&self.fd) {
                log::warn!("turning dirty logging off: {e}");
            }
        }
        if self.source.as_ref().is_some_and(|s| s.paused_it) {
            self.resume();
            if let Some(s) = &mut self.source {
                s.paused_it = false;
            }
        }
    }

    /// This VM arrived by migration over `link`: report progress and completion on it.
    pub fn attach_incoming(&mut self, link: Link) {
        self.dest = Some(Dest {
            link,
            last_progress: Instant::now(),
            memory_complete: false,
            disk_copies: Vec::new(),
            disks_pending: self.disk_copies_started,
        });
    }

    /// Sends a progress report when one is due; returns how long until the next.
    pub(super) fn dest_tick(&mut self) -> Option<std::time::Duration> {
        let d = self.dest.as_mut()?;
        let due = d.last_progress + PROGRESS_EVERY;
        let now = Instant::now();
        if now < due {
            return Some(due - now);
        }
        d.last_progress = now;
        let (present, total) = self
            .pager
            .as_ref()
            .map_or((0, 0), |p| (p.present_pages(), p.total_pages()));
        if let Err(e) = d.link.send(&Wire::Progress { present, total }) {
            // The pages come on the pager's own connections (which reconnect or give up on
            // their own); the migration link only carried reports: stop sending them.
            log::warn!(
                "migration link to the source lost ({}); no more progress reports",
                error_chain(&e)
            );
            self.dest = None;
            return None;
        }
        Some(PROGRESS_EVERY)
    }

    /// Every RAM page is here: complete once the disks copied in are too.
    pub(super) fn dest_complete(&mut self) {
        if let Some(d) = &mut self.dest {
            d.memory_complete = true;
        }
        self.dest_try_complete();
    }

    /// Starts copying in the disks of a `--copy-disk` migration (the VM runs here now).
    pub fn start_disk_copies(&mut self) {
        let tx = self.tx.clone();
        let n = self.devices.virtio.start_disk_copies(move |e| {
            let _ = tx.send(super::Event::DiskCopy(e));
        });
        self.disk_copies_started = n;
    }

    /// A disk copy-in ended: on failure the VM stops (exit as for lost memory).
    pub(super) fn on_disk_copy(&mut self, e: crate::virtio::DiskCopyEvent) -> Option<Exit> {
        match e {
            crate::virtio::DiskCopyEvent::Done { report, .. } => {
                if let Some(d) = &mut self.dest {
                    d.disk_copies.push(*report);
                    d.disks_pending = d.disks_pending.saturating_sub(1);
                }
                self.dest_try_complete();
                None
            }
            crate::virtio::DiskCopyEvent::Failed { slot, reason } => {
                self.on_source_lost(format!(
                    "copying disk slot {slot} from the source: {reason}"
                ));
                None
            }
        }
    }

    /// RAM and every disk are here: tell the source, with our figures, and drop the link.
    fn dest_try_complete(&mut self) {
        let ready = self
            .dest
            .as_ref()
            .is_some_and(|d| d.memory_complete && d.disks_pending == 0);
        if !ready {
            return;
        }
        let Some(mut d) = self.dest.take() else {
            return;
        };
        let report = DestinationReport {
            pager: self.pager.as_ref().map(|p| p.report()),
            disk_copies: std::mem::take(&mut d.disk_copies),
            completion: None,
        };
        let report = serde_json::to_string(&report).unwrap_or_else(|_| "{}".into());
        if let Err(e) = d.link.send(&Wire::Complete { report }) {
            log::warn!("telling the source we are complete: {}", error_chain(&e));
        }
    }
}

impl Vm {
    /// The memory source (or a disk's source) is gone for good: the VM pauses and is never run
    /// again here (its memory is incomplete), but the process stays, so that its state can be
    /// looked at: `status` says `source_lost` with the reason and the pages missing, and
    /// `read-memory` reads pages that are present. `shutdown` or a signal then ends it with
    /// exit code 3.
    pub(super) fn on_source_lost(&mut self, why: String) {
        if self.lost.is_some() {
            return;
        }
        let missing = self
            .pager
            .as_ref()
            .map_or(0, |p| p.total_pages() - p.present_pages());
        log::error!(
            "memory source lost for good: {why}; {missing} pages never arrived. The VM is paused \
             and will not run again here; its state stays inspectable over the control socket \
             (status, read-memory of present pages) until `shutdown` (exit code 3)"
        );
        self.lost = Some((why, Instant::now()));
        // A vCPU or device thread waiting for a page that will never come cannot stop (on
        // kernels before 6.2 not even a vCPU blocked inside KVM); the pause gives up on it
        // after a few seconds, and that thread stays blocked until the process ends. Nothing
        // else waits for it: the VM is never run again.
        if let Err(e) = self.pause() {
            log::warn!(
                "pausing the VM after its source was lost: {}",
                error_chain(&e)
            );
        }
    }

    /// How the VM ends now: as a lost VM (exit 3) if its source was lost.
    pub(super) fn exit_now(&self) -> Exit {
        match &self.lost {
            Some((why, _)) => Exit::SourceLost(why.clone()),
            None => Exit::Shutdown,
        }
    }

    /// The reply refusing `what` because the memory source is lost (None if it is not).
    fn lost_refusal(&self, what: &str) -> Option<Reply> {
        let (why, _) = self.lost.as_ref()?;
        Some(Reply::err(
            "state",
            format!("{what}: the memory source was lost ({why}); the VM stays paused"),
        ))
    }

    /// What a VM whose source is lost cannot do: run, be moved or saved, or have memory read
    /// that never arrived (the read would wait for ever).
    pub(super) fn refuse_while_lost(&self, req: &Request) -> Option<Reply> {
        self.lost.as_ref()?;
        let refuse = |what: &str| self.lost_refusal(what);
        match req {
            Request::Resume {} => refuse("cannot resume"),
            Request::Migrate { .. } => refuse("cannot migrate"),
            Request::Snapshot { .. } => refuse("cannot snapshot"),
            Request::Checksum {} => refuse("cannot checksum all of RAM"),
            Request::DirtyRate { .. } => refuse("cannot measure a dirty rate"),
            Request::MigrateSwitchover {} => refuse("cannot migrate"),
            Request::WriteMemory { .. } => refuse("cannot write guest memory"),
            Request::ReadMemory { gpa, len } => {
                let pager = self.pager.as_ref()?;
                let page = u64::from(crate::memory::PAGE_SIZE);
                let last = gpa.saturating_add((*len as u64).max(1) - 1);
                let all = (gpa / page..=last / page).all(|p| {
                    self.ram
                        .page_index(p * page)
                        .is_some_and(|i| pager.is_present(i))
                });
                if all {
                    None
                } else {
                    refuse("that range holds pages that never arrived")
                }
            }
            _ => None,
        }
    }
}
