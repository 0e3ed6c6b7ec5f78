//! Writes the committed seed corpus, `corpus/<target>/seed-*`, from the real encoders:
//! `cargo run --example seeds` in fuzz/. Re-run it after a change to the wire format of
//! the page protocol, to `Wire`, or to `Snapshot` (the fuzzers still start from the old seeds,
//! but reach less from them). Inputs libFuzzer adds to the corpus are not committed.
//!
//! Seed forms for `wire` and `state` are `fuzz::Input`'s: a mode byte (0 raw frame or
//! stream, 1 postcard body to put behind the current version), then the bytes.

use std::path::{Path, PathBuf};

use proto::{Channel, Layout, Message, Origin, PageIndex};
use vmm::api::{Reply, Request};
use vmm::devices::{ConsoleState, DevicesState, I8042};
use vmm::migration::{self, Offer, Wire};
use vmm::state::{self, MachineConfig, Snapshot, VcpuState, VmState};
use vmm::virtio::blk::{BlockConfig, DiskId};
use vmm::virtio::net::NetConfig;
use vmm::virtio::queue::Queue;
use vmm::virtio::{BackendState, DeviceConfig, OfferedDevice, Regs, TransportState};

/// Bytes before the postcard body in an encoded frame: header, CRC, version.
const BODY_AT: usize = proto::HEADER_LEN + 4 + 4;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn mode(m: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![m];
    v.extend_from_slice(bytes);
    v
}

fn config() -> MachineConfig {
    MachineConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        ram: vec![(0, 64 << 20)],
        boot: "guest".into(),
    }
}

fn block() -> BlockConfig {
    BlockConfig {
        path: "/srv/disk.img".into(),
        readonly: false,
    }
}

fn disk() -> DiskId {
    DiskId {
        size: 1 << 30,
        ino: 12,
        sample: 0xabc,
    }
}

fn net() -> NetConfig {
    NetConfig {
        tap: "tap0".into(),
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
    }
}

fn snapshot() -> Snapshot {
    let mut vcpu = VcpuState {
        index: 0,
        cpuid: (0..2).map(|_| Default::default()).collect(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        msrs: vec![(0x10, 99), (0x4b56_4d01, 0x9000 | 1)],
        lapic: Default::default(),
        vcpu_events: Default::default(),
        mp_state: Default::default(),
        debugregs: Default::default(),
        tsc_khz: 2_000_000,
    };
    vcpu.cpuid[1].function = 1;
    vcpu.cpuid[1].ecx = 0x8000_0000;
    vcpu.regs.rip = 0x1234;
    vcpu.sregs.cr0 = 0x8000_0011;
    Snapshot {
        config: config(),
        vm: VmState {
            pit: Default::default(),
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![vcpu],
        devices: DevicesState {
            console: ConsoleState {
                in_buffer: b"q".to_vec(),
                ..ConsoleState::default()
            },
            i8042: I8042::default(),
            virtio: vec![
                TransportState {
                    slot: 0,
                    regs: Regs {
                        status: 15,
                        driver_features: vmm::virtio::F_VERSION_1,
                        ..Default::default()
                    },
                    queues: vec![Queue {
                        size: 16,
                        ready: true,
                        desc: 0x10_0000,
                        avail: 0x10_1000,
                        used: 0x10_2000,
                        next_avail: 7,
                        next_used: 7,
                    }],
                    config: DeviceConfig::Block(block()),
                    backend: BackendState::Block(disk()),
                },
                TransportState {
                    slot: 1,
                    regs: Regs::default(),
                    queues: vec![Queue::default(), Queue::default()],
                    config: DeviceConfig::Net(net()),
                    backend: BackendState::Net,
                },
            ],
        },
    }
}

fn offer() -> Offer {
    Offer {
        proto_version: proto::PROTOCOL_VERSION,
        page_size: 4096,
        config: config(),
        cpuid: snapshot().vcpus[0].cpuid.clone(),
        msrs: vec![0x10, 0x4b56_4d01],
        tsc_khz: 2_000_000,
        caps: migration::REQUIRED_CAPS.iter().map(|c| c.0).collect(),
        page_server: "127.0.0.1:7000".into(),
        precopy: true,
        copy_before_resume: false,
        devices: vec![
            OfferedDevice {
                config: DeviceConfig::Block(block()),
                disk: Some(disk()),
                copy_from: Some("unix:/run/disk.sock".into()),
            },
            OfferedDevice {
                config: DeviceConfig::Net(net()),
                disk: None,
                copy_from: None,
            },
        ],
        recover_timeout_ms: 120_000,
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");

    // decode: one frame of every kind, and a stream of three
    let d = root.join("decode");
    let layout = Layout::single(64 << 20);
    let mut data = vec![0u8; 2 * 4096];
    data[5] = 1;
    data[4096 + 7] = 2;
    let frames: Vec<(&str, Message)> = vec![
        (
            "hello",
            proto::hello(Channel::Control, 0, 4096, layout.clone()),
        ),
        (
            "welcome",
            Message::Welcome(proto::Welcome {
                version: proto::PROTOCOL_VERSION,
                session: 7,
                page_size: 4096,
                layout: layout.clone(),
            }),
        ),
        (
            "request",
            Message::Request(proto::Request {
                first: PageIndex(100),
                count: 16,
                fault_pages: 1,
            }),
        ),
        (
            "pages",
            Message::Pages(proto::Pages {
                first: PageIndex(100),
                count: 3,
                origin: Origin::Fault,
                zero_mask: &[0b010],
                data: &data,
            }),
        ),
        (
            "bitmap",
            Message::Bitmap(proto::Bitmap {
                kind: proto::BitmapKind::Dirty,
                first: PageIndex(0),
                count: 20,
                bits: &[0xff, 0x01, 0x0f],
            }),
        ),
        ("state", Message::State { blob: b"opaque" }),
        ("stream", Message::Stream { enable: true }),
        ("done", Message::Done),
        (
            "inflight",
            Message::InFlight {
                first: PageIndex(100),
                count: 4,
            },
        ),
        (
            "error",
            Message::Error {
                code: proto::error_code::OUT_OF_RANGE,
                reason: "page 100 is out of range",
            },
        ),
    ];
    let mut stream = Vec::new();
    for (name, m) in &frames {
        write(&d, name, &m.to_vec());
        if matches!(*name, "hello" | "request" | "done") {
            m.encode(&mut stream);
        }
    }
    write(&d, "three-frames", &stream);

    // wire: every message as a postcard body (mode 1); one raw frame and a raw stream (mode 0)
    let w = root.join("wire");
    let envelope = state::encode(&snapshot()).unwrap();
    let msgs: Vec<(&str, Wire)> = vec![
        ("offer", Wire::Offer(offer())),
        ("accept", Wire::Accept { prepare_ms: 12.5 }),
        (
            "refuse",
            Wire::Refuse {
                reason: "CPUID leaf 0x7.0 ebx bit 5".into(),
            },
        ),
        ("ping", Wire::Ping { t: 1_000_000 }),
        (
            "pong",
            Wire::Pong {
                t: 1_000_000,
                dest: 2_000_000,
            },
        ),
        ("precopy", Wire::Precopy),
        (
            "state",
            Wire::State {
                envelope: envelope.clone(),
                paused_at: 3_000_000,
                dirty: vec![0, 0x81, 0],
                precopy_pages: 40,
            },
        ),
        (
            "resumed",
            Wire::Resumed {
                running_at: 4_000_000,
                apply_ms: 1.5,
            },
        ),
        (
            "failed",
            Wire::Failed {
                reason: "KVM_SET_XSAVE failed".into(),
            },
        ),
        (
            "progress",
            Wire::Progress {
                present: 10,
                total: 16384,
            },
        ),
        (
            "complete",
            Wire::Complete {
                report: r#"{"pages":16384,"faults":3}"#.into(),
            },
        ),
        (
            "abort",
            Wire::Abort {
                reason: "cancelled".into(),
            },
        ),
    ];
    let mut stream = Vec::new();
    for (name, m) in &msgs {
        let f = migration::encode(m).unwrap();
        write(&w, name, &mode(1, &f[BODY_AT..]));
        if matches!(*name, "ping" | "pong" | "progress") {
            stream.extend_from_slice(&f);
        }
    }
    write(
        &w,
        "raw-accept",
        &mode(0, &migration::encode(&msgs[1].1).unwrap()),
    );
    write(&w, "raw-stream", &mode(0, &stream));

    // state: the snapshot as a postcard body, and the whole envelope
    let s = root.join("state");
    write(&s, "snapshot", &mode(1, &envelope[BODY_AT..]));
    write(&s, "envelope", &mode(0, &envelope));

    // control: every request, and replies
    let c = root.join("control");
    let reqs: Vec<(&str, Request)> = vec![
        ("status", Request::Status {}),
        ("pause", Request::Pause {}),
        ("resume", Request::Resume {}),
        (
            "snapshot",
            Request::Snapshot {
                state: "/tmp/vm.state".into(),
                memory: "/tmp/vm.mem".into(),
            },
        ),
        ("shutdown", Request::Shutdown {}),
        (
            "serial-input",
            Request::SerialInput {
                data: "ls\n\u{e9}".into(),
            },
        ),
        ("checksum", Request::Checksum {}),
        ("switchover", Request::MigrateSwitchover {}),
        (
            "write-memory",
            Request::WriteMemory {
                gpa: 0x10_0000,
                hex: "deadbeef".into(),
            },
        ),
        (
            "read-memory",
            Request::ReadMemory {
                gpa: 0x10_0000,
                len: 4096,
            },
        ),
        (
            "dirty-rate",
            Request::DirtyRate {
                ms: 500,
                backend: Some("uffd-wp-async".into()),
            },
        ),
        (
            "migrate",
            Request::Migrate {
                to: "tcp:10.0.0.2:7000".into(),
                mode: Some("hybrid".into()),
                max_passes: Some(8),
                threshold_pages: Some(128),
                max_downtime_ms: Some(300),
                dirty_tracking: Some("kvm".into()),
                verify: true,
                copy_disk: true,
                recover_timeout_s: Some(60),
            },
        ),
    ];
    for (name, r) in &reqs {
        let mut line = serde_json::to_vec(r).unwrap();
        line.push(b'\n');
        write(&c, name, &line);
    }
    let replies = [
        (
            "reply-progress",
            Reply::progress(&vmm::api::replies::Progress::Postcopy {
                pages_present: 10,
                pages_total: 16384,
                percent: 0.06,
                mb_per_s: 1.5e3,
                elapsed_ms: 12.0,
            }),
        ),
        ("reply-error", Reply::err("busy", "a migration is running")),
    ];
    for (name, r) in &replies {
        write(&c, name, serde_json::to_string(r).unwrap().as_bytes());
    }
    println!("seeds written under {}", root.display());
}
