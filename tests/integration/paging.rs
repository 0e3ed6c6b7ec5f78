//! Lazy restore through a real page-server over loopback TCP / a Unix socket, and from a local
//! file: every byte compared with the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use page_server::{serve, ServerConfig};
use pager::{Pager, PagerConfig, PagerError, PagerEvent};
use transport::{Addr, FileImage};

use crate::common::*;

fn start_server(image: &TempFile, listen: &str) -> page_server::ServerHandle {
    let img = FileImage::open(&image.0, PS as u32).expect("open image");
    serve(
        Arc::new(img),
        &listen.parse().expect("addr"),
        ServerConfig {
            security: tests::security(),
            ..ServerConfig::default()
        },
    )
    .expect("serve")
}

fn base_of(p: &Pager) -> usize {
    p.memory().regions()[0].0 as usize
}

fn wait_ok(p: &mut Pager, secs: u64) -> pager::Report {
    match p.wait(Duration::from_secs(secs)) {
        Some(Ok(r)) => r,
        Some(Err(e)) => panic!("pager failed: {e}"),
        None => panic!(
            "pager did not complete within {secs} s: {} of {} pages",
            p.present_pages(),
            p.total_pages()
        ),
    }
}

fn verify_all(p: &Pager) {
    // SAFETY: complete: every page present, nothing blocks.
    let mem = unsafe { p.memory().owned_bytes() }.expect("owned mapping");
    verify_pattern(mem);
}

/// 4 threads touch random pages while the stream runs; 256 MiB, every byte compared.
#[test]
fn restore_256m_with_stream_and_four_touching_threads() {
    if !uffd_or_skip("restore_256m_with_stream_and_four_touching_threads") {
        return;
    }
    let pages = 256 * 256;
    let image = pattern_image(pages);
    let server = start_server(&image, "127.0.0.1:0");
    let mut p = Pager::connect(server.addr(), crate::common::pager_cfg()).expect("connect");
    assert_eq!(p.total_pages(), pages);
    let base = base_of(&p);
    let touchers: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng(t + 1);
                touch_pages(base, (0..5000).map(|_| rng.next() % pages));
            })
        })
        .collect();
    for t in touchers {
        t.join().expect("toucher");
    }
    let r = wait_ok(&mut p, 120);
    println!("{r}");
    assert_eq!(r.present_pages, pages);
    assert_eq!(r.reconnects, 0);
    assert!(r.fault_latency.count > 0, "no fault was served on demand");
    assert!(r.stream_pages > 0, "the stream installed nothing");
    assert!(r.zero_pages > 0, "zero pages were not elided");
    verify_all(&p);
    let ev = p.events().expect("events");
    assert!(ev.try_iter().any(|e| e == PagerEvent::Complete));
}

/// Stream off: only faults bring pages in; every page is touched, in random order.
#[test]
fn pure_demand_paging_without_stream() {
    if !uffd_or_skip("pure_demand_paging_without_stream") {
        return;
    }
    let pages = 32 * 256;
    let image = pattern_image(pages);
    let server = start_server(&image, "127.0.0.1:0");
    let cfg = PagerConfig {
        stream: false,
        ..crate::common::pager_cfg()
    };
    let mut p = Pager::connect(server.addr(), cfg).expect("connect");
    let base = base_of(&p);
    let ts: Vec<_> = (0..2u64)
        .map(|t| {
            std::thread::spawn(move || {
                // each thread walks every page in its own random order
                let mut order: Vec<u64> = (0..pages).collect();
                let mut rng = Rng(t + 77);
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                touch_pages(base, order.into_iter());
            })
        })
        .collect();
    for t in ts {
        t.join().expect("toucher");
    }
    let r = wait_ok(&mut p, 60);
    println!("{r}");
    assert_eq!(r.stream_pages, 0);
    assert_eq!(r.reconnects, 0);
    assert_eq!(r.fault_pages + r.prefetch_pages, pages + r.duplicate_pages);
    verify_all(&p);
}

/// A kernel-mode access (read(2) copying into a missing page) is reported to the pager and
/// served: the userfaultfd is not user-mode-only (a KVM vCPU's faults arrive the same way).
#[test]
fn kernel_mode_faults_are_served() {
    if !uffd_or_skip("kernel_mode_faults_are_served") {
        return;
    }
    let image = pattern_image(64);
    let server = start_server(&image, "127.0.0.1:0");
    let cfg = PagerConfig {
        stream: false,
        ..crate::common::pager_cfg()
    };
    let p = Pager::connect(server.addr(), cfg).expect("connect");
    let base = base_of(&p);
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) into a local array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let msg = [0xA5u8; 100];
    // SAFETY: writing a local buffer to our pipe.
    let wrote = unsafe { libc::write(fds[1], msg.as_ptr().cast(), msg.len()) };
    assert_eq!(wrote, 100);
    // the kernel copies into page 5, which is missing: a kernel-context fault
    let target = base + 5 * PS + 8;
    // SAFETY: reading into our paged mapping; page 5 lies inside it.
    let n = unsafe { libc::read(fds[0], target as *mut libc::c_void, msg.len()) };
    // SAFETY: closing our pipe.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert_eq!(
        n,
        100,
        "read(2) into a missing page failed: {}",
        std::io::Error::last_os_error()
    );
    // the pager's own bookkeeping follows the install by a few microseconds
    let t = Instant::now();
    while !(p.is_present(5) && p.stats().fault_latency.count() >= 1) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the pager never recorded the fault"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // the page holds the source's bytes around what read(2) wrote
    let mut want = vec![0u8; PS];
    pattern_page(5, &mut want);
    // SAFETY: page 5 is present now.
    let got = unsafe { std::slice::from_raw_parts((base + 5 * PS) as *const u8, PS) };
    assert_eq!(&got[..8], &want[..8]);
    assert_eq!(&got[8..108], &msg[..]);
    assert_eq!(&got[108..], &want[108..]);
}

/// Restore from an image file on this host, no network, with touching threads and the stream.
#[test]
fn local_file_restore() {
    if !uffd_or_skip("local_file_restore") {
        return;
    }
    let pages = 64 * 256;
    let image = pattern_image(pages);
    let mut p = Pager::local(&image.0, crate::common::pager_cfg()).expect("local");
    let base = base_of(&p);
    let ts: Vec<_> = (0..2u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng(t + 9);
                touch_pages(base, (0..3000).map(|_| rng.next() % pages));
            })
        })
        .collect();
    for t in ts {
        t.join().expect("toucher");
    }
    let r = wait_ok(&mut p, 60);
    println!("{r}");
    assert_eq!(r.present_pages, pages);
    verify_all(&p);
}

/// The same restore over a Unix socket.
#[test]
fn restore_over_unix_socket() {
    if !uffd_or_skip("restore_over_unix_socket") {
        return;
    }
    let pages = 16 * 256;
    let image = pattern_image(pages);
    let sock = temp_path("sock");
    let server = start_server(&image, sock.to_str().unwrap());
    assert!(matches!(server.addr(), Addr::Unix(_)));
    let mut p = Pager::connect(server.addr(), crate::common::pager_cfg()).expect("connect");
    let base = base_of(&p);
    touch_pages(base, [0, pages - 1, pages / 2].into_iter());
    let _ = wait_ok(&mut p, 60);
    verify_all(&p);
    drop(server);
    assert!(!sock.exists(), "the server left its socket file behind");
}

/// A client whose page size differs is refused, and the error names both values.
#[test]
fn handshake_mismatch_is_refused_clearly() {
    let image = pattern_image(16);
    let server = start_server(&image, "127.0.0.1:0");
    let cfg = PagerConfig {
        page_size: 8192,
        ..crate::common::pager_cfg()
    };
    match Pager::connect(server.addr(), cfg) {
        Err(PagerError::Refused { code, reason, .. }) => {
            assert_eq!(code, proto::error_code::HANDSHAKE);
            assert!(
                reason.contains("4096") && reason.contains("8192"),
                "{reason}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a mismatched page size was accepted"),
    }
}

/// The page-server process is killed mid-restore: the owner hears SourceLost at once, the
/// pager retries for its timeout, then fails with a clear error; the blocked fault stays
/// blocked (it is never served a zero page).
#[test]
fn page_server_killed_mid_restore() {
    if !uffd_or_skip("page_server_killed_mid_restore") {
        return;
    }
    let pages = 16 * 256;
    let image = pattern_image(pages);
    let mut server = spawn_server(&image.0, "127.0.0.1:0");
    let cfg = PagerConfig {
        stream: false,
        reconnect_timeout: Duration::from_secs(2),
        ..crate::common::pager_cfg()
    };
    let addr: Addr = server.addr.parse().unwrap();
    let mut p = Pager::connect(&addr, cfg).expect("connect");
    let events = p.events().expect("events");
    let base = base_of(&p);
    touch_pages(base, 0..10);
    server.child.kill().expect("kill page-server");
    let killed = Instant::now();
    // a fault on a missing page after the kill
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        touch_pages(base, std::iter::once(100));
        let _ = tx.send(());
    });
    let lost = events
        .recv_timeout(Duration::from_secs(5))
        .expect("no event after the kill");
    assert!(matches!(lost, PagerEvent::SourceLost { .. }), "{lost:?}");
    match p.wait(Duration::from_secs(15)) {
        Some(Err(PagerError::SourceLost { missing, .. })) => assert!(missing > 0),
        Some(Err(e)) => panic!("wrong error: {e}"),
        Some(Ok(_)) => panic!("completed without its source"),
        None => panic!("no outcome within 15 s of the kill"),
    }
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(2 + 3), "failure took {took:?}");
    assert!(
        rx.try_recv().is_err(),
        "the fault on a missing page returned without its page"
    );
    // the toucher is still blocked on its missing page; keep the mapping alive so it never
    // sees anything but its page
    std::mem::forget(p);
}

/// The page-server restarts at the same address within the reconnect timeout: the pager
/// reconnects, sends what it has, and completes with every byte right.
#[test]
fn pager_reconnects_to_a_restarted_server() {
    if !uffd_or_skip("pager_reconnects_to_a_restarted_server") {
        return;
    }
    let pages = 16 * 256;
    let image = pattern_image(pages);
    let server = spawn_server(&image.0, "127.0.0.1:0");
    let addr_s = server.addr.clone();
    let cfg = PagerConfig {
        stream: false,
        reconnect_timeout: Duration::from_secs(10),
        ..crate::common::pager_cfg()
    };
    let mut p = Pager::connect(&addr_s.parse().unwrap(), cfg).expect("connect");
    let events = p.events().expect("events");
    let base = base_of(&p);
    touch_pages(base, 0..100);
    drop(server); // killed
    assert!(matches!(
        events.recv_timeout(Duration::from_secs(5)),
        Ok(PagerEvent::SourceLost { .. })
    ));
    let _server2 = spawn_server(&image.0, &addr_s);
    assert!(matches!(
        events.recv_timeout(Duration::from_secs(10)),
        Ok(PagerEvent::Reconnected { count: 1 })
    ));
    touch_pages(base, 0..pages);
    let r = wait_ok(&mut p, 30);
    assert_eq!(r.reconnects, 1);
    verify_all(&p);
}

/// Every page travels once per session: 4 threads fault on random pages while the stream
/// runs, and a fault on a page the stream already sent waits for it instead of asking for
/// it again. The pager installs no page twice; the server's totals count every page once.
#[test]
fn no_page_is_sent_twice_within_a_session() {
    if !uffd_or_skip("no_page_is_sent_twice_within_a_session") {
        return;
    }
    let pages = 256 * 256;
    let image = pattern_image(pages);
    let server = start_server(&image, "127.0.0.1:0");
    let mut p = Pager::connect(server.addr(), crate::common::pager_cfg()).expect("connect");
    let base = base_of(&p);
    let touchers: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng(t + 101);
                touch_pages(base, (0..5000).map(|_| rng.next() % pages));
            })
        })
        .collect();
    for t in touchers {
        t.join().expect("toucher");
    }
    let r = wait_ok(&mut p, 120);
    println!("{r}");
    assert_eq!(r.duplicate_pages, 0, "pages installed twice");
    assert_eq!(r.fault_pages + r.prefetch_pages + r.stream_pages, pages);
    // every fault was accounted for, including those that waited for the stream
    assert!(
        r.fault_latency.count >= r.requests,
        "faults left unaccounted"
    );
    verify_all(&p);
    let st = server.stats();
    println!("server: {}", serde_json::to_string(&st).unwrap());
    assert_eq!(st.sessions_opened, 1);
    assert_eq!(st.pages_sent(), pages, "the server sent some page twice");
    assert_eq!(st.stream_pages, r.stream_pages);
    assert_eq!(
        st.fault_pages + st.prefetch_pages,
        r.fault_pages + r.prefetch_pages
    );
    assert_eq!(st.in_flight_replies, r.in_flight_replies);
    let zeros = (0..pages).filter(|&i| is_zero_page(i)).count() as u64;
    assert_eq!(st.zero_pages, zeros);
    assert_eq!(st.data_bytes, (pages - zeros) * PS as u64);
}

/// Waits until `p` has `n` pages present (or panics after 5 s).
fn wait_present(p: &Pager, n: u64) {
    let t = Instant::now();
    while p.present_pages() < n {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} pages present",
            p.present_pages()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// With `stream_deferred`, the pager connects everything but no stream page comes until
/// `start_stream`; faults are served meanwhile. Over the network and from a local file.
#[test]
fn deferred_stream_starts_on_request() {
    if !uffd_or_skip("deferred_stream_starts_on_request") {
        return;
    }
    let pages = 16 * 256;
    let image = pattern_image(pages);
    let server = start_server(&image, "127.0.0.1:0");
    let cfg = PagerConfig {
        stream_deferred: true,
        ..crate::common::pager_cfg()
    };
    let remote = Pager::connect(server.addr(), cfg.clone()).expect("connect");
    let local = Pager::local(&image.0, cfg).expect("local");
    for mut p in [remote, local] {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(p.present_pages(), 0, "pages arrived before start_stream");
        // a fault is served (window 1 at first: exactly one page)
        touch_pages(base_of(&p), std::iter::once(pages / 2));
        wait_present(&p, 1);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(p.present_pages(), 1, "the stream ran before start_stream");
        p.start_stream().expect("start_stream");
        p.start_stream().expect("start_stream is idempotent");
        let r = wait_ok(&mut p, 60);
        assert!(r.stream_pages > 0);
        assert_eq!(r.duplicate_pages, 0);
        verify_all(&p);
        p.start_stream().expect("start_stream after completion");
    }
    let st = server.stats();
    assert_eq!(st.pages_sent(), pages);
    assert_eq!(st.fault_pages, 1);
}

/// The stream's start is remembered across reconnects: a reconnect before `start_stream`
/// keeps the stream off; `start_stream` while the source is away takes effect on the next
/// session.
#[test]
fn deferred_stream_survives_reconnects() {
    if !uffd_or_skip("deferred_stream_survives_reconnects") {
        return;
    }
    let pages = 16 * 256;
    let image = pattern_image(pages);
    let server = spawn_server(&image.0, "127.0.0.1:0");
    let addr_s = server.addr.clone();
    let cfg = PagerConfig {
        stream_deferred: true,
        reconnect_timeout: Duration::from_secs(10),
        ..crate::common::pager_cfg()
    };
    let mut p = Pager::connect(&addr_s.parse().unwrap(), cfg).expect("connect");
    let events = p.events().expect("events");
    let expect = |what: &str| {
        let e = events
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {what} event"));
        println!("event: {e:?}");
        e
    };
    // 1. reconnect before start_stream: still no stream
    drop(server);
    assert!(matches!(
        expect("SourceLost"),
        PagerEvent::SourceLost { .. }
    ));
    let server = spawn_server(&image.0, &addr_s);
    assert!(matches!(
        expect("Reconnected"),
        PagerEvent::Reconnected { count: 1 }
    ));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        p.present_pages(),
        0,
        "the stream started without start_stream"
    );
    // 2. start_stream while the source is away: the next session streams
    drop(server);
    assert!(matches!(
        expect("SourceLost"),
        PagerEvent::SourceLost { .. }
    ));
    p.start_stream().expect("start_stream while reconnecting");
    let _server = spawn_server(&image.0, &addr_s);
    assert!(matches!(
        expect("Reconnected"),
        PagerEvent::Reconnected { count: 2 }
    ));
    let r = wait_ok(&mut p, 60);
    assert_eq!(r.stream_pages, pages);
    verify_all(&p);
}
