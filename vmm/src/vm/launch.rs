//! Launching a VM from a kernel image: our guest (PVH) or Linux (bzImage, boot params, ACPI),
//! with its devices, then running.

use std::sync::Arc;

use super::{
    check_shape, clone_fd, console_out, device_sender, forward_stdin, set_memslots, shell,
    since_start, virtio_irq, Event, GuestCpu, Vm,
};
use crate::api;
use crate::arch::boot::{self, BootError};
use crate::config::{BootSource, RunConfig, SerialOut};
use crate::devices::{Console, Devices};
use crate::error::{kvm_err, VmError};
use crate::memory::GuestRam;
use crate::persist::Persist;
use crate::state::MachineConfig;
use crate::vcpu::{self, Vcpu};
use crate::virtio::{Backend, VirtioDevices};

impl Vm {
    /// Builds and boots a fresh VM (vCPUs running on return).
    pub fn boot(cfg: &RunConfig) -> Result<Vm, VmError> {
        check_shape(cfg.mem_bytes, cfg.vcpus)?;
        let sh = shell(GuestRam::new(cfg.mem_bytes)?)?;
        set_memslots(&sh.fd, &sh.ram)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let backends = cfg
            .devices
            .iter()
            .map(Backend::open)
            .collect::<Result<Vec<_>, _>>()?;
        let virtio = VirtioDevices::new(&sh.ram, backends, virtio_irq(&sh.fd))?;
        let windows = virtio.windows();
        let devices = Arc::new(Devices::new(
            Console::new(clone_fd(&sh.irq)?, console_out(&cfg.serial)?),
            virtio,
            device_sender(&tx),
        ));
        let supported = sh
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_index = sh
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut vcpus = Vec::new();
        let mut msr_list = Vec::new();
        let mut guest_cpu = GuestCpu::default();
        for i in 0..cfg.vcpus {
            let fd = sh
                .fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            crate::arch::cpuid::apply(&mut cpuid, i, cfg.vcpus);
            let mut v = Vcpu {
                index: i,
                fd,
                msr_list: Vec::new(),
                cpuid: Vec::new(),
            };
            v.init_fresh(&cpuid)?;
            if i == 0 {
                msr_list = vcpu::readable_msrs(&v.fd, &vcpu::order_msrs(msr_index.as_slice()));
                log::debug!("saving {} MSRs per vCPU", msr_list.len());
                guest_cpu = GuestCpu {
                    cpuid: cpuid.as_slice().to_vec(),
                    msrs: msr_list.clone(),
                    tsc_khz: v.fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?,
                };
            }
            v.msr_list = msr_list.clone();
            vcpus.push(v);
        }
        let base = vcpus[0].fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let (setup, what) = match &cfg.boot {
            BootSource::Guest { elf, cmdline } => {
                let (bytes, what) = match elf {
                    None => (guest::ELF.to_vec(), "embedded guest".to_owned()),
                    Some(p) => (
                        std::fs::read(p).map_err(|source| BootError::Read {
                            path: p.display().to_string(),
                            source,
                        })?,
                        p.display().to_string(),
                    ),
                };
                let mut line = cmdline.clone();
                if elf.is_none() && !line.split(' ').any(|w| w.starts_with("cpus=")) {
                    line = format!("cpus={} {line}", cfg.vcpus).trim().to_owned();
                }
                (boot::load_pvh(&sh.ram, &bytes, &what, &line, base)?, what)
            }
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => (
                crate::arch::linux::load(
                    &sh.ram,
                    kernel,
                    initrd.as_deref(),
                    &linux_cmdline(cmdline, &windows),
                    cfg.vcpus,
                    &windows,
                    base,
                )?,
                kernel.display().to_string(),
            ),
        };
        vcpus[0].set_boot_regs(&setup.regs, &setup.sregs)?;
        let config = MachineConfig {
            mem_bytes: cfg.mem_bytes,
            vcpus: cfg.vcpus,
            ram: sh.ram.save()?,
            boot: what,
        };
        let mut vm = Vm::assemble(sh, devices, vcpus, tx, rx, config)?;
        vm.guest = guest_cpu;
        vm.set_security(cfg.security.clone());
        if let Some(p) = &cfg.api_socket {
            api::server::serve(p, vm.tx.clone(), Event::Control)?;
        }
        if matches!(cfg.serial, SerialOut::Stdout) {
            forward_stdin(vm.tx.clone());
        }
        vm.resume();
        vm.times.running_after = since_start();
        log::info!(
            "booted {} with {} vCPUs, {} MiB; running {:.1} ms after process start",
            vm.config.boot,
            vm.config.vcpus,
            vm.config.mem_bytes >> 20,
            vm.times.running_after.as_secs_f64() * 1e3
        );
        Ok(vm)
    }
}

/// The Linux command line. The virtio-mmio devices are in the DSDT (ACPI id `LNRO0005`, which
/// stock distro kernels bind); only a kernel told `acpi=off` also gets them as
/// `virtio_mmio.device=4K@ADDR:GSI` (it needs `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`). Both at
/// once would make Linux probe each device twice, the second time failing on a busy region.
fn linux_cmdline(base: &str, windows: &[(u64, u32)]) -> String {
    let mut s = base.to_owned();
    if base.split_whitespace().any(|w| w == "acpi=off") {
        for (addr, gsi) in windows {
            s.push_str(&format!(" virtio_mmio.device=4K@{addr:#x}:{gsi}"));
        }
    }
    s
}
