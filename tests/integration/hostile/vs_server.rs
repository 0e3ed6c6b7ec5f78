//! A: hostile clients against the real page-server program.

use super::*;

// ------------------------------------------------------------------------------------------
// A: hostile clients against the page-server program
// ------------------------------------------------------------------------------------------

/// The real page-server program with its log (RUST_LOG=info) in a file; killed on drop.
struct LoggedServer {
    proc: ServerProc,
    addr: String,
    log: PathBuf,
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl LoggedServer {
    fn start(image: &Path) -> LoggedServer {
        let log = temp_path("page-server.log");
        // raw frames from these clients: a test of the wire format, in plaintext
        let proc = spawn_server_with(image, "127.0.0.1:0", Some(&log), &["--insecure"]);
        let addr = proc.addr.clone();
        LoggedServer { proc, addr, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).expect("connect to page-server");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Opens a channel with a correct Hello; returns it and its session.
    fn channel(&self, channel: Channel, session: u64) -> (TcpStream, u64) {
        let mut s = self.connect();
        s.write_all(&proto::hello(channel, session, PS as u32, Layout::default()).to_vec())
            .unwrap();
        let mut buf = Vec::new();
        let h = read_frame(&mut s, &mut buf).expect("Welcome");
        let Ok(Message::Welcome(w)) = Message::decode(&h, &buf, PS as u32) else {
            panic!("no Welcome for {channel:?}");
        };
        (s, w.session)
    }

    /// A control and an urgent connection of a new session.
    fn session(&self) -> (TcpStream, TcpStream, u64) {
        let (c, id) = self.channel(Channel::Control, 0);
        let (u, _) = self.channel(Channel::Urgent, id);
        (c, u, id)
    }

    /// Asserts the log gets a line containing every one of `parts` within `within`.
    fn expect_log(&self, parts: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log_text();
            if log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn request(first: u64, count: u32, fault_pages: u32) -> Vec<u8> {
    Message::Request(proto::Request {
        first: PageIndex(first),
        count,
        fault_pages,
    })
    .to_vec()
}

/// Frames that lie about their length, clients that stop mid-frame or stall, requests outside
/// the layout, wrong page sizes and layouts — each refused with an error frame naming it and one
/// log line, while two good pagers (one faulting every page in, one streaming) restore from the
/// same server with every byte right.
#[test]
fn page_server_refuses_lying_stalling_and_out_of_range_clients() {
    if !uffd_or_skip("page_server_refuses_lying_stalling_and_out_of_range_clients") {
        return;
    }
    let pages = 32 * 256u64;
    let image = pattern_image(pages);
    let mut server = LoggedServer::start(&image.0);
    let t0 = Instant::now();
    let mut demand = good_pager(&server.addr, false);
    let mut streamed = good_pager(&server.addr, true);
    let base = demand.memory().regions()[0].0 as usize;
    touch_pages(base, 0..64);

    // A1. a header announcing far more than the frame cap: refused on the header alone
    let mut s = server.connect();
    s.write_all(&header(Kind::Hello, u32::MAX)).unwrap();
    let (code, reason) = refused(&mut s, "oversized frame");
    assert_eq!(code, error_code::PROTOCOL);
    assert!(
        reason.contains("4294967295") && reason.contains("over the cap"),
        "{reason}"
    );
    server.expect_log(
        &["dropped: bad frame header", "over the cap"],
        Duration::from_secs(5),
    );

    // A1. a Hello announcing a megabyte (under the cap, far over any Hello) with a kilobyte
    // behind it: refused before the server buffers it
    let mut s = server.connect();
    s.write_all(&header(Kind::Hello, 1 << 20)).unwrap();
    s.write_all(&[0u8; 1024]).unwrap();
    let (code, reason) = refused(&mut s, "a Hello that claims 1 MiB");
    assert_eq!(code, error_code::PROTOCOL);
    assert!(reason.contains("1048576"), "{reason}");

    // A1. a frame announcing more than it sends, then the client vanishes: one log line saying
    // how much of the frame came
    let (_c, mut u, _) = server.session();
    u.write_all(&request(0, 1, 1)[..HEADER_LEN + 6]).unwrap();
    drop(u);
    server.expect_log(
        &["dropped: closed mid-frame (22 bytes of a frame received)"],
        Duration::from_secs(5),
    );
    let (mut c, _u, _) = server.session();
    c.write_all(&header(Kind::Bitmap, 1 << 20)).unwrap();
    c.write_all(&[0xffu8; 4000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (err, closed) = error_then_close(&mut c, Duration::from_secs(5));
    assert!(closed && err.is_none(), "{err:?} {closed}");
    server.expect_log(
        &["dropped: closed mid-frame (4016 bytes of a frame received)"],
        Duration::from_secs(5),
    );

    // A2. clients that stall: half a header before the handshake, and half a request on an
    // urgent channel, each then silent with its socket open. Nobody else waits for them; the
    // server drops each after its timeout with an error frame.
    let stall_started = Instant::now();
    let mut stall_new = server.connect();
    stall_new.write_all(&header(Kind::Hello, 40)[..8]).unwrap();
    let (_stall_c, mut stall_u, _) = server.session();
    stall_u.write_all(&request(5, 1, 1)[..10]).unwrap();

    // A4, meanwhile: requests outside the layout, malformed requests, wrong page size, wrong
    // layout — each refused, naming the values
    let cases: Vec<(&str, Vec<u8>, u16, Vec<String>)> = vec![
        (
            "a request past the end",
            request(pages, 1, 1),
            error_code::OUT_OF_RANGE,
            vec![format!("{pages}+1 beyond the {pages} served")],
        ),
        (
            "a request crossing the end",
            request(pages - 2, 4, 1),
            error_code::OUT_OF_RANGE,
            vec![format!("{}+4 beyond the {pages} served", pages - 2)],
        ),
        (
            "a request at the top of the page space",
            request(u64::MAX - 1, 1, 1),
            error_code::OUT_OF_RANGE,
            vec!["beyond".into()],
        ),
        (
            "a range that wraps",
            request(u64::MAX, 2, 1),
            error_code::PROTOCOL,
            vec!["wraps".into()],
        ),
        (
            "a request for 0 pages",
            request(0, 0, 0),
            error_code::PROTOCOL,
            vec!["request page count: 0".into()],
        ),
        (
            "a request for more pages than a frame carries",
            request(0, 4096, 1),
            error_code::PROTOCOL,
            vec!["4096".into(), "cap of 2048".into()],
        ),
        (
            "more fault pages than pages",
            request(0, 2, 3),
            error_code::PROTOCOL,
            vec!["fault_pages".into()],
        ),
        (
            "a request with a payload longer than a request",
            {
                let mut r = request(0, 1, 1);
                r[8..12].copy_from_slice(&20u32.to_le_bytes());
                r.extend_from_slice(&[0; 4]);
                r
            },
            error_code::PROTOCOL,
            vec!["request".into(), "payload".into()],
        ),
        (
            "page data sent to the server",
            pages_frame(0, 1, Origin::Fault, pattern_page),
            error_code::PROTOCOL,
            vec!["Pages".into()],
        ),
    ];
    for (what, bytes, want_code, want) in cases {
        let (_c, mut u, _) = server.session();
        u.write_all(&bytes).unwrap();
        let (code, reason) = refused(&mut u, what);
        assert_eq!(code, want_code, "{what}: {reason}");
        for w in &want {
            assert!(
                reason.contains(w.as_str()),
                "{what}: {reason:?} lacks {w:?}"
            );
        }
        println!("{what}: refused: {reason}");
    }
    let hellos: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "another page size",
            proto::hello(Channel::Control, 0, 8192, Layout::default()).to_vec(),
            vec!["page size", "4096", "8192"],
        ),
        (
            "a page size that is no page size",
            proto::hello(Channel::Control, 0, 1000, Layout::default()).to_vec(),
            vec!["invalid page size 1000"],
        ),
        (
            "another layout",
            proto::hello(
                Channel::Control,
                0,
                PS as u32,
                Layout::single(2 * pages * PS as u64),
            )
            .to_vec(),
            vec!["layout mismatch"],
        ),
    ];
    for (what, bytes, want) in hellos {
        let mut s = server.connect();
        s.write_all(&bytes).unwrap();
        let (code, reason) = refused(&mut s, what);
        assert_eq!(code, error_code::HANDSHAKE, "{what}: {reason}");
        for w in &want {
            assert!(reason.contains(w), "{what}: {reason:?} lacks {w:?}");
        }
        println!("{what}: refused: {reason}");
    }

    // the good pagers go on while the stallers hold their sockets
    touch_pages(base, 64..pages / 2);
    let (err, closed) = error_then_close(&mut stall_new, Duration::from_secs(10));
    let waited = stall_started.elapsed();
    assert!(
        closed,
        "a client stalled before its Hello was never dropped"
    );
    let (code, reason) = err.expect("an error frame for the stalled Hello");
    println!("stalled before the handshake: dropped after {waited:?}: {reason}");
    assert_eq!(code, error_code::PROTOCOL);
    assert!(
        reason.contains("Hello") && reason.contains("8 bytes"),
        "{reason}"
    );
    let (err, closed) = error_then_close(&mut stall_u, Duration::from_secs(15));
    let waited = stall_started.elapsed();
    println!("stalled mid-request: dropped after {waited:?}: {err:?}");
    assert!(closed, "a client stalled mid-frame was never dropped");
    let (code, reason) = err.expect("an error frame for the stalled request");
    assert_eq!(code, error_code::PROTOCOL);
    assert!(
        reason.contains("stalled") && reason.contains("10 bytes"),
        "{reason}"
    );
    server.expect_log(&["dropped:", "stalled"], Duration::from_secs(2));

    touch_pages(base, pages / 2..pages);
    complete_and_verify(&mut demand, "the demand-paging pager");
    complete_and_verify(&mut streamed, "the streaming pager");
    assert!(
        server.proc.child.try_wait().unwrap().is_none(),
        "the page-server died"
    );
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
    println!("took {:?}; server log:\n{log}", t0.elapsed());
}

/// Reads `replies` frames (headers parsed, payloads skipped) from `s`; returns the bytes read.
fn drain_replies(s: TcpStream, replies: usize) -> u64 {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut h = [0u8; HEADER_LEN];
    let mut skip = vec![0u8; 1 << 20];
    let mut total = 0u64;
    for i in 0..replies {
        r.read_exact(&mut h)
            .unwrap_or_else(|e| panic!("reply {i}: {e}"));
        let hd = Header::decode(&h).unwrap_or_else(|e| panic!("reply {i}: {e}"));
        if hd.kind == Kind::Error {
            let mut p = vec![0u8; hd.payload_len as usize];
            r.read_exact(&mut p).unwrap();
            panic!("reply {i}: error {:?}", Message::decode(&hd, &p, PS as u32));
        }
        assert!(
            matches!(hd.kind, Kind::Pages | Kind::InFlight),
            "reply {i}: {:?}",
            hd.kind
        );
        let mut left = hd.payload_len as usize;
        while left > 0 {
            let n = left.min(skip.len());
            r.read_exact(&mut skip[..n]).unwrap();
            left -= n;
        }
        total += (HEADER_LEN + hd.payload_len as usize) as u64;
    }
    total
}

/// Clients that flood the urgent channel with requests: one never reads a reply (the server
/// must stop reading it rather than buffer without bound), one pipelines requests for the whole
/// memory while reading replies as fast as it can (the reply buffer must not keep what was
/// already sent). The server's anonymous memory grows by less than 64 MiB over each, and a good
/// pager restores the memory meanwhile.
#[test]
fn page_server_memory_stays_bounded_under_request_floods() {
    if !uffd_or_skip("page_server_memory_stays_bounded_under_request_floods") {
        return;
    }
    let t0 = Instant::now();
    let pages = 256 * 256u64; // 256 MiB
    let image = pattern_image(pages);
    let mut server = LoggedServer::start(&image.0);
    let pid = server.pid();
    std::thread::sleep(Duration::from_millis(100));
    let base_anon = status_kib(pid, "RssAnon");
    let base_rss = status_kib(pid, "VmRSS");
    println!("page-server at start: VmRSS {base_rss} KiB, RssAnon {base_anon} KiB");
    let limit_kib = 64 << 10;

    // 1. never reads: requests (each a different run of 64 pages, then again) until the server
    // stops taking them
    let watch = RssWatch::start(pid);
    let (_c, mut u, _) = server.session();
    u.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent = 0u64;
    let mut batch = Vec::with_capacity(1024 * 32);
    let flood_start = Instant::now();
    'flood: while sent < 1_000_000 && flood_start.elapsed() < Duration::from_secs(20) {
        batch.clear();
        for k in 0..1024u64 {
            let first = ((sent + k) * 64) % pages;
            batch.extend_from_slice(&request(first, 64, 1));
        }
        let mut at = 0;
        while at < batch.len() {
            match u.write(&batch[at..]) {
                Ok(n) => at += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    sent += (at / 32) as u64;
                    break 'flood;
                }
                Err(e) => panic!("flood write: {e}"),
            }
        }
        sent += 1024;
    }
    let stopped_taking = flood_start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (anon1, rss1) = watch.max();
    println!(
        "flood without reading: {sent} requests written in {stopped_taking:?} before the server stopped taking them; max RssAnon {anon1} KiB (+{} KiB), max VmRSS {rss1} KiB (+{} KiB)",
        anon1.saturating_sub(base_anon),
        rss1.saturating_sub(base_rss)
    );
    assert!(sent >= 10_000, "only {sent} requests went out");
    assert!(
        anon1.saturating_sub(base_anon) < limit_kib,
        "the server buffered {} KiB for a client that reads nothing",
        anon1 - base_anon
    );
    // the flooder still holds its connection: a good pager restores everything meanwhile
    let mut good = good_pager(&server.addr, true);
    let b = good.memory().regions()[0].0 as usize;
    let mut rng = Rng(7);
    touch_pages(b, (0..2000).map(|_| rng.next() % pages));
    let r = complete_and_verify(&mut good, "the good pager during the flood");
    println!("good pager during the flood: {r}");
    drop(good);
    drop(u);
    drop(watch);

    // 2. pipelines a request for every page (2048 at a time: 8 MiB replies) and reads the
    // replies as fast as it can
    std::thread::sleep(Duration::from_millis(200));
    let base_anon2 = status_kib(pid, "RssAnon");
    let base_rss2 = status_kib(pid, "VmRSS");
    let watch = RssWatch::start(pid);
    let (_c, u, _) = server.session();
    let reader = u.try_clone().unwrap();
    let n_req = (pages / 2048) as usize;
    let rd = std::thread::spawn(move || drain_replies(reader, n_req));
    let mut w = u;
    let pipe_start = Instant::now();
    for k in 0..n_req as u64 {
        w.write_all(&request(k * 2048, 2048, 1)).unwrap();
    }
    let bytes = rd.join().expect("reader");
    let took = pipe_start.elapsed();
    let (anon2, rss2) = watch.max();
    drop(watch);
    println!(
        "pipelined flood: {n_req} requests, {} MiB of replies in {took:?}; max RssAnon {anon2} KiB (+{} KiB), max VmRSS {rss2} KiB (+{} KiB, the image's page cache included)",
        bytes >> 20,
        anon2.saturating_sub(base_anon2),
        rss2.saturating_sub(base_rss2)
    );
    assert!(bytes > (pages * PS as u64) / 2, "{bytes} bytes of replies");
    assert!(
        anon2.saturating_sub(base_anon2) < limit_kib,
        "the server's memory grew by {} KiB while one client pipelined requests for {} MiB",
        anon2 - base_anon2,
        bytes >> 20
    );
    assert!(server.proc.child.try_wait().unwrap().is_none());
    println!("took {:?}", t0.elapsed());
}
