//! Golden byte fixtures: the exact bytes of one message of each kind. A failure here means the
//! wire format changed: bump `PROTOCOL_VERSION` and regenerate on purpose, never by accident.

use proto::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
    let layout = Layout {
        regions: vec![
            Region {
                gpa_start: GuestPhysAddr(0),
                len_bytes: 0x1000,
            },
            Region {
                gpa_start: GuestPhysAddr(0x1_0000_0000),
                len_bytes: 0x2000,
            },
        ],
    };
    let mut page = vec![0u8; 4096];
    page[0] = 0xab;
    page[4095] = 0xcd;
    let mask = [0b0000_0010u8];
    vec![
        (
            "hello",
            hello(Channel::Urgent, 0x1122334455667788, 4096, layout.clone()).to_vec(),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                version: 1,
                session: 42,
                page_size: 4096,
                layout,
            })
            .to_vec(),
        ),
        (
            "request",
            Message::Request(Request {
                first: PageIndex(0x1234),
                count: 3,
                fault_pages: 1,
            })
            .to_vec(),
        ),
        // two pages: page 0 carries data, page 1 is zero
        ("pages", {
            let v = Message::Pages(Pages {
                first: PageIndex(7),
                count: 2,
                origin: Origin::Fault,
                zero_mask: &mask,
                data: &page,
            })
            .to_vec();
            // only the prefix and the two marker bytes: the fixture stays short
            let mut short = v[..37].to_vec();
            short.extend_from_slice(&v[v.len() - 1..]);
            short
        }),
        (
            "bitmap",
            Message::Bitmap(Bitmap {
                kind: BitmapKind::Received,
                first: PageIndex(8),
                count: 16,
                bits: &[0xff, 0x01],
            })
            .to_vec(),
        ),
        ("state", Message::State { blob: b"vcpu" }.to_vec()),
        ("stream", Message::Stream { enable: true }.to_vec()),
        ("done", Message::Done.to_vec()),
        (
            "in_flight",
            Message::InFlight {
                first: PageIndex(0x1234),
                count: 2,
            }
            .to_vec(),
        ),
        (
            "error",
            Message::Error {
                code: error_code::HANDSHAKE,
                reason: "bad",
            }
            .to_vec(),
        ),
    ]
}

const GOLDEN: &[(&str, &str)] = &[
    ("hello", "5546504701000100340000000000000001000200001000008877665544332211020000000000000000000000001000000000000000000000010000000020000000000000"),
    ("welcome", "5546504701000200340000000000000001000000001000002a00000000000000020000000000000000000000001000000000000000000000010000000020000000000000"),
    ("request", "5546504701000300100000000000000034120000000000000300000001000000"),
    ("pages", "554650470100040011100000000000000700000000000000020000000100000002ab000000cd"),
    ("bitmap", "55465047010005001a00000000000000010000000000000008000000000000001000000000000000ff01"),
    ("state", "5546504701000600080000000000000060a9d12a76637075"),
    ("stream", "5546504701000700010000000000000001"),
    ("done", "55465047010008000000000000000000"),
    ("in_flight", "5546504701000a000c00000000000000341200000000000002000000"),
    ("error", "554650470100090005000000000000000100626164"),
];

#[test]
fn wire_bytes_are_unchanged() {
    let mut failures = Vec::new();
    for (name, bytes) in fixtures() {
        let got = hex(&bytes);
        match GOLDEN.iter().find(|(n, _)| *n == name) {
            Some((_, want)) if *want == got => {}
            _ => failures.push(format!("    (\"{name}\", \"{got}\"),")),
        }
    }
    assert!(
        failures.is_empty(),
        "wire bytes changed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn golden_frames_decode() {
    for (name, bytes) in fixtures() {
        if name == "pages" {
            continue; // shortened on purpose
        }
        Message::decode_frame(&bytes, 4096).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
