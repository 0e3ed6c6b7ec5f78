//! virtio-net on a tap device. The guest's MAC is its own — given, or generated from an
//! administrator-owned prefix (`mac-namespace=OUI`) and the VM's id — never the host NIC's, so
//! it moves with the VM. Transmit runs inside the driver's notify; receive runs on a thread
//! that reads the tap and fills the receive queue (dropping frames while the VM is paused or
//! has no buffer). After a migration the destination announces the MAC with RARP frames
//! (like QEMU's announce-self) so bridges learn the VM's new port at once.
//!
//! `TUNSETIFF` stays a `libc::ioctl`: nix's ioctl macros only generate an unsafe function
//! around the same call. The non-blocking flag is set through `nix::fcntl`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use serde::{Deserialize, Serialize};

use super::error::VirtioError;
use super::queue::{gather, Queue, QueueError};
use crate::api::replies::NetStats;
use crate::memory::GuestRam;

/// Receive queue.
pub const RX_QUEUE: usize = 0;
/// Transmit queue.
pub const TX_QUEUE: usize = 1;
/// Feature: the device has a MAC in its config space.
const F_MAC: u64 = 1 << 5;
/// Feature: the config space has a link status.
const F_STATUS: u64 = 1 << 16;
/// Features offered (besides VERSION_1).
pub const FEATURES: u64 = F_MAC | F_STATUS;
/// virtio_net_hdr_v1 (with num_buffers), in front of every frame.
pub(super) const HDR: usize = 12;
/// Largest frame (no offloads negotiated).
const MAX_FRAME: usize = 1514 + 4;

/// `--net tap=NAME,mac=MAC` (the MAC already resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Tap interface name (the same name on every host).
    pub tap: String,
    /// The guest's MAC.
    pub mac: [u8; 6],
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why `name` cannot be a Linux interface name (1 to 15 bytes, no `/`, NUL or white space, not
/// `.` or `..`), or None when it can. A name can come from a migration peer's offer, so it is
/// checked before it reaches a path or an ifreq.
pub fn bad_tap_name(name: &str) -> Option<String> {
    let why = if name.is_empty() || name.len() > 15 {
        "1 to 15 bytes"
    } else if name == "." || name == ".." {
        "not . or .."
    } else if name
        .chars()
        .any(|c| c == '/' || c == '\0' || c.is_whitespace() || c == ':')
    {
        "no /, :, NUL or white space"
    } else {
        return None;
    };
    Some(format!(
        "tap name {name:?} is not an interface name ({why})"
    ))
}

fn parse_hex_bytes(s: &str, what: &str) -> Result<Vec<u8>, String> {
    s.split([':', '-'])
        .map(|p| {
            u8::from_str_radix(p, 16).map_err(|_| format!("{what} {s:?}: {p:?} is not a hex byte"))
        })
        .collect()
}

impl NetConfig {
    /// Parses `tap=NAME,mac=MAC` or `tap=NAME,mac-namespace=OUI` (`vm_id` names the VM for the
    /// generated MAC: prefix + the first bytes of a hash of the id).
    pub fn parse(s: &str, vm_id: &str) -> Result<NetConfig, String> {
        let (mut tap, mut mac, mut ns) = (None, None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("tap", v)) => match bad_tap_name(v) {
                    None => tap = Some(v.to_owned()),
                    Some(why) => return Err(why),
                },
                Some(("mac", v)) => mac = Some(parse_hex_bytes(v, "mac")?),
                Some(("mac-namespace", v)) => ns = Some(parse_hex_bytes(v, "mac-namespace")?),
                _ => {
                    return Err(format!(
                        "net option {kv:?} (known: tap=NAME, mac=MAC, mac-namespace=OUI)"
                    ))
                }
            }
        }
        let tap = tap.ok_or("--net needs tap=NAME")?;
        let mac = match (mac, ns) {
            (Some(_), Some(_)) => return Err("give mac= or mac-namespace=, not both".into()),
            (None, None) => return Err("--net needs mac=MAC or mac-namespace=OUI".into()),
            (Some(m), None) if m.len() == 6 => m,
            (Some(m), None) => return Err(format!("mac of {} bytes (6 needed)", m.len())),
            (None, Some(p)) if (1..=5).contains(&p.len()) => generate_mac(&p, vm_id),
            (None, Some(p)) => return Err(format!("mac-namespace of {} bytes (1 to 5)", p.len())),
        };
        if mac[0] & 1 != 0 {
            return Err(format!("{} is a multicast address", mac_string(&mac)));
        }
        if mac.iter().all(|b| *b == 0) {
            return Err("the all-zero MAC".into());
        }
        Ok(NetConfig {
            tap,
            mac: mac.try_into().unwrap_or_default(),
        })
    }
}

/// `prefix` followed by bytes of a hash of `vm_id`.
pub fn generate_mac(prefix: &[u8], vm_id: &str) -> Vec<u8> {
    let h = guest::checksum_words(vm_id.bytes().map(u64::from), guest::CHECKSUM_INIT);
    let h = h ^ (h >> 29);
    let mut m = prefix.to_vec();
    let mut i = 0;
    while m.len() < 6 {
        m.push((h >> (8 * i)) as u8);
        i += 1;
    }
    m
}

#[derive(Debug, Default, Clone)]
pub(super) struct Counters {
    pub(super) rx_frames: u64,
    pub(super) rx_bytes: u64,
    pub(super) rx_dropped: u64,
    pub(super) tx_frames: u64,
    pub(super) tx_bytes: u64,
    pub(super) tx_dropped: u64,
    pub(super) announces: u64,
}

/// An opened tap.
pub struct Net {
    cfg: NetConfig,
    tap: File,
    pub(super) counters: Counters,
}

/// What the receive thread needs.
pub struct RxParts {
    pub(super) tap: File,
    pub(super) mac: [u8; 6],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Net {
    /// Attaches to the existing tap `cfg.tap` (it must exist: a tap this VMM created would be
    /// on no bridge).
    pub fn open(cfg: &NetConfig) -> Result<Net, VirtioError> {
        let err = |what: String| VirtioError::Tap {
            name: cfg.tap.clone(),
            what,
        };
        if let Some(why) = bad_tap_name(&cfg.tap) {
            return Err(err(why));
        }
        let sys = std::path::Path::new("/sys/class/net").join(&cfg.tap);
        if !sys.exists() {
            return Err(err(format!(
                "no such interface in this network namespace (create it: ip tuntap add dev {} mode tap)",
                cfg.tap
            )));
        }
        if !sys.join("tun_flags").exists() {
            return Err(err("is not a tap device".into()));
        }
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| err(format!("open /dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..cfg.tap.len()].copy_from_slice(cfg.tap.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (40 bytes, C layout).
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(err(format!(
                "TUNSETIFF: {} (is it a tap, and not in use by another process?)",
                std::io::Error::last_os_error()
            )));
        }
        // non-blocking reads: the receive thread polls (best effort, as before)
        if let Ok(fl) = fcntl(&tun, FcntlArg::F_GETFL) {
            let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
            let _ = fcntl(&tun, FcntlArg::F_SETFL(fl));
        }
        Ok(Net {
            cfg: cfg.clone(),
            tap: tun,
            counters: Counters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub(super) fn config_space(&self) -> Vec<u8> {
        let mut c = self.cfg.mac.to_vec();
        c.extend_from_slice(&1u16.to_le_bytes()); // status: link up
        c.resize(0x10, 0);
        c
    }

    pub(super) fn rx_parts(&self) -> Result<RxParts, VirtioError> {
        Ok(RxParts {
            tap: self.tap.try_clone().map_err(|e| VirtioError::Tap {
                name: self.cfg.tap.clone(),
                what: format!("dup: {e}"),
            })?,
            mac: self.cfg.mac,
        })
    }

    pub(super) fn stats(&self) -> NetStats {
        let c = &self.counters;
        NetStats {
            tap: self.cfg.tap.clone(),
            mac: mac_string(&self.cfg.mac),
            rx_frames: c.rx_frames,
            rx_bytes: c.rx_bytes,
            rx_dropped: c.rx_dropped,
            tx_frames: c.tx_frames,
            tx_bytes: c.tx_bytes,
            tx_dropped: c.tx_dropped,
            announces: c.announces,
        }
    }

    /// Queue `q` has new buffers: transmit (tx), nothing to do for rx (the receive thread
    /// fills buffers as frames come). True if the driver should be interrupted.
    pub(super) fn notify(
        &mut self,
        q: usize,
        ram: &GuestRam,
        queues: &mut [Queue],
    ) -> Result<bool, QueueError> {
        if q != TX_QUEUE {
            return Ok(false);
        }
        let q = &mut queues[TX_QUEUE];
        let mut any = false;
        while let Some(chain) = q.pop(ram)? {
            let bytes = gather(ram, &chain.descs, HDR + 65536)?;
            if bytes.len() > HDR && bytes.len() <= HDR + MAX_FRAME {
                // a tap takes one whole frame per write
                match self.tap.write(&bytes[HDR..]) {
                    Ok(n) if n == bytes.len() - HDR => {
                        self.counters.tx_frames += 1;
                        self.counters.tx_bytes += (bytes.len() - HDR) as u64;
                    }
                    Ok(_) | Err(_) => self.counters.tx_dropped += 1,
                }
            } else {
                self.counters.tx_dropped += 1;
            }
            q.push_used(ram, chain.head, 0)?;
            any = true;
        }
        Ok(any)
    }
}

/// A RARP request announcing `mac` (what QEMU's announce-self sends).
pub fn rarp(mac: &[u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 3]); // Ethernet/IPv4, reverse request
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tap name from a migration peer is checked before it reaches /sys or an ifreq: one
    /// over 15 bytes used to panic the process, one with `/` could point outside /sys/class/net.
    #[test]
    fn peer_chosen_tap_names_are_refused_not_followed() {
        for bad in [
            "",
            "a-name-of-16-byte",
            "../../etc",
            ".",
            "..",
            "tap 0",
            "t\0x",
            "eth0:1",
        ] {
            assert!(bad_tap_name(bad).is_some(), "{bad:?}");
            let cfg = NetConfig {
                tap: bad.into(),
                mac: [0x52, 0x54, 0, 0, 0, 1],
            };
            let e = Net::open(&cfg).err().expect("refused");
            assert!(
                e.to_string().contains("not an interface name"),
                "{bad:?}: {e}"
            );
        }
        for good in ["tap0", "vm-tap.1", "a23456789012345"] {
            assert!(bad_tap_name(good).is_none(), "{good:?}");
        }
        assert!(NetConfig::parse("tap=a-name-of-16-byte,mac=52:54:00:00:00:01", "x").is_err());
    }

    #[test]
    fn mac_options() {
        let c = NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56", "x").unwrap();
        assert_eq!(c.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let a = NetConfig::parse("tap=t,mac-namespace=02:aa:bb", "vm-a").unwrap();
        let b = NetConfig::parse("tap=t,mac-namespace=02:aa:bb", "vm-b").unwrap();
        let a2 = NetConfig::parse("tap=t,mac-namespace=02:aa:bb", "vm-a").unwrap();
        assert_eq!(&a.mac[..3], &[2, 0xaa, 0xbb]);
        assert_ne!(a.mac, b.mac);
        assert_eq!(a.mac, a2.mac);
        assert!(NetConfig::parse("tap=t,mac=01:00:00:00:00:01", "x")
            .unwrap_err()
            .contains("multicast"));
        assert!(NetConfig::parse("tap=t", "x").unwrap_err().contains("mac"));
        assert!(NetConfig::parse("mac=02:00:00:00:00:01", "x")
            .unwrap_err()
            .contains("tap"));
        assert!(NetConfig::parse("tap=t,mac=zz", "x").is_err());
    }

    #[test]
    fn rarp_frame() {
        let m = [2, 0, 0, 0, 0, 7];
        let f = rarp(&m);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &m);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
    }
}
