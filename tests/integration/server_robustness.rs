//! Hostile and broken clients against page-server: each is dropped with a clear error while a
//! good client restores its memory undisturbed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use page_server::{serve, ServerConfig};
use pager::{Pager, PagerConfig};
use proto::{Channel, Header, Kind, Layout, Message};
use transport::FileImage;

use crate::common::*;

/// Reads what the server answers before closing; returns the decoded error frame, if any.
fn server_reply(mut s: TcpStream) -> Option<(u16, String)> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut at = 0;
    while at < buf.len() {
        let (m, used) = Message::decode_frame(&buf[at..], PS as u32).ok()?;
        if let Message::Error { code, reason } = m {
            return Some((code, reason.to_string()));
        }
        at += used;
    }
    None
}

#[test]
fn garbage_truncated_and_oversized_frames_do_not_disturb_a_good_client() {
    if !uffd_or_skip("garbage_truncated_and_oversized_frames_do_not_disturb_a_good_client") {
        return;
    }
    let pages = 32 * 256;
    let image = pattern_image(pages);
    let img = FileImage::open(&image.0, PS as u32).unwrap();
    // the hostile clients write raw frames: a test of the wire format, in plaintext
    let server = serve(
        Arc::new(img),
        &"127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            security: transport::Security::Insecure,
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let addr = match server.addr() {
        transport::Addr::Tcp(a) => *a,
        _ => unreachable!(),
    };
    // a good client starts first and keeps going through everything below
    let mut good = Pager::connect(
        server.addr(),
        PagerConfig {
            stream: false,
            security: transport::Security::Insecure,
            ..crate::common::pager_cfg()
        },
    )
    .unwrap();
    let base = good.memory().regions()[0].0 as usize;
    touch_pages(base, 0..50);

    // 1. random garbage
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (code, reason) = server_reply(s).expect("an error frame for garbage");
    assert_eq!(code, proto::error_code::PROTOCOL);
    assert!(reason.contains("magic"), "{reason}");

    // 2. a frame header announcing far more than the cap
    let mut s = TcpStream::connect(addr).unwrap();
    let mut h = Header {
        kind: Kind::Hello,
        payload_len: 0,
    }
    .encode();
    h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&h).unwrap();
    let (_, reason) = server_reply(s).expect("an error frame for an oversized frame");
    assert!(reason.contains("cap"), "{reason}");

    // 3. a truncated frame, then the client vanishes
    let mut s = TcpStream::connect(addr).unwrap();
    let hello = proto::hello(Channel::Control, 0, PS as u32, Layout::default()).to_vec();
    s.write_all(&hello[..hello.len() - 3]).unwrap();
    drop(s);

    // 4. a valid session whose urgent channel asks for pages out of range
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(&hello).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).unwrap();
    let Ok((Message::Welcome(w), _)) = Message::decode_frame(&buf[..n], PS as u32) else {
        panic!("no welcome")
    };
    let mut u = TcpStream::connect(addr).unwrap();
    u.write_all(&proto::hello(Channel::Urgent, w.session, PS as u32, Layout::default()).to_vec())
        .unwrap();
    let req = Message::Request(proto::Request {
        first: proto::PageIndex(pages + 10),
        count: 1,
        fault_pages: 1,
    });
    u.write_all(&req.to_vec()).unwrap();
    let (code, _) = server_reply(u).expect("an error frame for an out-of-range request");
    assert_eq!(code, proto::error_code::OUT_OF_RANGE);

    // 5. a client that connects and stalls mid-frame, holding its connection open
    let mut stall = TcpStream::connect(addr).unwrap();
    stall.write_all(&hello[..5]).unwrap();

    // 6. a channel for a session that does not exist
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&proto::hello(Channel::Bulk, 999_999, PS as u32, Layout::default()).to_vec())
        .unwrap();
    let (code, _) = server_reply(s).expect("an error frame for an unknown session");
    assert_eq!(code, proto::error_code::NO_SESSION);

    // the good client finishes its restore, every byte right
    touch_pages(base, 0..pages);
    match good.wait(Duration::from_secs(60)) {
        Some(Ok(_)) => {}
        other => panic!(
            "good client did not complete: {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
    // SAFETY: complete.
    verify_pattern(unsafe { good.memory().owned_bytes() }.unwrap());
    drop(stall);
}

/// SIGTERM and SIGINT stop the page-server program cleanly (exit code 0) and promptly.
#[test]
fn page_server_stops_cleanly_on_sigterm_and_sigint() {
    let image = pattern_image(16);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut server = spawn_server(&image.0, "127.0.0.1:0");
        // a connected client does not keep it from stopping
        let _c = TcpStream::connect(&server.addr).unwrap();
        // SAFETY: signalling the child we started.
        assert_eq!(unsafe { libc::kill(server.child.id() as i32, sig) }, 0);
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = server.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "page-server ignored signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(0), "signal {sig}");
    }
}

/// The library serves memory of this process (what the VMM will hand it: live guest RAM), in
/// two regions, and a pager restores it exactly.
#[test]
fn serves_in_process_memory_regions() {
    if !uffd_or_skip("serves_in_process_memory_regions") {
        return;
    }
    let pages = 2 * 256u64;
    let mut mem = vec![0u8; pages as usize * PS];
    for (i, page) in mem.chunks_exact_mut(PS).enumerate() {
        pattern_page(i as u64, page);
    }
    let half = mem.len() / 2;
    let layout = proto::Layout {
        regions: vec![
            proto::Region {
                gpa_start: proto::GuestPhysAddr(0),
                len_bytes: half as u64,
            },
            proto::Region {
                gpa_start: proto::GuestPhysAddr(1 << 32),
                len_bytes: half as u64,
            },
        ],
    };
    let base = std::ptr::NonNull::new(mem.as_mut_ptr()).unwrap();
    let second = std::ptr::NonNull::new(mem[half..].as_mut_ptr()).unwrap();
    // SAFETY: `mem` outlives the server (dropped at the end of the test, after it).
    let provider = unsafe {
        page_server::RawRegions::new(
            vec![(base, half), (second, half)],
            layout.clone(),
            PS as u32,
        )
    };
    let server = serve(
        Arc::new(provider),
        &"127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            security: tests::security(),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let mut p = Pager::connect(server.addr(), crate::common::pager_cfg()).unwrap();
    let b = p.memory().regions()[0].0 as usize;
    touch_pages(b, [0, pages / 2, pages - 1].into_iter());
    match p.wait(Duration::from_secs(60)) {
        Some(Ok(_)) => {}
        other => panic!("did not complete: {:?}", other.map(|r| r.map(|_| ()))),
    }
    // SAFETY: complete.
    verify_pattern(unsafe { p.memory().owned_bytes() }.unwrap());
    drop(p);
    drop(server);
    drop(mem);
}
