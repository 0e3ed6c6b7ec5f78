//! vCPU state on real KVM: save and restore round trips, the TSC deadline, an exit completed
//! before a save.

use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use super::cpu::{set_lapic_reg, Vcpu};
use super::msrs::{msrs_of, order_msrs, readable_msrs, MSR_TSC, MSR_TSC_DEADLINE};
use super::thread::complete_pending_io;
use crate::persist::Persist;

/// A vCPU as `Vm` makes one, on a fresh VM with an in-kernel irqchip (None: no /dev/kvm).
fn fresh_vcpu(kvm: &Kvm) -> Option<(kvm_ioctls::VmFd, Vcpu)> {
    let vm = kvm.create_vm().ok()?;
    vm.create_irq_chip().ok()?;
    let fd = vm.create_vcpu(0).ok()?;
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()?;
    crate::arch::cpuid::apply(&mut cpuid, 0, 1);
    let list = kvm.get_msr_index_list().ok()?;
    let mut v = Vcpu {
        index: 0,
        fd,
        msr_list: Vec::new(),
        cpuid: Vec::new(),
    };
    v.init_fresh(&cpuid).ok()?;
    v.msr_list = readable_msrs(&v.fd, &order_msrs(list.as_slice()));
    Some((vm, v))
}

/// /dev/kvm, a VM and a fresh vCPU for `test`, or None after printing and logging a skip.
fn vcpu_or_skip(test: &str) -> Option<(Kvm, kvm_ioctls::VmFd, Vcpu)> {
    let Ok(kvm) = Kvm::new() else {
        skip(test, "no /dev/kvm");
        return None;
    };
    let Some((vm, v)) = fresh_vcpu(&kvm) else {
        skip(test, "cannot make a vCPU");
        return None;
    };
    Some((kvm, vm, v))
}

/// A skip of `vcpu::tests::TEST`, where `.ci/run` sees it.
fn skip(test: &str, why: &str) {
    crate::testing::skip(&format!("vcpu::tests::{test}"), why);
}

/// Puts `ram` at guest address 0 and starts `v` in real mode at 0x1000 with RAX = `rax`.
fn real_mode_at(vm: &kvm_ioctls::VmFd, v: &Vcpu, ram: &crate::memory::GuestRam, rax: u64) {
    let (gpa, host, len) = ram.host_regions()[0];
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: `ram` is mapped for `len` bytes at `host`, and every caller declares it
    // before the VM, so it outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let mut sregs = v.fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    v.fd.set_sregs(&sregs).unwrap();
    let regs = kvm_regs {
        rip: 0x1000,
        rflags: 2,
        rax,
        ..Default::default()
    };
    v.fd.set_regs(&regs).unwrap();
}

/// The first port a guest writes to (`out imm8, al`), or None when it stops otherwise.
fn first_port_out(v: &mut Vcpu) -> Result<u16, String> {
    for _ in 0..100 {
        match v.fd.run() {
            Ok(VcpuExit::IoOut(port, _)) => return Ok(port),
            Ok(VcpuExit::Intr) => continue,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            other => return Err(format!("{other:?}")),
        }
    }
    Err("no exit in 100 runs".into())
}

/// A guest's RDMSR or WRMSR of a performance counter (the legacy AMD counter Linux probes,
/// and an Intel one) raises #GP: the VMM offers no PMU on any host.
#[test]
fn the_guest_gets_gp_on_performance_counter_msrs() {
    const TEST: &str = "the_guest_gets_gp_on_performance_counter_msrs";
    // rdmsr (0f 32) / wrmsr (0f 30) of ECX, then `out 0x10, al; hlt`; the #GP handler
    // (real-mode IVT vector 13 -> 0:0x2000) does `out 0x11, al; hlt`
    for (msr, op) in [(0xc001_0007u32, 0x30u8), (0xc001_0004, 0x32), (0xc1, 0x32)] {
        let ram = crate::memory::GuestRam::new(2 << 20).unwrap();
        let mut code = vec![0x66, 0xb9];
        code.extend_from_slice(&msr.to_le_bytes());
        code.extend_from_slice(&[0x66, 0x31, 0xd2, 0x0f, op, 0xe6, 0x10, 0xf4]);
        ram.write_bytes(0x1000, &code).unwrap();
        ram.write_bytes(0x2000, &[0xe6, 0x11, 0xf4]).unwrap();
        ram.write_bytes(13 * 4, &[0x00, 0x20, 0x00, 0x00]).unwrap();
        let Some((_kvm, vm, mut v)) = vcpu_or_skip(TEST) else {
            return;
        };
        if let Err(e) = crate::arch::cpuid::deny_pmu_msrs(&vm) {
            skip(TEST, &format!("KVM_X86_SET_MSR_FILTER: {e}"));
            return;
        }
        real_mode_at(&vm, &v, &ram, 0xffff);
        let port = match first_port_out(&mut v) {
            Ok(p) => p,
            Err(e) => {
                skip(
                    TEST,
                    &format!("this KVM does not run the real-mode probe: {e}"),
                );
                return;
            }
        };
        assert_eq!(
            port, 0x11,
            "MSR {msr:#x} (op 0f {op:02x}) did not raise #GP"
        );
    }
}

fn msr(fd: &VcpuFd, index: u32) -> u64 {
    let mut m = msrs_of(&[(index, 0)]).unwrap();
    assert_eq!(fd.get_msrs(&mut m).unwrap(), 1);
    m.as_slice()[0].data
}

/// Linux arms its next tick in IA32_TSC_DEADLINE; a restored vCPU must still have it armed
/// (KVM ignores the MSR until the LAPIC is in TSC-deadline mode).
#[test]
fn an_armed_tsc_deadline_survives_save_and_restore() {
    let Some((kvm, _vm, v)) = vcpu_or_skip("an_armed_tsc_deadline_survives_save_and_restore")
    else {
        return;
    };
    if !v.msr_list.contains(&MSR_TSC_DEADLINE) {
        skip(
            "an_armed_tsc_deadline_survives_save_and_restore",
            "KVM lists no TSC deadline MSR",
        );
        return;
    }
    // LAPIC software-enabled, LVTT in TSC-deadline mode (vector 0xec), deadline far ahead
    let mut lapic = v.fd.get_lapic().unwrap();
    set_lapic_reg(&mut lapic, 0xf0, 0x1ff);
    set_lapic_reg(&mut lapic, 0x320, (2 << 17) | 0xec);
    v.fd.set_lapic(&lapic).unwrap();
    let deadline = msr(&v.fd, MSR_TSC) + (1 << 40);
    v.fd.set_msrs(&msrs_of(&[(MSR_TSC_DEADLINE, deadline)]).unwrap())
        .unwrap();
    assert_eq!(
        msr(&v.fd, MSR_TSC_DEADLINE),
        deadline,
        "armed before the save"
    );
    let state = v.save().unwrap();
    let vm2 = kvm.create_vm().unwrap();
    vm2.create_irq_chip().unwrap();
    let fd2 = vm2.create_vcpu(0).unwrap();
    let restored = Vcpu::restore((0, fd2), &state).unwrap();
    assert_eq!(
        msr(&restored.fd, MSR_TSC_DEADLINE),
        deadline,
        "the restored vCPU lost its armed TSC deadline"
    );
}

/// A pause right after a port read must not leave the read half done: the saved registers
/// must hold the value read and RIP past the `IN` (KVM finishes it on the next KVM_RUN).
#[test]
fn a_pause_after_a_port_read_completes_it_before_the_state_is_saved() {
    const TEST: &str = "a_pause_after_a_port_read_completes_it_before_the_state_is_saved";
    // 2 MiB of guest RAM at 0 (declared first: it outlives the VM); real-mode code at
    // 0x1000: `in al, 0x10; hlt`.
    let ram = crate::memory::GuestRam::new(2 << 20).unwrap();
    ram.write_bytes(0x1000, &[0xe4, 0x10, 0xf4]).unwrap();
    let Some((_kvm, vm, mut v)) = vcpu_or_skip(TEST) else {
        return;
    };
    real_mode_at(&vm, &v, &ram, 0x1234_5600);
    let mut exit = None;
    for _ in 0..100 {
        match v.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                data[0] = 0xab;
                exit = Some(port);
                break;
            }
            Ok(VcpuExit::Intr) => continue,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            other => {
                skip(
                    TEST,
                    &format!("this KVM does not run the real-mode probe: {other:?}"),
                );
                return;
            }
        }
    }
    assert_eq!(exit, Some(0x10), "the guest's IN did not exit to us");
    let before = v.fd.get_regs().unwrap();
    assert_eq!(
        before.rip, 0x1000,
        "KVM moved RIP before the read completed"
    );
    complete_pending_io(&mut v);
    let after = v.fd.get_regs().unwrap();
    assert_eq!(after.rax, 0x1234_56ab, "the value read is not in AL");
    assert_eq!(
        after.rip, 0x1002,
        "RIP is not past the IN (and not past the HLT)"
    );
}
