//! B: a hostile page-server (real handshake, then lies) against the pager.

use super::*;

// ------------------------------------------------------------------------------------------
// B: a hostile page-server against the pager
// ------------------------------------------------------------------------------------------

/// What the fake page-server does wrong, in the sessions it misbehaves in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evil {
    /// Urgent: answers the first request with a page beyond the layout.
    UrgentOutOfLayout,
    /// Urgent: answers the first request with another page (garbage bytes) than was asked.
    UrgentUnrequested,
    /// Urgent: the reply's header announces 4 GiB.
    UrgentOversized,
    /// Urgent: the reply's length disagrees with its page count.
    UrgentLyingLength,
    /// Urgent: half a reply, then the connection closes.
    UrgentTruncated,
    /// Urgent: half a reply, then silence (socket open).
    UrgentStall,
    /// Bulk: a frame of garbage pages that runs past the end of the layout.
    BulkOutOfLayout,
    /// Bulk: a header announcing 4 GiB.
    BulkOversized,
    /// Bulk: a Pages frame whose length disagrees with its page count.
    BulkLyingLength,
    /// Bulk: half a frame, then the connection closes.
    BulkTruncated,
    /// Bulk: half a header, then silence.
    BulkStall,
    /// Control: half a Welcome, then silence.
    HandshakeStall,
}

/// A page-server written here: the real handshake (Hello → Welcome with a valid layout), then
/// the pattern's pages — except that sessions up to `evil_sessions` misbehave as `evil`.
/// Stops every thread and closes every socket on drop.
struct FakeServer {
    addr: String,
    stop: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Clone)]
struct Fake {
    pages: u64,
    evil: Evil,
    evil_sessions: u64,
    next_session: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // no new connection after this; then every blocked read or write ends
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self.socks.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl FakeServer {
    fn start(pages: u64, evil: Evil, evil_sessions: u64) -> FakeServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let socks = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            pages,
            evil,
            evil_sessions,
            next_session: Arc::new(AtomicU64::new(1)),
            stop: stop.clone(),
        };
        let (st, so, th) = (stop.clone(), socks.clone(), threads.clone());
        let accept = std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let _ = s.set_nodelay(true);
                        so.lock().unwrap().push(s.try_clone().unwrap());
                        let f = fake.clone();
                        th.lock()
                            .unwrap()
                            .push(std::thread::spawn(move || f.serve(s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeServer {
            addr,
            stop,
            socks,
            threads,
            accept: Some(accept),
        }
    }

    fn addr(&self) -> Addr {
        self.addr.parse().unwrap()
    }
}

impl Fake {
    fn welcome(&self, session: u64) -> Vec<u8> {
        Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session,
            page_size: PS as u32,
            layout: Layout::single(self.pages * PS as u64),
        })
        .to_vec()
    }

    fn stall(&self) {
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is(&self, session: u64, e: Evil) -> bool {
        self.evil == e && session <= self.evil_sessions
    }

    fn serve(&self, mut s: TcpStream) {
        let mut buf = Vec::new();
        let Ok(h) = read_frame(&mut s, &mut buf) else {
            return;
        };
        let Ok(Message::Hello(hello)) = Message::decode(&h, &buf, PS as u32) else {
            return;
        };
        match hello.channel {
            Channel::Control => {
                if self.evil == Evil::HandshakeStall {
                    let w = self.welcome(1);
                    let _ = s.write_all(&w[..w.len() / 2]);
                    return self.stall();
                }
                let id = self.next_session.fetch_add(1, Ordering::AcqRel);
                if s.write_all(&self.welcome(id)).is_err() {
                    return;
                }
                // Stream, Bitmap, Done: taken and ignored
                while read_frame(&mut s, &mut buf).is_ok() {}
            }
            Channel::Urgent => {
                let id = hello.session;
                if s.write_all(&self.welcome(id)).is_err() {
                    return;
                }
                let mut first_reply = true;
                while let Ok(h) = read_frame(&mut s, &mut buf) {
                    let Ok(Message::Request(r)) = Message::decode(&h, &buf, PS as u32) else {
                        return;
                    };
                    let evil = first_reply && id <= self.evil_sessions;
                    first_reply = false;
                    let count = u64::from(r.count).min(self.pages - r.first.0) as u32;
                    let good = pages_frame(r.first.0, count, Origin::Fault, pattern_page);
                    let reply = if !evil {
                        good
                    } else {
                        match self.evil {
                            Evil::UrgentOutOfLayout => {
                                pages_frame(self.pages + 5, 1, Origin::Fault, garbage_page)
                            }
                            Evil::UrgentUnrequested => pages_frame(
                                (r.first.0 + 7) % self.pages,
                                1,
                                Origin::Fault,
                                garbage_page,
                            ),
                            Evil::UrgentOversized => header(Kind::Pages, u32::MAX).to_vec(),
                            Evil::UrgentLyingLength => {
                                let mut f = pages_frame(r.first.0, 1, Origin::Fault, garbage_page);
                                let len = (f.len() - HEADER_LEN + PS) as u32;
                                f[8..12].copy_from_slice(&len.to_le_bytes());
                                f.extend_from_slice(&vec![0xEE; PS]);
                                f
                            }
                            Evil::UrgentTruncated => {
                                let _ = s.write_all(&good[..good.len() / 2]);
                                let _ = s.shutdown(Shutdown::Both);
                                return;
                            }
                            Evil::UrgentStall => {
                                let _ = s.write_all(&good[..good.len() / 2]);
                                return self.stall();
                            }
                            _ => good,
                        }
                    };
                    if s.write_all(&reply).is_err() {
                        return;
                    }
                }
            }
            Channel::Bulk => {
                let id = hello.session;
                if s.write_all(&self.welcome(id)).is_err() {
                    return;
                }
                let evil: Option<Vec<u8>> = if self.is(id, Evil::BulkOutOfLayout) {
                    Some(pages_frame(self.pages - 2, 4, Origin::Stream, garbage_page))
                } else if self.is(id, Evil::BulkOversized) {
                    Some(header(Kind::Pages, u32::MAX).to_vec())
                } else if self.is(id, Evil::BulkLyingLength) {
                    let mut f = pages_frame(0, 1, Origin::Stream, garbage_page);
                    let len = (f.len() - HEADER_LEN + PS) as u32;
                    f[8..12].copy_from_slice(&len.to_le_bytes());
                    f.extend_from_slice(&vec![0xEE; PS]);
                    Some(f)
                } else if self.is(id, Evil::BulkTruncated) {
                    let f = pages_frame(0, 4, Origin::Stream, garbage_page);
                    let _ = s.write_all(&f[..f.len() / 2]);
                    let _ = s.shutdown(Shutdown::Both);
                    return;
                } else if self.is(id, Evil::BulkStall) {
                    let f = pages_frame(0, 4, Origin::Stream, pattern_page);
                    let _ = s.write_all(&f[..HEADER_LEN / 2]);
                    return self.stall();
                } else {
                    None
                };
                if let Some(f) = evil {
                    let _ = s.write_all(&f);
                    return self.stall();
                }
                let mut first = 0;
                while first < self.pages {
                    let n = (self.pages - first).min(256) as u32;
                    if s.write_all(&pages_frame(first, n, Origin::Stream, pattern_page))
                        .is_err()
                    {
                        return;
                    }
                    first += u64::from(n);
                }
                self.stall();
            }
        }
    }
}

fn fake_cfg(stream: bool) -> PagerConfig {
    PagerConfig {
        stream,
        bulk_connections: 1,
        reconnect_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        // the fake sources speak the wire format in plaintext
        security: transport::Security::Insecure,
        ..Default::default()
    }
}

fn base(p: &Pager) -> usize {
    p.memory().regions()[0].0 as usize
}

/// Events until `want` matches one (or `within` passes); returns them all.
fn events_until(
    rx: &Receiver<PagerEvent>,
    within: Duration,
    want: impl Fn(&PagerEvent) -> bool,
) -> Vec<PagerEvent> {
    let deadline = Instant::now() + within;
    let mut v = Vec::new();
    while let Ok(e) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let done = want(&e);
        v.push(e);
        if done {
            break;
        }
    }
    v
}

/// A page beyond the layout, on the urgent connection (a fault's reply) and on the stream (a
/// frame running past the end): the pager fails for good with an error naming the page, and
/// installs nothing of the frame; the fault never returns with data.
#[test]
fn pager_refuses_pages_outside_the_layout() {
    if !uffd_or_skip("pager_refuses_pages_outside_the_layout") {
        return;
    }
    let pages = 256u64;
    // the fault's reply names page 261 of 256
    let fake = FakeServer::start(pages, Evil::UrgentOutOfLayout, u64::MAX);
    let mut p = Pager::connect(&fake.addr(), fake_cfg(false)).expect("connect");
    let t = Instant::now();
    let fault = kernel_read(base(&p) + 3 * PS);
    let e = match p.wait(Duration::from_secs(10)) {
        Some(Err(e)) => e,
        Some(Ok(_)) => panic!("completed from a source that lies"),
        None => panic!("no outcome within 10 s"),
    };
    println!(
        "urgent reply beyond the layout: failed after {:?}: {e}",
        t.elapsed()
    );
    // the reply answers no request: the session is dropped before any byte is installed, and
    // a source that does it on every reconnect is given up once the reconnect timeout passes
    let text = format!("{e}: {e:?}");
    assert!(
        matches!(e, PagerError::SourceLost { .. })
            && text.contains("pages 261+1 matches no request"),
        "{text}"
    );
    assert_eq!(p.present_pages(), 0, "something was installed");
    assert!(fault.try_recv().is_err(), "the fault returned");
    drop(p);
    assert_eq!(
        fault
            .recv_timeout(Duration::from_secs(5))
            .expect("fault thread"),
        None,
        "the fault got data"
    );
    drop(fake);

    // the stream sends garbage for pages 254..258 of 256
    let fake = FakeServer::start(pages, Evil::BulkOutOfLayout, u64::MAX);
    let mut p = Pager::connect(&fake.addr(), fake_cfg(true)).expect("connect");
    let t = Instant::now();
    let e = match p.wait(Duration::from_secs(10)) {
        Some(Err(e)) => e,
        Some(Ok(_)) => panic!("completed from a source that lies"),
        None => panic!("no outcome within 10 s"),
    };
    println!(
        "stream frame past the layout: failed after {:?}: {e}",
        t.elapsed()
    );
    let msg = e.to_string();
    assert!(
        matches!(e, PagerError::Protocol { .. })
            && msg.contains(&fake.addr)
            && msg.contains("pages 254+4, beyond the 256 pages of the layout"),
        "{msg}"
    );
    assert!(
        !p.is_present(pages - 2) && !p.is_present(pages - 1),
        "the in-range part of a frame that runs past the layout was installed"
    );
    assert_eq!(p.present_pages(), 0);
}

/// A fault's reply for a page that was not asked for (garbage bytes): the pager drops the
/// session as broken, and must not have put the unrequested bytes into memory; it reconnects
/// and completes with the source's pages.
#[test]
fn pager_never_installs_an_unrequested_fault_reply() {
    if !uffd_or_skip("pager_never_installs_an_unrequested_fault_reply") {
        return;
    }
    let pages = 256u64;
    let fake = FakeServer::start(pages, Evil::UrgentUnrequested, 1);
    let mut p = Pager::connect(&fake.addr(), fake_cfg(false)).expect("connect");
    let events = p.events().unwrap();
    let fault = kernel_read(base(&p) + 3 * PS);
    let ev = events_until(&events, Duration::from_secs(10), |e| {
        matches!(e, PagerEvent::Reconnected { .. })
    });
    println!("events: {ev:?}");
    let lost = ev
        .iter()
        .find_map(|e| match e {
            PagerEvent::SourceLost { cause } => Some(cause.clone()),
            _ => None,
        })
        .expect("SourceLost");
    assert!(lost.contains("matches no request"), "{lost}");
    assert_eq!(
        fault.recv_timeout(Duration::from_secs(10)).unwrap(),
        Some(pattern_word(3))
    );
    let garbage_installed = p.is_present(10) && {
        // SAFETY: page 10 is present.
        let w = unsafe { std::ptr::read_volatile((base(&p) + 10 * PS) as *const u64) };
        w == GARBAGE_WORD
    };
    assert!(
        !garbage_installed,
        "the bytes of page 10, which nobody asked for, were installed"
    );
    touch_pages(base(&p), 0..pages);
    complete_and_verify(&mut p, "after the reconnect");
}

/// Frames whose length lies (4 GiB announced; a length that disagrees with the page count) and
/// frames cut off by a close, on the stream and on the urgent connection: each breaks only that
/// session — the cause says what was wrong, nothing of the frame is installed — and the pager
/// reconnects and completes with every byte right.
#[test]
fn pager_drops_lying_and_truncated_frames_and_recovers() {
    if !uffd_or_skip("pager_drops_lying_and_truncated_frames_and_recovers") {
        return;
    }
    let pages = 256u64;
    let cases = [
        (
            Evil::BulkOversized,
            "bulk connection: bad frame: frame payload is 4294967295, over the cap",
        ),
        (
            Evil::BulkLyingLength,
            "bulk connection: bad Pages frame: pages: payload is 8209 bytes, fields describe 4113",
        ),
        (Evil::BulkTruncated, "bulk connection: closed by the source"),
        (
            Evil::UrgentOversized,
            "urgent connection: bad frame: frame payload is 4294967295, over the cap",
        ),
        (
            Evil::UrgentLyingLength,
            "bad reply: pages: payload is 8209 bytes, fields describe 4113",
        ),
        (
            Evil::UrgentTruncated,
            "urgent connection closed by the source",
        ),
    ];
    for (evil, want) in cases {
        let t = Instant::now();
        let fake = FakeServer::start(pages, evil, 1);
        let urgent = matches!(
            evil,
            Evil::UrgentOversized | Evil::UrgentLyingLength | Evil::UrgentTruncated
        );
        let mut p = Pager::connect(&fake.addr(), fake_cfg(!urgent)).expect("connect");
        let events = p.events().unwrap();
        let fault = urgent.then(|| kernel_read(base(&p) + 3 * PS));
        let ev = events_until(&events, Duration::from_secs(10), |e| {
            matches!(e, PagerEvent::Reconnected { .. })
        });
        let cause = ev
            .iter()
            .find_map(|e| match e {
                PagerEvent::SourceLost { cause } => Some(cause.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{evil:?}: no SourceLost: {ev:?}"));
        println!("{evil:?}: source lost: {cause}");
        assert!(cause.contains(want), "{evil:?}: {cause:?} lacks {want:?}");
        assert!(
            ev.iter()
                .any(|e| matches!(e, PagerEvent::Reconnected { .. })),
            "{evil:?}: no reconnect: {ev:?}"
        );
        if let Some(f) = fault {
            assert_eq!(
                f.recv_timeout(Duration::from_secs(10)).unwrap(),
                Some(pattern_word(3)),
                "{evil:?}"
            );
            touch_pages(base(&p), 0..pages);
        }
        let r = complete_and_verify(&mut p, &format!("{evil:?}"));
        assert_eq!(r.reconnects, 1, "{evil:?}");
        println!("{evil:?}: recovered and complete after {:?}", t.elapsed());
    }
}

/// A source that stalls in the middle of its Welcome: connecting fails after the connect
/// timeout, with an error saying it was the Welcome that did not come.
#[test]
fn pager_gives_up_on_a_welcome_that_stalls() {
    if !uffd_or_skip("pager_gives_up_on_a_welcome_that_stalls") {
        return;
    }
    let fake = FakeServer::start(256, Evil::HandshakeStall, u64::MAX);
    let t = Instant::now();
    let r = Pager::connect(&fake.addr(), fake_cfg(true));
    let took = t.elapsed();
    let e = match r {
        Err(e) => e,
        Ok(_) => panic!("connected through half a Welcome"),
    };
    println!("half a Welcome: failed after {took:?}: {e}");
    assert!(matches!(e, PagerError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("reading Welcome"), "{e}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

/// A source that stalls mid-frame (half a stream frame, or half a fault's reply) with its
/// connections open, so TCP sees nothing wrong: faults beside a stalled stream are still
/// served, the stall is noticed after the pager's `stall_timeout` (2 s here) with a cause that
/// says so, nothing of the half frame is installed, and the pager reconnects and completes.
/// A pager dropped while its source stalls stops at once.
#[test]
fn pager_notices_a_source_stalled_mid_frame() {
    if !uffd_or_skip("pager_notices_a_source_stalled_mid_frame") {
        return;
    }
    let pages = 256u64;
    let cfg = |stream| PagerConfig {
        stall_timeout: Duration::from_secs(2),
        ..fake_cfg(stream)
    };
    let bulk_fake = FakeServer::start(pages, Evil::BulkStall, 1);
    let urgent_fake = FakeServer::start(pages, Evil::UrgentStall, 1);
    let mut bulk_p = Pager::connect(&bulk_fake.addr(), cfg(true)).expect("connect");
    let mut urgent_p = Pager::connect(&urgent_fake.addr(), cfg(false)).expect("connect");
    let t = Instant::now();
    let (bulk_ev, urgent_ev) = (bulk_p.events().unwrap(), urgent_p.events().unwrap());
    // faults are still served beside a stalled stream
    let served = kernel_read(base(&bulk_p) + 9 * PS);
    assert_eq!(
        served.recv_timeout(Duration::from_secs(5)).unwrap(),
        Some(pattern_word(9)),
        "a fault beside the stalled stream was not served"
    );
    let stuck = kernel_read(base(&urgent_p) + 3 * PS);
    for (what, ev, p) in [
        ("stream", &bulk_ev, &mut bulk_p),
        ("fault reply", &urgent_ev, &mut urgent_p),
    ] {
        let ev = events_until(ev, Duration::from_secs(8), |e| {
            matches!(e, PagerEvent::Reconnected { .. })
        });
        let cause = ev.iter().find_map(|e| match e {
            PagerEvent::SourceLost { cause } => Some(cause.clone()),
            _ => None,
        });
        println!("{what} stalled mid-frame: after {:?}: {ev:?}", t.elapsed());
        let cause = cause.unwrap_or_else(|| {
            panic!(
                "{what}: a source stalled mid-frame went unnoticed for {:?} ({} of {} pages)",
                t.elapsed(),
                p.present_pages(),
                p.total_pages()
            )
        });
        assert!(cause.contains("stalls mid-frame"), "{what}: {cause}");
        assert!(
            ev.iter()
                .any(|e| matches!(e, PagerEvent::Reconnected { .. })),
            "{what}: {ev:?}"
        );
    }
    assert_eq!(
        stuck.recv_timeout(Duration::from_secs(5)).unwrap(),
        Some(pattern_word(3)),
        "the fault whose reply stalled was not served after the reconnect"
    );
    touch_pages(base(&urgent_p), 0..pages);
    for (what, p) in [("stream", &mut bulk_p), ("fault reply", &mut urgent_p)] {
        let r = complete_and_verify(p, what);
        assert_eq!(r.reconnects, 1, "{what}");
    }
    println!("both recovered and complete after {:?}", t.elapsed());

    // dropped while its source stalls for good: it stops at once, the waiting fault gets no data
    let fake = FakeServer::start(pages, Evil::UrgentStall, u64::MAX);
    let p = Pager::connect(&fake.addr(), cfg(false)).expect("connect");
    let stuck = kernel_read(base(&p) + 3 * PS);
    std::thread::sleep(Duration::from_millis(500));
    assert!(stuck.try_recv().is_err(), "the stalled fault returned");
    let t = Instant::now();
    drop(p);
    println!("pager dropped during a stall in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "drop hung");
    assert_eq!(
        stuck
            .recv_timeout(Duration::from_secs(5))
            .expect("fault thread"),
        None,
        "the fault on the stalled reply got data"
    );
}
