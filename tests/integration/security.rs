//! Secure by default: who may read guest memory and steer a migration. Every connection is
//! TLS 1.3 with both sides authenticated; here, as an attacker on the same network would:
//! unauthenticated and wrongly authenticated peers get nothing and change nothing, and a flood
//! of silent and slow connections never keeps a real peer out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pager::{Pager, PagerConfig};
use transport::Security;

use crate::common::{pattern_image, spawn_server_with, temp_path, uffd_or_skip, verify_pattern};
use crate::migration::{
    check_continues, check_report, gates, last_heartbeat, migrate, refused, source_exits,
    start_dest, still_running,
};
use crate::vm::boot_guest_with;

/// Holds `n` connections to `addr`: half silent, half writing a byte of garbage now and then
/// (slow, never a whole frame or TLS record). Stops, closing them all, when dropped.
struct Flood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Flood {
    fn start(addr: &str, n: usize) -> Flood {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let addr = addr.to_owned();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            let mut opened = 0;
            let mut round = 0u64;
            while !halt.load(Ordering::Acquire) {
                // keep `n` open: the peer drops the slow ones after its handshake deadline
                held.retain(|s| {
                    let mut b = [0u8; 1];
                    s.set_nonblocking(true).ok();
                    !matches!((&*s).read(&mut b), Ok(0))
                });
                while held.len() < n {
                    match TcpStream::connect(&addr) {
                        Ok(s) => {
                            opened += 1;
                            held.push(s);
                        }
                        Err(_) => break,
                    }
                }
                for (i, s) in held.iter_mut().enumerate() {
                    if i % 2 == 1 {
                        let _ = s.write(&[0x16 ^ (round as u8)]);
                    }
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            opened
        });
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; returns how many connections it opened in all.
    fn stop(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pager_with(security: Security, stream: bool) -> PagerConfig {
    PagerConfig {
        stream,
        security,
        connect_timeout: Duration::from_secs(2),
        reconnect_timeout: Duration::from_secs(1),
        ..PagerConfig::default()
    }
}

/// A page-server with TLS on: a plaintext client, a client with another key and raw bytes get
/// no page (and no session); 120 silent and slow connections held against it do not keep a
/// real pager from paging in every page.
#[test]
fn unauthenticated_clients_get_no_page_and_a_flood_does_not_keep_a_real_pager_out() {
    if !uffd_or_skip(
        "unauthenticated_clients_get_no_page_and_a_flood_does_not_keep_a_real_pager_out",
    ) {
        return;
    }
    let pages = 16 * 256;
    let image = pattern_image(pages);
    let log = temp_path("ps-security-log");
    let server = spawn_server_with(&image.0, "127.0.0.1:0", Some(&log), &[]);
    let addr: transport::Addr = server.addr.parse().unwrap();

    // plaintext: the Hello of a client without credentials is not TLS; no Welcome comes back
    let e = match Pager::connect(&addr, pager_with(Security::Insecure, false)) {
        Ok(_) => panic!("a plaintext client got a session"),
        Err(e) => transport::error_chain(&e),
    };
    assert!(!e.is_empty(), "a plaintext client got a session");
    println!("plaintext client: {e}");
    // another pre-shared key
    let other = Security::psk(b"not-the-tests-key-0123456789abcdef0123", "another key").unwrap();
    let e = match Pager::connect(&addr, pager_with(other, false)) {
        Ok(_) => panic!("a client with another key got a session"),
        Err(e) => transport::error_chain(&e),
    };
    println!("client with another key: {e}");
    assert!(e.contains("TLS"), "{e}");
    // raw bytes of a Hello frame: the server answers nothing readable and hangs up
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = proto::hello(proto::Channel::Control, 0, 4096, proto::Layout::default()).to_vec();
    let _ = s.write_all(&hello);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !got.windows(4).any(|w| w == proto::MAGIC.to_le_bytes()),
        "a frame of the paging protocol went to an unauthenticated client: {got:?}"
    );

    // the flood, then the real pager
    let flood = Flood::start(&server.addr, 120);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let mut p = Pager::connect(&addr, crate::common::pager_cfg()).expect("the real pager connects");
    let r = match p.wait(Duration::from_secs(60)) {
        Some(Ok(r)) => r,
        other => panic!("the real pager did not complete: {other:?}"),
    };
    println!(
        "real pager under a flood of 120: complete in {:?} ({} stream pages)",
        t0.elapsed(),
        r.stream_pages
    );
    // SAFETY: complete: every page present.
    verify_pattern(unsafe { p.memory().owned_bytes() }.expect("owned mapping"));
    drop(p);
    let opened = flood.stop();
    println!("the flood opened {opened} connections");
    assert!(
        opened >= 120,
        "the flood held fewer connections than meant: {opened}"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let warns = text.lines().filter(|l| l.contains("WARN")).count();
    println!("page-server log: {warns} WARN lines");
    assert!(warns < 100, "bad peers flooded the log: {warns} WARN lines");
    let _ = std::fs::remove_file(&log);
}

/// `vmm --incoming` with TLS on: a source with another key and a plaintext source cannot
/// migrate to it (nor inject anything: it goes on waiting), and a real source migrates while
/// 120 silent and slow connections are held against it.
#[test]
fn incoming_takes_a_real_source_through_a_flood_and_refuses_strangers() {
    if !gates("incoming_takes_a_real_source_through_a_flood_and_refuses_strangers") {
        return;
    }
    let other_key = temp_path("other-psk");
    transport::tls::make_psk(&other_key).unwrap();
    let other = other_key.display().to_string();
    let (dest, addr) = start_dest(None, "127.0.0.1", &[]);
    // a stranger with another key
    let stranger = boot_guest_with(None, 1, "64M", &["--tls-psk-file", &other]);
    let r = migrate(&stranger, &addr, &[]);
    let msg = &refused(&r).message;
    println!("source with another key: {msg}");
    assert!(msg.contains("TLS"), "{msg}");
    still_running(&stranger);
    // a plaintext source
    let plain = boot_guest_with(None, 1, "64M", &["--insecure"]);
    let r = migrate(&plain, &addr, &[]);
    let msg = &refused(&r).message;
    println!("plaintext source: {msg}");
    still_running(&plain);
    let st: vmm::api::replies::IncomingStatus = dest.ctl_as(&["status"]);
    assert_eq!(st.state, "incoming", "a stranger got in: {st:?}");
    assert_eq!(
        st.attempts, 0,
        "an unauthenticated peer counted as a migration: {st:?}"
    );
    drop(stranger);
    drop(plain);

    // the flood, then the real source
    let flood = Flood::start(addr.trim_start_matches("tcp:"), 120);
    std::thread::sleep(Duration::from_millis(500));
    let mut src = boot_guest_with(None, 1, "64M", &[]);
    let t0 = Instant::now();
    let r = migrate(&src, &addr, &[]);
    check_report(&r, 64 << 20);
    println!(
        "real source under a flood of 120: migrated in {:?}",
        t0.elapsed()
    );
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 1);
    let opened = flood.stop();
    println!("the flood opened {opened} connections");
    assert!(opened >= 120, "{opened}");
    let log = dest.stderr_text();
    let refusals = log.matches("refused").count();
    println!("destination log: {refusals} lines with 'refused'");
    assert!(!log.contains("panicked"), "{log}");
    let _ = std::fs::remove_file(&other_key);
}

/// Certificate mode: a source whose certificate the same CA signed but for another identity is
/// refused; the source with the allowed identity migrates.
#[test]
fn a_valid_certificate_with_the_wrong_identity_cannot_migrate() {
    if !gates("a_valid_certificate_with_the_wrong_identity_cannot_migrate") {
        return;
    }
    let dir = temp_path("certs");
    std::fs::create_dir_all(&dir).unwrap();
    transport::tls::make_certificates(&dir, &["src".into(), "dst".into(), "mallory".into()])
        .unwrap();
    let f = |n: &str| dir.join(n).display().to_string();
    let node = |me: &str, peer: &str| -> Vec<String> {
        vec![
            "--tls-ca".into(),
            f("ca.pem"),
            "--tls-cert".into(),
            f(&format!("{me}.pem")),
            "--tls-key".into(),
            f(&format!("{me}-key.pem")),
            "--tls-peer".into(),
            peer.into(),
        ]
    };
    let dargs = node("dst", "src");
    let dargs: Vec<&str> = dargs.iter().map(String::as_str).collect();
    let (dest, addr) = start_dest(None, "127.0.0.1", &dargs);
    let margs = node("mallory", "dst");
    let margs: Vec<&str> = margs.iter().map(String::as_str).collect();
    let mallory = boot_guest_with(None, 1, "64M", &margs);
    let r = migrate(&mallory, &addr, &[]);
    let msg = &refused(&r).message;
    println!("mallory: {msg}");
    assert!(msg.contains("refused") || msg.contains("TLS"), "{msg}");
    still_running(&mallory);
    drop(mallory);
    let sargs = node("src", "dst");
    let sargs: Vec<&str> = sargs.iter().map(String::as_str).collect();
    let mut src = boot_guest_with(None, 1, "64M", &sargs);
    let r = migrate(&src, &addr, &[]);
    check_report(&r, 64 << 20);
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 1);
    let log = dest.stderr_text();
    assert!(
        log.contains("mallory") && log.contains("not one this node accepts"),
        "the destination did not say why mallory was refused: {log}"
    );
    assert!(log.contains("authenticated as src"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sessions are bound to the peer that opened them: their ids are random, and a peer with a
/// valid certificate of another identity cannot attach a channel to someone else's session
/// (it is told there is no such session, as for an id nobody has).
#[test]
fn a_session_is_joined_only_by_the_peer_that_opened_it() {
    use page_server::{serve, ServerConfig};
    use transport::{FileImage, Sock};
    let dir = temp_path("session-certs");
    std::fs::create_dir_all(&dir).unwrap();
    transport::tls::make_certificates(&dir, &["srv".into(), "dst".into(), "mallory".into()])
        .unwrap();
    let node = |me: &str, peers: &[&str]| {
        Security::certificates(
            &dir.join("ca.pem"),
            &dir.join(format!("{me}.pem")),
            &dir.join(format!("{me}-key.pem")),
            &peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        )
        .unwrap()
    };
    let image = pattern_image(256);
    let img = FileImage::open(&image.0, 4096).unwrap();
    // the server accepts both identities: only the session binding keeps them apart
    let server = serve(
        std::sync::Arc::new(img),
        &"127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            security: node("srv", &["dst", "mallory"]),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let layout = proto::Layout::default();
    // a channel opened by `who`: its Hello, then the first frame back
    let open = |who: &Security, channel: proto::Channel, session: u64| {
        let s = Sock::connect(server.addr(), true, Duration::from_secs(5)).unwrap();
        let mut s = who.client(s, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&proto::hello(channel, session, 4096, layout.clone()).to_vec())
            .unwrap();
        let mut buf = Vec::new();
        let h = proto::read_frame(&mut s, &mut buf).expect("a reply frame");
        let m = proto::Message::decode(&h, &buf, 4096).expect("a frame");
        let reply = match m {
            proto::Message::Welcome(w) => Ok(w.session),
            proto::Message::Error { reason, .. } => Err(reason.to_string()),
            m => Err(format!("{:?}", m.kind())),
        };
        (s, reply)
    };
    let dst = node("dst", &["srv"]);
    let mallory = node("mallory", &["srv"]);
    let (_c1, id1) = open(&dst, proto::Channel::Control, 0);
    let (_c2, id2) = open(&dst, proto::Channel::Control, 0);
    let (id1, id2) = (id1.unwrap(), id2.unwrap());
    println!("session ids: {id1:#x}, {id2:#x}");
    assert!(
        id1.abs_diff(id2) > 1 << 20,
        "session ids look sequential: {id1} {id2}"
    );
    // the owner joins; another identity cannot
    let (_u, own) = open(&dst, proto::Channel::Urgent, id1);
    assert_eq!(own, Ok(id1));
    let (_b, theirs) = open(&mallory, proto::Channel::Bulk, id1);
    let e = theirs.unwrap_err();
    println!("mallory joining dst's session: {e}");
    assert!(e.contains("no session"), "{e}");
    let (_b, theirs) = open(&mallory, proto::Channel::Urgent, id1);
    assert!(
        theirs.is_err(),
        "mallory got an urgent channel on dst's session"
    );
    // sessions are bounded: 64 open at once, the next is refused with the reason
    let mut held = Vec::new();
    for _ in 2..64 {
        let (c, id) = open(&mallory, proto::Channel::Control, 0);
        assert!(id.is_ok(), "{id:?}");
        held.push(c);
    }
    let (_c, over) = open(&mallory, proto::Channel::Control, 0);
    let e = over.unwrap_err();
    println!("the 65th session: {e}");
    assert!(e.contains("64 sessions"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
