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

/// Where the destination finds a disk: `map` renames source paths (`--disk-map FROM=TO`).
pub fn mapped_path(path: &std::path::Path, map: &[(PathBuf, PathBuf)]) -> PathBuf {
    map.iter()
        .find(|(from, _)| from == path)
        .map(|(_, to)| to.clone())
        .unwrap_or_else(|| path.to_owned())
}

/// Opens, on a migration destination, the backends an offer names, and checks each disk is the
/// source's file. `map` renames disk paths, `taps` tap names (`--tap-map FROM=TO`, e.g. for a
/// migration between two VMMs on one host). The error says which device and why (the offer is
/// then refused).
pub fn open_offered(
    devs: &[OfferedDevice],
    map: &[(PathBuf, PathBuf)],
    taps: &[(String, String)],
    security: &transport::Security,
) -> Result<Vec<Backend>, VirtioError> {
    let mut out = Vec::new();
    for d in devs {
        out.push(match &d.config {
            DeviceConfig::Block(b) => {
                let mapped = map.iter().any(|(from, _)| *from == b.path);
                let cfg = blk::BlockConfig {
                    path: mapped_path(&b.path, map),
                    readonly: b.readonly,
                };
                let disk = match &d.copy_from {
                    Some(addr) => blk::Block::copy_in(&cfg, d.disk.as_ref(), addr, security)?,
                    None => {
                        // a path only the peer named: an image file, never a device
                        let disk = blk::Block::open_checked(&cfg, !mapped)?;
                        if let Some(id) = &d.disk {
                            disk.check_same(id)?;
                        }
                        disk
                    }
                };
                Backend::Block(disk)
            }
            DeviceConfig::Net(n) => {
                let tap = taps
                    .iter()
                    .find(|(from, _)| *from == n.tap)
                    .map_or_else(|| n.tap.clone(), |(_, to)| to.clone());
                Backend::Net(net::Net::open(&net::NetConfig { tap, mac: n.mac })?)
            }
        });
    }
    Ok(out)
}
