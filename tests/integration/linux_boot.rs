//! Linux boot through `vmm run --kernel` (early boot here; full boot where the host KVM runs
//! guest kernel code natively).
