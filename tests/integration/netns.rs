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
    /// [`TwoHosts::lan`]: the client namespace (on the same bridge).
    pub c: String,
    /// The client's address.
    pub ip_c: String,
    /// The address a guest on the hosts' taps should take.
    pub ip_guest: String,
    /// The shape's delay is applied (`tc netem`; some kernels lack it: then only the rate is,
    /// with `tbf`).
    pub delayed: bool,
}

/// Shapes `eth0` of namespace `ns`: `netem` (delay and rate) where the kernel has it, else the
/// rate alone with `tbf`. Returns whether the delay is applied.
fn shape_link(ns: &str, shape: Shape) -> Result<bool, String> {
    let mut args: Vec<String> = ["netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let base = args.clone();
    args.extend(["root", "netem"].map(String::from));
    if shape.delay_us > 0 {
        args.extend(["delay".into(), format!("{}us", shape.delay_us)]);
    }
    if shape.rate_mbit > 0 {
        args.extend(["rate".into(), format!("{}mbit", shape.rate_mbit)]);
        // room for a bandwidth-delay product of queued packets
        args.extend(["limit".into(), "100000".into()]);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match ip(&a) {
        Ok(()) => Ok(true),
        Err(e) if e.contains("qdisc kind is unknown") => {
            if shape.rate_mbit > 0 {
                let mut args = base;
                args.extend(["root", "tbf", "rate"].map(String::from));
                args.push(format!("{}mbit", shape.rate_mbit));
                args.extend(["burst", "256kb", "latency", "50ms"].map(String::from));
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                ip(&a)?;
            }
            Ok(shape.delay_us == 0)
        }
        Err(e) => Err(e),
    }
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

/// `ip -n NS ARGS...`, which must succeed (a test's own namespace).
pub fn ip_in(ns: &str, args: &[&str]) {
    let mut v = vec!["-n", ns];
    v.extend_from_slice(args);
    ip(&v).unwrap_or_else(|e| panic!("{e}"));
}

impl TwoHosts {
    /// Creates the namespaces, or says why it cannot (not root, no iproute2).
    pub fn new(shape: Shape) -> Result<TwoHosts, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{n}", std::process::id() % 100_000);
        let sub = 100 + (std::process::id() % 50) as u8 * 2 + (n % 2) as u8;
        let mut h = TwoHosts {
            a: format!("ufm{tag}a"),
            b: format!("ufm{tag}b"),
            br: format!("ufm{tag}br"),
            ip_a: format!("10.{sub}.7.1"),
            ip_b: format!("10.{sub}.7.2"),
            c: String::new(),
            ip_c: format!("10.{sub}.7.100"),
            ip_guest: format!("10.{sub}.7.50"),
            delayed: true,
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
                h.delayed = shape_link(ns, shape)?;
            }
        }
        Ok(h)
    }

    /// [`TwoHosts::new`] plus what a VM's NIC needs: in each host a bridge `br0` holding `eth0`
    /// (the host's address moves to `br0`) and a tap `tap0` for the VM, and a third namespace
    /// `c` for a client, all on one subnet (the bridges learn where the guest's MAC is).
    pub fn lan(shape: Shape) -> Result<TwoHosts, String> {
        let mut h = TwoHosts::new(shape)?;
        for (ns, addr) in [(&h.a, &h.ip_a), (&h.b, &h.ip_b)] {
            let cidr = format!("{addr}/24");
            ip(&["-n", ns, "addr", "del", &cidr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", ns, "link", "set", "eth0", "master", "br0"])?;
            ip(&["-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
            ip(&["-n", ns, "link", "set", "tap0", "master", "br0", "up"])?;
            ip(&["-n", ns, "addr", "add", &cidr, "dev", "br0"])?;
            ip(&["-n", ns, "link", "set", "br0", "up"])?;
        }
        h.c = h.br.replace("br", "c");
        ip(&["netns", "add", &h.c])?;
        ip(&[
            "link", "add", "eth0", "netns", &h.c, "type", "veth", "peer", "name", "pc", "netns",
            &h.br,
        ])?;
        ip(&["-n", &h.br, "link", "set", "pc", "master", "br0", "up"])?;
        let cidr = format!("{}/24", h.ip_c);
        ip(&["-n", &h.c, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &h.c, "link", "set", "eth0", "up"])?;
        ip(&["-n", &h.c, "link", "set", "lo", "up"])?;
        Ok(h)
    }

    /// Runs `f` on a thread that lives in namespace `ns` (sockets it opens are there).
    pub fn in_netns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T, String>> {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: setns on this thread only, with a namespace fd we hold open.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.br, &self.c] {
            if !ns.is_empty() {
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }
}
