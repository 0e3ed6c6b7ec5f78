//! A device's backend (a disk image, a tap) opened on this host, and opening the ones a
//! migration offer names on the destination.

use std::path::PathBuf;

use super::config::{DeviceConfig, OfferedDevice};
use super::error::VirtioError;
use super::{blk, net};

/// Feature bit: virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;

/// An opened backend, ready to be attached to a transport.
pub enum Backend {
    /// A disk.
    Block(blk::Block),
    /// A NIC.
    Net(net::Net),
}

impl Backend {
    /// Opens `cfg`'s backend on this host.
    pub fn open(cfg: &DeviceConfig) -> Result<Backend, VirtioError> {
        Ok(match cfg {
            DeviceConfig::Block(b) => Backend::Block(blk::Block::open(b)?),
            DeviceConfig::Net(n) => Backend::Net(net::Net::open(n)?),
        })
    }

    pub(super) fn config(&self) -> DeviceConfig {
        match self {
            Backend::Block(b) => DeviceConfig::Block(b.config().clone()),
            Backend::Net(n) => DeviceConfig::Net(n.config().clone()),
        }
    }

    pub(super) fn device_id(&self) -> u32 {
        match self {
            Backend::Block(_) => 2,
            Backend::Net(_) => 1,
        }
    }

    pub(super) fn features(&self) -> u64 {
        F_VERSION_1
            | match self {
                Backend::Block(b) => b.features(),
                Backend::Net(_) => net::FEATURES,
            }
    }

    pub(super) fn queues(&self) -> usize {
        match self {
            Backend::Block(_) => 1,
            Backend::Net(_) => 2,
        }
    }

    pub(super) fn read_config(&self, off: u64, data: &mut [u8]) {
        let cfg = match self {
            Backend::Block(b) => b.config_space(),
            Backend::Net(n) => n.config_space(),
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = cfg.get(off as usize + i).copied().unwrap_or(0);
        }
    }
}

/// Opens, on a migration destination, the backends for the devices an offer lists, and checks
/// each disk is the source's file. The destination owns its backends: every disk must be in
/// `map` (`--disk-map SRC=LOCAL`) and every NIC's tap in `taps` (`--tap-map SRC=LOCAL`); a
/// device without one is refused, so nothing is opened, created or attached at a name the
/// peer chose. The error says which device and why (logged here; the offer is refused).
pub fn open_offered(
    devs: &[OfferedDevice],
    map: &[(PathBuf, PathBuf)],
    taps: &[(String, String)],
    security: &transport::Security,
) -> Result<Vec<Backend>, VirtioError> {
    let mut out = Vec::new();
    for (i, d) in devs.iter().enumerate() {
        out.push(match &d.config {
            DeviceConfig::Block(b) => {
                let Some((_, local)) = map.iter().find(|(from, _)| *from == b.path) else {
                    return Err(VirtioError::Config(format!(
                        "device {i}: the source's disk {} has no --disk-map here (this host opens only the disks its operator names: --disk-map SRC=LOCAL, or --disk-map PATH for shared storage)",
                        b.path.display()
                    )));
                };
                let cfg = blk::BlockConfig {
                    path: local.clone(),
                    readonly: b.readonly,
                };
                let disk = match &d.copy_from {
                    Some(addr) => blk::Block::copy_in(&cfg, d.disk.as_ref(), addr, security)?,
                    None => {
                        let disk = blk::Block::open(&cfg)?;
                        if let Some(id) = &d.disk {
                            disk.check_same(id)?;
                        }
                        disk
                    }
                };
                Backend::Block(disk)
            }
            DeviceConfig::Net(n) => {
                let Some((_, tap)) = taps.iter().find(|(from, _)| *from == n.tap) else {
                    return Err(VirtioError::Config(format!(
                        "device {i}: the source's tap {:?} has no --tap-map here (this host attaches only the taps its operator names: --tap-map SRC=LOCAL, or --tap-map NAME)",
                        n.tap
                    )));
                };
                let tap = tap.clone();
                Backend::Net(net::Net::open(&net::NetConfig { tap, mac: n.mac })?)
            }
        });
    }
    Ok(out)
}
