//! The VM-level devices KVM emulates in the kernel: the two 8259 PICs, the IOAPIC, the i8254
//! PIT, and kvmclock. Their state ([`VmState`]) is saved and restored through the VM's fd.

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use crate::persist::{Persist, StateError};
use crate::state::VmState;

/// A VM's in-kernel chips, reached through its fd.
pub struct Chips<'a>(pub &'a VmFd);

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, source }
}

impl<'a> Persist for Chips<'a> {
    type State = VmState;
    /// The VM whose chips these are (with its irqchip and PIT created).
    type Args = &'a VmFd;
    type Error = StateError;

    fn save(&self) -> Result<VmState, StateError> {
        let fd = self.0;
        let mut pic_master = chip(KVM_IRQCHIP_PIC_MASTER);
        let mut pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE);
        let mut ioapic = chip(KVM_IRQCHIP_IOAPIC);
        for c in [&mut pic_master, &mut pic_slave, &mut ioapic] {
            fd.get_irqchip(c).map_err(kvm("KVM_GET_IRQCHIP"))?;
        }
        Ok(VmState {
            pit: fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            pic_master,
            pic_slave,
            ioapic,
            clock: fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    fn restore(fd: &'a VmFd, s: &VmState) -> Result<Chips<'a>, StateError> {
        fd.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
        // Guest time continues from the snapshot (no jump for the time it was saved).
        let mut clock = s.clock;
        clock.flags = 0;
        fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            fd.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(Chips(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with its in-kernel chips, or None (no /dev/kvm: the test prints `SKIPPED`).
    fn vm_with_chips(kvm: &kvm_ioctls::Kvm) -> Option<VmFd> {
        let vm = kvm.create_vm().ok()?;
        vm.create_irq_chip().ok()?;
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .ok()?;
        Some(vm)
    }

    #[test]
    fn chips_round_trip_through_a_second_vm() {
        let Some((a, b)) = kvm_ioctls::Kvm::new()
            .ok()
            .and_then(|k| Some((vm_with_chips(&k)?, vm_with_chips(&k)?)))
        else {
            crate::testing::skip(
                "chips::tests::chips_round_trip_through_a_second_vm",
                "no /dev/kvm",
            );
            return;
        };
        // something to carry over: an IOAPIC redirection entry and a PIC mask
        let mut s = Chips(&a).save().unwrap();
        // SAFETY: reading and writing plain-data members of the union KVM filled in for this
        // chip id (IOAPIC, PIC master).
        unsafe {
            s.ioapic.chip.ioapic.redirtbl[3].bits = 0x1_0000 | 0x31;
            s.pic_master.chip.pic.imr = 0xfa;
        }
        Chips::restore(&a, &s).unwrap();
        let saved = Chips(&a).save().unwrap();
        Chips::restore(&b, &saved).unwrap();
        let again = Chips(&b).save().unwrap();
        // SAFETY: as above, reads of the members KVM filled in.
        unsafe {
            assert_eq!(again.ioapic.chip.ioapic.redirtbl[3].bits, 0x1_0000 | 0x31);
            assert_eq!(again.pic_master.chip.pic.imr, 0xfa);
            assert_eq!(again.pic_slave.chip.pic.imr, saved.pic_slave.chip.pic.imr);
        }
        assert_eq!(again.pit.channels[0].mode, saved.pit.channels[0].mode);
        // kvmclock goes on from the saved value (within the time the test took)
        assert!(again.clock.clock >= saved.clock.clock);
        assert!(again.clock.clock - saved.clock.clock < 5_000_000_000);
    }
}
