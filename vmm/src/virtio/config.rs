//! What a virtio device is attached to (its backend's configuration), as it travels with the VM,
//! and opening the backends a migration offer names on the destination.

use serde::{Deserialize, Serialize};

use super::{blk, net};

/// What a device is attached to. It travels with the VM (in the migration offer and the state),
/// so the destination opens the same backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceConfig {
    /// virtio-blk on a raw image.
    Block(blk::BlockConfig),
    /// virtio-net on a tap.
    Net(net::NetConfig),
}

impl DeviceConfig {
    /// One line for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            DeviceConfig::Block(b) => format!(
                "disk {}{}",
                b.path.display(),
                if b.readonly { " (read-only)" } else { "" }
            ),
            DeviceConfig::Net(n) => format!("net tap {} mac {}", n.tap, net::mac_string(&n.mac)),
        }
    }
}

/// A device as a migration offer names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedDevice {
    /// Its backend at the source.
    pub config: DeviceConfig,
    /// A disk's size and inode (the destination checks it opened the same file).
    pub disk: Option<blk::DiskId>,
    /// `--copy-disk`: the page-server serving the image (the disk is not shared).
    pub copy_from: Option<String>,
}
