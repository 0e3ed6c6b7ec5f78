//! The benchmarks' shared measuring code, one copy for every bench program (`fault-latency`,
//! `vm-restore`, `vm-migrate`, `vm-devices`, `vm-recovery`): the guests they boot
//! ([`guest`]), heartbeat following and process handling ([`hb`]), test images ([`image`]),
//! samples and quantiles ([`measure`]), our VMM's side of a migration ([`ours`]), QEMU's
//! ([`qemu`]), and the latency plot ([`plot`]).

pub mod guest;
pub mod hb;
pub mod image;
pub mod measure;
pub mod ours;
pub mod plot;
pub mod qemu;
