//! The complete non-memory state of a VM and its file / wire form.
//!
//! Every component keeps its saved state next to it behind [`Persist`]
//! (no default methods: a component that forgets its state does not compile).
//! Live resources (guest memory, file descriptors, the console's output)
//! come in as restore arguments, never inside the state.
//!
//! Envelope: one `proto` frame of kind `State` (magic, protocol version,
//! length checked against the frame cap before anything is read, CRC32 over
//! the blob). The blob starts with [`STATE_VERSION`] (u32 LE), then the
//! postcard encoding of [`Snapshot`]. A reader refuses another version.

use std::io::Read;
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use proto::{HEADER_LEN, MAX_PAYLOAD_BYTES};
use serde::{Deserialize, Deserializer, Serialize};

use crate::devices::DevicesState;
use crate::envelope::{self, EnvelopeError};
use crate::persist::StateError;

/// Largest vCPU count (our guest's limit, and the xAPIC id space we use).
pub const MAX_VCPUS: u32 = 16;

/// Version of the [`Snapshot`] encoding.
pub const STATE_VERSION: u32 = 2;

/// One vCPU's complete state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC id).
    pub index: u32,
    /// CPUID as set on the vCPU.
    #[serde(deserialize_with = "cpuid_capped")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU / SSE / AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Every MSR KVM reports as saveable and could read, `(index, value)`.
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC registers (incl. timer).
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMI, SMI.
    pub vcpu_events: kvm_vcpu_events,
    /// Runnable / halted / waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Guest TSC frequency.
    pub tsc_khz: u32,
}

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// i8254 (PIT2).
    pub pit: kvm_pit_state2,
    /// 8259 master.
    pub pic_master: kvm_irqchip,
    /// 8259 slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// What the VM is made of (rebuilt before the state is applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM ranges `(gpa, bytes)`.
    pub ram: Vec<(u64, u64)>,
    /// What was booted (for `status`).
    pub boot: String,
}

/// Everything but memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Machine shape.
    pub config: MachineConfig,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Per vCPU, in index order.
    #[serde(deserialize_with = "vcpus_capped")]
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DevicesState,
}

/// A sequence of at most `max` elements: refused from its length prefix, before anything is
/// allocated. kvm-bindings decodes each KVM struct from a byte string of any length (it
/// zero-fills), so one `VcpuState` (~6 KiB) costs as little as 12 bytes of input, and an
/// envelope within the frame cap could otherwise decode into gigabytes.
fn capped<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    use serde::de::{Error, SeqAccess, Visitor};
    struct Capped<T>(usize, &'static str, std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Capped<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {} {}", self.0, self.1)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            if let Some(n) = seq.size_hint().filter(|&n| n > self.0) {
                return Err(A::Error::invalid_length(n, &self));
            }
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(e) = seq.next_element()? {
                if v.len() == self.0 {
                    return Err(A::Error::invalid_length(v.len() + 1, &self));
                }
                v.push(e);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Capped(max, what, std::marker::PhantomData))
}

fn vcpus_capped<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<VcpuState>, D::Error> {
    capped(d, MAX_VCPUS as usize, "vCPU states")
}

pub(crate) fn cpuid_capped<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<kvm_cpuid_entry2>, D::Error> {
    capped(d, kvm_bindings::KVM_MAX_CPUID_ENTRIES, "CPUID entries")
}

/// KVM paravirtual MSRs whose value is a guest-physical address KVM writes to, enabled by bit 0:
/// kvmclock (old and new), async page faults, steal time, PV EOI.
const KVM_PV_AREA_MSRS: &[u32] = &[0x12, 0x4b56_4d01, 0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04];

/// KVM's wall-clock MSRs (old and new): the value is a guest-physical address (no enable bit)
/// that KVM writes the host's wall clock to on every write of the MSR, restores included.
const KVM_WALL_CLOCK_MSRS: &[u32] = &[0x11, 0x4b56_4d00];

/// Guest pages KVM itself writes (kvmclock, the wall clock, steal time, ...), from the vCPUs' PV
/// MSRs: their content legitimately differs between a source and a destination (KVM rewrites
/// them when the state is applied), so RAM comparisons leave them out; and a lazy destination
/// fetches them before it applies the vCPUs' state, whose KVM_SET_MSRS would otherwise wait
/// for each of them in turn (in the simulated host: 1-6 ms each, most of the vCPU restore).
pub fn kvm_owned_pages(s: &Snapshot) -> Vec<u64> {
    let mut v: Vec<u64> = s
        .vcpus
        .iter()
        .flat_map(|c| c.msrs.iter())
        .filter(|(i, val)| {
            (KVM_PV_AREA_MSRS.contains(i) && val & 1 != 0)
                || (KVM_WALL_CLOCK_MSRS.contains(i) && *val != 0)
        })
        .map(|(_, val)| val & !0xfff)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Encodes a snapshot into its envelope (one State frame).
pub fn encode(s: &Snapshot) -> Result<Vec<u8>, StateError> {
    envelope::seal(STATE_VERSION, s, MAX_PAYLOAD_BYTES as usize - 4).map_err(|e| match e {
        EnvelopeError::TooLarge { bytes } => {
            StateError::Invalid(format!("state of {bytes} bytes exceeds the frame cap"))
        }
        EnvelopeError::Encode(e) => StateError::Decode(e),
        other => StateError::Invalid(other.to_string()),
    })
}

/// Decodes an envelope.
pub fn decode(bytes: &[u8], path: &str) -> Result<Snapshot, StateError> {
    envelope::open(bytes, STATE_VERSION).map_err(|e| match e {
        EnvelopeError::Frame(source) => StateError::Frame {
            path: path.to_owned(),
            source,
        },
        EnvelopeError::Trailing(extra) => StateError::Trailing {
            path: path.to_owned(),
            extra,
        },
        EnvelopeError::NotState(kind) => {
            StateError::Invalid(format!("{path}: frame is a {kind:?}, not a state frame"))
        }
        EnvelopeError::Empty => StateError::Invalid(format!("{path}: empty state blob")),
        EnvelopeError::Version { found } => StateError::Version {
            found,
            supported: STATE_VERSION,
        },
        EnvelopeError::Decode(e) => StateError::Decode(e),
        EnvelopeError::Left(n) => {
            StateError::Invalid(format!("{path}: {n} bytes after the snapshot in the blob"))
        }
        other => StateError::Invalid(format!("{path}: {other}")),
    })
}

/// Writes a snapshot's envelope to `path`.
pub fn write_file(s: &Snapshot, path: &Path) -> Result<u64, StateError> {
    let bytes = encode(s)?;
    let io = |source| StateError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = transport::create_private(path).map_err(io)?;
    if let Err(e) = std::io::Write::write_all(&mut f, &bytes).and_then(|()| f.sync_all()) {
        // ours (created new): a partial state file is not left behind
        let _ = std::fs::remove_file(path);
        return Err(io(e));
    }
    Ok(bytes.len() as u64)
}

/// Reads a snapshot from `path`, checking its size against the cap first.
pub fn read_file(path: &Path) -> Result<Snapshot, StateError> {
    let p = path.display().to_string();
    let io = |source| StateError::Io {
        path: p.clone(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let cap = (HEADER_LEN as u64) + u64::from(MAX_PAYLOAD_BYTES);
    if len > cap {
        return Err(StateError::TooLarge { path: p, len, cap });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(cap).read_to_end(&mut bytes).map_err(io)?;
    decode(&bytes, &p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{ConsoleState, I8042};
    use proto::Message;

    fn sample() -> Snapshot {
        Snapshot {
            config: MachineConfig {
                mem_bytes: 64 << 20,
                vcpus: 1,
                ram: vec![(0, 64 << 20)],
                boot: "test".into(),
            },
            vm: VmState {
                pit: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![VcpuState {
                index: 0,
                cpuid: vec![Default::default()],
                regs: kvm_regs {
                    rip: 0x1234,
                    ..Default::default()
                },
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                msrs: vec![(0x10, 99)],
                lapic: Default::default(),
                vcpu_events: Default::default(),
                mp_state: Default::default(),
                debugregs: Default::default(),
                tsc_khz: 2_000_000,
            }],
            devices: DevicesState {
                console: ConsoleState {
                    in_buffer: b"q".to_vec(),
                    ..ConsoleState::default()
                },
                i8042: I8042::default(),
                virtio: vec![crate::virtio::TransportState {
                    slot: 0,
                    regs: crate::virtio::Regs {
                        status: 15,
                        driver_features: crate::virtio::F_VERSION_1,
                        ..Default::default()
                    },
                    queues: vec![crate::virtio::queue::Queue {
                        size: 16,
                        ready: true,
                        desc: 0x10_0000,
                        avail: 0x10_1000,
                        used: 0x10_2000,
                        next_avail: 7,
                        next_used: 7,
                    }],
                    config: crate::virtio::DeviceConfig::Block(crate::virtio::blk::BlockConfig {
                        path: "/srv/disk.img".into(),
                        readonly: false,
                    }),
                    backend: crate::virtio::BackendState::Block(crate::virtio::blk::DiskId {
                        size: 1 << 30,
                        ino: 12,
                        sample: 0xabc,
                    }),
                }],
            },
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        let back = decode(&bytes, "mem").unwrap();
        assert_eq!(back.config, sample().config);
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        assert_eq!(back.vcpus[0].msrs, vec![(0x10, 99)]);
        assert_eq!(back.devices, sample().devices);
    }

    #[test]
    fn other_state_version_is_refused() {
        let other = STATE_VERSION + 1;
        let mut blob = other.to_le_bytes().to_vec();
        blob.extend(postcard::to_stdvec(&sample()).unwrap());
        let mut out = Vec::new();
        Message::State { blob: &blob }.encode(&mut out);
        assert!(matches!(
            decode(&out, "x"),
            Err(StateError::Version { found, .. }) if found == other
        ));
    }

    #[test]
    fn damaged_envelopes_are_refused() {
        let good = encode(&sample()).unwrap();
        for cut in [0, 1, 15, 16, good.len() / 2, good.len() - 1] {
            assert!(
                matches!(decode(&good[..cut], "x"), Err(StateError::Frame { .. })),
                "{cut}"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing, "x"),
            Err(StateError::Trailing { extra: 1, .. })
        ));
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 10] ^= 1;
        assert!(matches!(
            decode(&flipped, "x"),
            Err(StateError::Frame { .. })
        ));
        // A blob that passes the CRC but is not a snapshot.
        let mut out = Vec::new();
        Message::State {
            blob: &[STATE_VERSION as u8, 0, 0, 0, 0xff, 0xff],
        }
        .encode(&mut out);
        assert!(matches!(decode(&out, "x"), Err(StateError::Decode(_))));
    }

    /// A snapshot of `n` vCPUs of 12 bytes each, every KVM struct an empty byte string. Before
    /// the caps, the 8.4 MB version (700 000 vCPUs, within the frame cap) decoded into more than
    /// 4 GB (the `state` fuzz target ran out of its 2 GB on it).
    fn minimal_vcpus(n: usize) -> Vec<u8> {
        let s = sample();
        let mut blob = STATE_VERSION.to_le_bytes().to_vec();
        blob.extend(postcard::to_stdvec(&s.config).unwrap());
        blob.extend([0; 5]); // VmState: five empty KVM structs
        blob.extend(postcard::to_stdvec(&n).unwrap());
        for _ in 0..n {
            blob.extend([0; 12]);
        }
        blob.extend(postcard::to_stdvec(&s.devices).unwrap());
        let mut out = Vec::new();
        Message::State { blob: &blob }.encode(&mut out);
        out
    }

    #[test]
    fn hostile_vcpu_and_cpuid_counts_are_refused() {
        let max = MAX_VCPUS as usize;
        assert_eq!(decode(&minimal_vcpus(max), "x").unwrap().vcpus.len(), max);
        for n in [max + 1, 100_000] {
            let e = decode(&minimal_vcpus(n), "x").unwrap_err();
            assert!(matches!(e, StateError::Decode(_)), "{n}: {e}");
        }
        let mut s = sample();
        s.vcpus[0].cpuid = vec![Default::default(); kvm_bindings::KVM_MAX_CPUID_ENTRIES];
        assert!(decode(&encode(&s).unwrap(), "x").is_ok());
        s.vcpus[0].cpuid.push(Default::default());
        assert!(matches!(
            decode(&encode(&s).unwrap(), "x"),
            Err(StateError::Decode(_))
        ));
    }

    #[test]
    fn oversized_file_is_refused_before_reading() {
        let path = std::env::temp_dir().join(format!("vmm-state-big-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(u64::from(MAX_PAYLOAD_BYTES) + 1024).unwrap();
        let r = read_file(&path);
        let _ = std::fs::remove_file(&path);
        assert!(matches!(r, Err(StateError::TooLarge { .. })));
    }
}
