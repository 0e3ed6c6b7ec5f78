//! Two "hosts" for migration tests: network namespaces A and B, each with a veth into a bridge
//! in a third namespace (so nothing is configured in the caller's namespace), on one private
//! subnet, optionally shaped with `tc netem` (delay, rate). Deleted on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Link shaping applied on both hosts' interfaces (each direction crosses one of them).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// One-way delay added on each side, in microseconds (RTT = 2 × this).
    pub delay_us: u32,
    /// Rate limit in Mbit/s (0: none).
    pub rate_mbit: u32,
}

/// Two namespaces on a bridge.
pub struct TwoHosts {
    pub a: String,
    pub b: String,
    br: String,
    pub ip_a: String,
    pub ip_b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TwoHosts {
    /// Creates the namespaces, or says why it cannot (not root, no iproute2).
    pub fn new(shape: Shape) -> Result<TwoHosts, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{n}", std::process::id() % 100_000);
        let sub = 100 + (std::process::id() % 50) as u8 * 2 + (n % 2) as u8;
        let h = TwoHosts {
            a: format!("ufm{tag}a"),
            b: format!("ufm{tag}b"),
            br: format!("ufm{tag}br"),
            ip_a: format!("10.{sub}.7.1"),
            ip_b: format!("10.{sub}.7.2"),
        };
        for ns in [&h.a, &h.b, &h.br] {
            ip(&["netns", "add", ns])?;
        }
        ip(&["-n", &h.br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &h.br, "link", "set", "br0", "up"])?;
        for (ns, addr, side) in [(&h.a, &h.ip_a, "a"), (&h.b, &h.ip_b, "b")] {
            let port = format!("p{side}");
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                &h.br,
            ])?;
            ip(&["-n", &h.br, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            if shape.delay_us > 0 || shape.rate_mbit > 0 {
                let mut args: Vec<String> = ["netns", "exec", ns, "tc", "qdisc", "add", "dev"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                args.extend(["eth0", "root", "netem"].map(String::from));
                if shape.delay_us > 0 {
                    args.extend(["delay".into(), format!("{}us", shape.delay_us)]);
                }
                if shape.rate_mbit > 0 {
                    args.extend(["rate".into(), format!("{}mbit", shape.rate_mbit)]);
                    // room for a bandwidth-delay product of queued packets
                    args.extend(["limit".into(), "100000".into()]);
                }
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                ip(&a)?;
            }
        }
        Ok(h)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.br] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
