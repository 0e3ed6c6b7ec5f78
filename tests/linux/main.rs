//! The Linux guest in the simulated hardware-virt host (`scripts/hwvirt-host.sh`). A test binary
//! of its own: cargo runs test binaries one after another, so these run with nothing else
//! competing for the two CPUs that L1's TCG threads keep busy.

mod l1;
