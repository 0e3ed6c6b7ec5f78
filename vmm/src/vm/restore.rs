//! Rebuilding a VM from a snapshot in two steps: [`Prepared`] builds everything that does not
//! need the state (KVM VM, guest RAM in memory slots, vCPUs, the pager when memory is remote),
//! and [`Vm::finish`] applies the state and starts the vCPUs. Restore from a file runs both at
//! once; a migration destination runs the first before the source pauses.

use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use pager::{Pager, PagerConfig};

use super::{
    check_shape, clone_fd, console_out, device_sender, forward_stdin, set_memslots, shell,
    since_start, virtio_irq, Event, Shell, StartTimes, Vm,
};
use crate::api;
use crate::chips::Chips;
use crate::config::{RestoreConfig, RestoreMemory, SerialOut};
use crate::devices::Devices;
use crate::error::{kvm_err, VmError};
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::persist::{Persist, StateError};
use crate::state::{self, MachineConfig, Snapshot};
use crate::vcpu::Vcpu;
use crate::virtio::{Backend, VirtioDevices};

/// How guest RAM is laid out on the page-server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedAs {
    /// One flat region: a memory file (snapshot).
    Flat,
    /// The guest's own RAM ranges: a migration source's live memory.
    Ranges,
}

/// A VM shell waiting for its state.
pub struct Prepared {
    // Declared before `sh`: fields drop in order, and the pager goes before the RAM it pages.
    pager: Option<Pager>,
    sh: Shell,
    vcpu_fds: Vec<VcpuFd>,
    config: MachineConfig,
    /// Device backends opened ahead (a migration destination opens them when it checks the
    /// offer); otherwise they are opened from the state.
    pub backends: Vec<Backend>,
    /// Time spent building it.
    pub took: Duration,
}

/// Registers guest RAM with a pager fed by the page-server at `addr`.
fn connect_pager(
    ram: &GuestRam,
    addr: &transport::Addr,
    cfg: &PagerConfig,
    served: ServedAs,
) -> Result<Pager, VmError> {
    let regions: Vec<(u64, u64)> = ram
        .host_regions()
        .iter()
        .map(|&(_, host, len)| (host, len))
        .collect();
    // SAFETY: the regions are guest RAM mappings (private anonymous, page aligned) owned by
    // `ram`, which outlives the pager (dropped first by Vm::drop and by Prepared's field order).
    let mem = unsafe { pager::HostMemory::adopt(regions, PAGE_SIZE) };
    let layout = match served {
        ServedAs::Flat => proto::Layout::single(ram.bytes()),
        ServedAs::Ranges => ram.layout(),
    };
    Pager::connect_adopt(addr, mem, layout, cfg.clone()).map_err(|source| VmError::Pager {
        addr: addr.to_string(),
        source,
    })
}

impl Prepared {
    /// Builds the shell for `config`; with `remote`, connects a pager to that page-server. The
    /// memory slots go in on a second thread (the first slot of a VM costs milliseconds on some
    /// hosts) while the vCPUs are created and the pager connects.
    pub fn new(
        config: &MachineConfig,
        remote: Option<(&transport::Addr, &PagerConfig, ServedAs)>,
    ) -> Result<Prepared, VmError> {
        let t = Instant::now();
        check_shape(config.mem_bytes, config.vcpus)?;
        let sh = shell(GuestRam::restore(config.mem_bytes, &config.ram)?)?;
        // Lazy: the pager owns RAM before anything (KVM included) touches it.
        let (pager, vcpu_fds) = std::thread::scope(|scope| -> Result<_, VmError> {
            let slots = scope.spawn(|| set_memslots(&sh.fd, &sh.ram));
            let fds: Result<Vec<_>, VmError> = (0..config.vcpus)
                .map(|i| {
                    sh.fd
                        .create_vcpu(u64::from(i))
                        .map_err(kvm_err("KVM_CREATE_VCPU"))
                })
                .collect();
            let pager = match remote {
                None => Ok(None),
                Some((addr, pcfg, served)) => connect_pager(&sh.ram, addr, pcfg, served).map(Some),
            };
            slots
                .join()
                .map_err(|_| VmError::Config("the memory slot thread panicked".into()))??;
            Ok((pager?, fds?))
        })?;
        Ok(Prepared {
            sh,
            vcpu_fds,
            pager,
            config: config.clone(),
            backends: Vec::new(),
            took: t.elapsed(),
        })
    }

    /// The pager, when memory is remote.
    pub fn pager(&self) -> Option<&Pager> {
        self.pager.as_ref()
    }

    /// Waits (at most `timeout`) until the pager has every page (stop-and-copy migration).
    pub fn wait_memory(&mut self, timeout: Duration) -> Result<(), String> {
        let Some(p) = self.pager.as_mut() else {
            return Ok(());
        };
        match p.wait(timeout) {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(transport::error_chain(&e)),
            None => Err(format!(
                "{} of {} pages after {timeout:?}",
                p.present_pages(),
                p.total_pages()
            )),
        }
    }

    /// /dev/kvm.
    pub fn kvm(&self) -> &kvm_ioctls::Kvm {
        &self.sh.kvm
    }

    /// The guest TSC frequency KVM gives vCPUs here by default.
    pub fn tsc_khz(&self) -> Result<u32, VmError> {
        self.vcpu_fds[0]
            .get_tsc_khz()
            .map_err(kvm_err("KVM_GET_TSC_KHZ"))
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.sh.ram
    }
}

/// How a finished restore is wired up.
pub struct Finish<'a> {
    /// Console output.
    pub serial: &'a SerialOut,
    /// Control socket to serve (None: none, or already served on `channel`).
    pub api_socket: Option<&'a Path>,
    /// Leave the vCPUs paused.
    pub paused: bool,
    /// An event channel made (and maybe already served) by the caller.
    pub channel: Option<(Sender<Event>, Receiver<Event>)>,
    /// Read guest RAM from this file after the state is applied (eager restore).
    pub memory_file: Option<&'a Path>,
}

impl Vm {
    /// Rebuilds a VM from a snapshot (vCPUs running on return unless `paused`).
    pub fn restore(cfg: &RestoreConfig) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        let snap = state::read_file(&cfg.state)?;
        let state_read = t0.elapsed();
        log::debug!("state file read in {state_read:?}");
        let remote = match &cfg.memory {
            RestoreMemory::File(_) => None,
            RestoreMemory::Remote(addr, pcfg) => Some((addr, pcfg, ServedAs::Flat)),
        };
        let prepared = Prepared::new(&snap.config, remote)?;
        let mut vm = Vm::finish(
            prepared,
            &snap,
            Finish {
                serial: &cfg.serial,
                api_socket: cfg.api_socket.as_deref(),
                paused: cfg.paused,
                channel: None,
                memory_file: match &cfg.memory {
                    RestoreMemory::File(p) => Some(p),
                    RestoreMemory::Remote(..) => None,
                },
            },
        )?;
        vm.times.state_load += state_read;
        vm.set_security(cfg.security.clone());
        Ok(vm)
    }

    /// Applies `snap` to a prepared shell and starts the VM.
    pub fn finish(mut p: Prepared, snap: &Snapshot, f: Finish<'_>) -> Result<Vm, VmError> {
        let c = snap.config.clone();
        if c != p.config {
            return Err(StateError::Invalid(format!(
                "the state is for {c:?}, the VM was prepared for {:?}",
                p.config
            ))
            .into());
        }
        if snap.vcpus.len() != c.vcpus as usize
            || snap
                .vcpus
                .iter()
                .enumerate()
                .any(|(i, s)| s.index != i as u32)
        {
            return Err(StateError::Invalid(format!(
                "{} vCPU states (indexes {:?}) for {} vCPUs",
                snap.vcpus.len(),
                snap.vcpus.iter().map(|s| s.index).collect::<Vec<_>>(),
                c.vcpus
            ))
            .into());
        }
        let t2 = Instant::now();
        // A lazy destination asks now, in one round, for the pages KVM writes while the state
        // is applied (the kvmclock and wall-clock pages: KVM_SET_MSRS would wait for each in
        // turn, vCPU after vCPU) and right after resume (steal time, ...); they come while the
        // devices are restored.
        if let Some(pager) = &p.pager {
            let hosts: Vec<u64> = state::kvm_owned_pages(snap)
                .into_iter()
                .filter_map(|gpa| p.sh.ram.page_index(gpa))
                .filter_map(|i| pager.memory().host(proto::PageIndex(i)))
                .map(|(host, _)| host)
                .collect();
            pager.fetch_early(&hosts);
        }
        let (tx, rx) = match f.channel {
            Some(ch) => ch,
            None => std::sync::mpsc::channel(),
        };
        let sh_irq = clone_fd(&p.sh.irq)?;
        let states = &snap.devices.virtio;
        let backends = match std::mem::take(&mut p.backends) {
            b if b.len() == states.len() => b,
            _ => states
                .iter()
                .map(|s| Backend::open(&s.config))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let virtio = VirtioDevices::restore(&p.sh.ram, states, backends, virtio_irq(&p.sh.fd))?;
        let t_virtio = t2.elapsed();
        let devices = Arc::new(Devices::restore(
            &snap.devices,
            sh_irq,
            console_out(f.serial)?,
            virtio,
            device_sender(&tx),
        )?);
        Chips::restore(&p.sh.fd, &snap.vm)?;
        let t_vm = t2.elapsed();
        // Each vCPU's state on a thread of its own: a vCPU is a dozen ioctls (CPUID, MSRs,
        // XSAVE, LAPIC, ...), and this is all downtime.
        let fds = std::mem::take(&mut p.vcpu_fds);
        let vcpus = std::thread::scope(|scope| {
            let jobs: Vec<_> = snap
                .vcpus
                .iter()
                .zip(fds)
                .map(|(s, fd)| scope.spawn(move || Vcpu::restore((s.index, fd), s)))
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(StateError::Invalid("a vCPU restore thread panicked".into()))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut state_apply = t2.elapsed();
        log::debug!(
            "VM and vCPU state applied after {state_apply:?} (devices {t_virtio:?}, VM {:?}, vCPUs {:?})",
            t_vm - t_virtio,
            state_apply - t_vm
        );
        let mut memory_load = p.took;
        // Eager: the file is read after the KVM state is applied, so it also overwrites what
        // KVM itself writes into guest memory while state is set (the kvmclock page): RAM then
        // equals the file exactly.
        if let Some(path) = f.memory_file {
            let t = Instant::now();
            p.sh.ram.read_file(path)?;
            memory_load += t.elapsed();
        }
        let t3 = Instant::now();
        let Prepared { pager, sh, .. } = p;
        let mut vm = Vm::assemble(sh, devices, vcpus, tx, rx, c)?;
        vm.guest = super::GuestCpu::from_snapshot(snap);
        vm.paused_clock = Some(snap.vm.clock);
        vm.attach_pager(pager);
        if let Some(path) = f.api_socket {
            api::server::serve(path, vm.tx.clone(), Event::Control)?;
        }
        if matches!(f.serial, SerialOut::Stdout) {
            forward_stdin(vm.tx.clone());
        }
        state_apply += t3.elapsed();
        log::debug!("VM assembled after {:?}", t3.elapsed());
        if !f.paused {
            vm.resume();
        }
        vm.times = StartTimes {
            running_after: since_start(),
            state_load: state_apply,
            memory_load,
        };
        log::info!(
            "restored {} ({} vCPUs, {} MiB, memory {}): state {:.1} ms, memory {:.1} ms; {} {:.1} ms after process start",
            vm.config.boot,
            vm.config.vcpus,
            vm.config.mem_bytes >> 20,
            if vm.pager.is_some() { "lazy" } else { "eager" },
            vm.times.state_load.as_secs_f64() * 1e3,
            vm.times.memory_load.as_secs_f64() * 1e3,
            if f.paused { "paused" } else { "running" },
            vm.times.running_after.as_secs_f64() * 1e3
        );
        Ok(vm)
    }

    /// Starts forwarding the pager's events to the controller and keeps the pager.
    fn attach_pager(&mut self, pager: Option<Pager>) {
        if let Some(p) = &pager {
            if let Some(ev) = p.events() {
                let tx = self.tx.clone();
                let _ = std::thread::Builder::new()
                    .name("pager-events".into())
                    .spawn(move || {
                        for e in ev {
                            if tx.send(Event::Pager(e)).is_err() {
                                return;
                            }
                        }
                    });
            }
        }
        self.pager = pager;
    }
}
