//! One vCPU: its initial setup (CPUID, registers, LAPIC) and its complete state, saved and
//! restored ([`Persist`]).

use std::time::Instant;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;

use super::msrs::{kvm, msrs_of, set_msrs_one_by_one, MSR_TSC_DEADLINE};
use crate::persist::{Persist, StateError};
use crate::state::VcpuState;

/// A vCPU and the MSR list it saves.
pub struct Vcpu {
    /// vCPU index (= APIC id).
    pub index: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// MSRs saved for this vCPU, in restore order.
    pub msr_list: Vec<u32>,
    /// The CPUID this vCPU was given. Saved as is: KVM_GET_CPUID2 may not return what was set
    /// (under PVM it reports the host's full feature set), and a migration destination checks
    /// what the guest really saw.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

impl Vcpu {
    /// Initial state for a fresh boot (any vCPU): CPUID, FPU defaults, LAPIC
    /// LINT0 = ExtINT / LINT1 = NMI, a few MSRs firmware would set.
    pub fn init_fresh(&mut self, cpuid: &CpuId) -> Result<(), StateError> {
        self.fd.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        self.cpuid = cpuid.as_slice().to_vec();
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
        // IA32_MISC_ENABLE: fast strings; MTRR default type: write-back, enabled.
        let m = msrs_of(&[(0x1a0, 1), (0x2ff, (1 << 11) | 6)])?;
        self.fd.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
        let mut lapic = self.fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        set_lapic_reg(&mut lapic, 0x350, 0x700); // LINT0: ExtINT
        set_lapic_reg(&mut lapic, 0x360, 0x400); // LINT1: NMI
        self.fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Sets the boot registers (the BSP of a fresh boot).
    pub fn set_boot_regs(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<(), StateError> {
        self.fd.set_sregs(sregs).map_err(kvm("KVM_SET_SREGS"))?;
        self.fd.set_regs(regs).map_err(kvm("KVM_SET_REGS"))?;
        Ok(())
    }
}

pub(super) fn set_lapic_reg(l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Args = (u32, VcpuFd);
    type Error = StateError;

    fn save(&self) -> Result<VcpuState, StateError> {
        let fd = &self.fd;
        // mp_state first: KVM folds pending events into it.
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let vcpu_events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let tsc_khz = fd.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
        let cpuid = self.cpuid.clone();
        let mut msrs = msrs_of(&self.msr_list.iter().map(|&i| (i, 0)).collect::<Vec<_>>())?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if n != self.msr_list.len() {
            return Err(StateError::Msrs {
                op: "KVM_GET_MSRS",
                done: n,
                want: self.msr_list.len(),
                index: self.msr_list[n],
            });
        }
        Ok(VcpuState {
            index: self.index,
            cpuid,
            regs,
            sregs,
            xsave,
            xcrs,
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            lapic,
            vcpu_events,
            mp_state,
            debugregs,
            tsc_khz,
        })
    }

    fn restore((index, fd): Self::Args, s: &VcpuState) -> Result<Vcpu, StateError> {
        if s.index != index {
            return Err(StateError::Invalid(format!(
                "vCPU {index} given the state of vCPU {}",
                s.index
            )));
        }
        let t0 = Instant::now();
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|e| StateError::Invalid(format!("CPUID: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        let t_cpuid = t0.elapsed();
        if let Err(e) = fd.set_tsc_khz(s.tsc_khz) {
            // Same-host restores keep the frequency; a host that cannot scale is an error only
            // when the frequency differs.
            let here = fd.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
            if here != s.tsc_khz {
                return Err(StateError::Kvm {
                    op: "KVM_SET_TSC_KHZ",
                    source: e,
                });
            }
        }
        let t_tsc = t0.elapsed();
        fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: s.xsave is a kvm_xsave of the size KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        let t_regs = t0.elapsed();
        let n = if log::log_enabled!(log::Level::Trace) {
            set_msrs_one_by_one(index, &fd, &s.msrs)?
        } else {
            fd.set_msrs(&msrs_of(&s.msrs)?)
                .map_err(kvm("KVM_SET_MSRS"))?
        };
        let t_msrs = t0.elapsed();
        if n != s.msrs.len() {
            return Err(StateError::Msrs {
                op: "KVM_SET_MSRS",
                done: n,
                want: s.msrs.len(),
                index: s.msrs[n].0,
            });
        }
        fd.set_debug_regs(&s.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        // The TSC deadline once more, now that the LAPIC is in TSC-deadline mode: KVM ignores
        // the MSR while LVTT is in another mode (a fresh vCPU's) and KVM_SET_LAPIC clears it
        // when the mode changes, so the guest's armed timer (Linux's next tick) would be lost
        // and a tickless CPU would wait for any other interrupt to wake it.
        if let Some(&d) = s.msrs.iter().find(|m| m.0 == MSR_TSC_DEADLINE) {
            let n = fd
                .set_msrs(&msrs_of(&[d])?)
                .map_err(kvm("KVM_SET_MSRS (TSC deadline)"))?;
            if n != 1 {
                return Err(StateError::Msrs {
                    op: "KVM_SET_MSRS (TSC deadline)",
                    done: n,
                    want: 1,
                    index: d.0,
                });
            }
        }
        fd.set_mp_state(s.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_vcpu_events(&s.vcpu_events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        log::debug!(
            "vcpu{index} restored in {:?}: CPUID {t_cpuid:?}, TSC kHz {:?}, registers and XSAVE {:?}, {} MSRs {:?}, the rest (debug regs, LAPIC, TSC deadline, MP state, events) {:?}",
            t0.elapsed(),
            t_tsc - t_cpuid,
            t_regs - t_tsc,
            s.msrs.len(),
            t_msrs - t_regs,
            t0.elapsed() - t_msrs
        );
        Ok(Vcpu {
            index,
            fd,
            msr_list: s.msrs.iter().map(|m| m.0).collect(),
            cpuid: s.cpuid.clone(),
        })
    }
}
