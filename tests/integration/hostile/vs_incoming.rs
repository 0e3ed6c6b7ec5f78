//! C: hostile sources against `vmm --incoming`.

use super::*;

// ------------------------------------------------------------------------------------------
// C: hostile sources against `vmm --incoming`
// ------------------------------------------------------------------------------------------

/// The pid of the process whose command line names `sock` (a vmm's control socket).
fn pid_of(sock: &Path) -> Option<u32> {
    let want = sock.to_str()?;
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmd)
            .split('\0')
            .any(|a| a == want)
            .then_some(pid)
    })
}

/// Waits until the destination has seen `n` attempts; returns its status.
fn attempts(dest: &VmmProc, n: u32, within: Duration) -> IncomingStatus {
    let deadline = Instant::now() + within;
    loop {
        let st: IncomingStatus = dest.ctl_as(&["status"]);
        if st.attempts >= n {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "attempt {n} not seen: {st:?}; {}",
            dest.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination's log line about attempt failures containing `part`.
fn failure_logged(dest: &VmmProc, part: &str) -> String {
    let log = dest.stderr_text();
    log.lines()
        .find(|l| l.contains("failed:") && l.contains(part))
        .unwrap_or_else(|| panic!("no failure logged with {part:?}:\n{log}"))
        .to_owned()
}

/// Garbage, a 4 GiB frame header, a frame cut short by a close, and a frame that announces 8 MiB
/// and then trickles a byte a second: each is refused with the reason in the destination's log
/// and `status` (`last_error`), without allocating what the header announces, and the
/// destination keeps listening — the trickler is cut off by the offer timeout, however slowly it
/// sends — and then takes a real migration from a running VM that was waiting behind it.
#[test]
fn incoming_refuses_garbage_lies_and_stalls_then_takes_a_real_source() {
    if !gates("incoming_refuses_garbage_lies_and_stalls_then_takes_a_real_source") {
        return;
    }
    let t0 = Instant::now();
    // hostile peers that write the wire format itself: plaintext on both real sides
    let mut src = crate::vm::boot_guest_with(None, 1, "64M", &["--insecure"]);
    let (dest, addr) = start_dest(None, "127.0.0.1", &["--insecure"]);
    let pid = pid_of(&dest.sock).expect("destination pid");

    // C1. garbage: the destination hangs up
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: vmm\r\n\r\n").unwrap();
    let (_, closed) = error_then_close(&mut s, Duration::from_secs(5));
    assert!(closed, "the destination kept a garbage peer");
    let st = attempts(&dest, 1, Duration::from_secs(5));
    let e = st.last_error.as_deref().unwrap_or("");
    println!("garbage: {e}");
    assert!(e.contains("bad magic"), "{st:?}");
    failure_logged(&dest, "bad magic");

    // C2. a header announcing 4 GiB
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&header(Kind::State, u32::MAX)).unwrap();
    let (_, closed) = error_then_close(&mut s, Duration::from_secs(5));
    assert!(closed);
    let st = attempts(&dest, 2, Duration::from_secs(5));
    let e = st.last_error.as_deref().unwrap_or("");
    println!("4 GiB header: {e}");
    assert!(
        e.contains("4294967295") && e.contains("over the cap"),
        "{st:?}"
    );

    // C2. a header announcing 1 MiB, 1000 bytes, then the peer closes
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&header(Kind::State, 1 << 20)).unwrap();
    s.write_all(&[7u8; 1000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (_, closed) = error_then_close(&mut s, Duration::from_secs(5));
    assert!(closed);
    let st = attempts(&dest, 3, Duration::from_secs(5));
    let e = st.last_error.as_deref().unwrap_or("");
    println!("cut short: {e}");
    assert!(
        e.contains("mid-frame") && e.contains("1000 of 1048576"),
        "{st:?}"
    );

    // C2 + C3. a header announcing the largest frame, then a byte a second: the destination
    // must neither allocate 8 MiB for it nor wait for it past the offer timeout
    let rss_before = status_kib(pid, "VmRSS");
    let anon_before = status_kib(pid, "RssAnon");
    let stop = Arc::new(AtomicBool::new(false));
    let st2 = stop.clone();
    let a2 = addr.clone();
    let dripper = std::thread::spawn(move || -> Option<Duration> {
        let mut s = TcpStream::connect(&a2).unwrap();
        let t = Instant::now();
        s.write_all(&header(Kind::State, MAX_PAYLOAD_BYTES))
            .unwrap();
        s.write_all(&[1u8; 4]).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(900)))
            .unwrap();
        while !st2.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(40) {
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Ok(0) => return Some(t.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Some(t.elapsed()),
            }
            if s.write_all(&[1u8]).is_err() {
                return Some(t.elapsed());
            }
        }
        None
    });
    std::thread::sleep(Duration::from_millis(1500));
    let rss_during = status_kib(pid, "VmRSS");
    let anon_during = status_kib(pid, "RssAnon");
    println!(
        "destination while a peer trickles an 8 MiB frame: VmRSS {rss_before} -> {rss_during} KiB, RssAnon {anon_before} -> {anon_during} KiB"
    );
    // a real source connects behind the trickler
    let src_sock = src.sock.clone();
    let to = addr.clone();
    let real = std::thread::spawn(move || {
        let t = Instant::now();
        let r = ctl_raw(&src_sock, &["migrate", "--to", &to]);
        (r, t.elapsed())
    });
    let dropped_after = dripper.join().unwrap();
    stop.store(true, Ordering::Release);
    println!("the trickling peer was dropped after {dropped_after:?}");
    let (r, took) = real.join().unwrap();
    println!("the real migration behind it took {took:?}");
    check_report(&r, 64 << 20);
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 1);
    let line = failure_logged(&dest, "within");
    println!("destination log: {line}");
    assert!(
        anon_during.saturating_sub(anon_before) < 4 << 10,
        "the destination allocated {} KiB for a frame that never came",
        anon_during - anon_before
    );
    let dropped_after = dropped_after.expect("the trickling peer was never dropped");
    assert!(
        dropped_after < Duration::from_secs(15),
        "the trickling peer held the destination for {dropped_after:?}"
    );
    dest.ctl(&["shutdown"]);
    println!("took {:?}", t0.elapsed());
}

/// How the man in the middle spoils the State message.
#[derive(Debug, Clone, Copy)]
enum Spoil {
    /// One byte of the state envelope flipped (the message itself re-framed correctly).
    FlipByte,
    /// The state envelope cut to half (the message re-framed correctly).
    HalfEnvelope,
    /// The State frame cut in half on the wire, then the connection closed.
    CutFrame,
}

/// A hostile source: relays a real source's migration to the destination — the Offer, Accept,
/// the clock probes — then spoils the State. Returns the destination's answer to it.
fn relay_and_spoil(l: TcpListener, dest: String, spoil: Spoil) -> Option<vmm::migration::Wire> {
    use vmm::migration::{decode, encode, Wire};
    let (mut src, _) = l.accept().unwrap();
    let mut dst = TcpStream::connect(&dest).unwrap();
    for s in [&src, &dst] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let mut buf = Vec::new();
    let frame = |s: &mut TcpStream, buf: &mut Vec<u8>| -> Option<(Vec<u8>, Wire)> {
        let h = read_frame(s, buf).ok()?;
        let mut f = h.encode().to_vec();
        f.extend_from_slice(buf);
        let w = decode(&f).ok()?;
        Some((f, w))
    };
    loop {
        let (bytes, w) = frame(&mut src, &mut buf)?;
        let (mut envelope, paused_at, dirty, precopy_pages) = match w {
            Wire::State {
                envelope,
                paused_at,
                dirty,
                precopy_pages,
            } => (envelope, paused_at, dirty, precopy_pages),
            w => {
                dst.write_all(&bytes).unwrap();
                if matches!(w, Wire::Offer(_) | Wire::Ping { .. }) {
                    let (reply, _) = frame(&mut dst, &mut buf)?;
                    src.write_all(&reply).unwrap();
                }
                continue;
            }
        };
        match spoil {
            Spoil::FlipByte => {
                let i = envelope.len() / 2;
                envelope[i] ^= 0x5a;
            }
            Spoil::HalfEnvelope => envelope.truncate(envelope.len() / 2),
            Spoil::CutFrame => {
                dst.write_all(&bytes[..bytes.len() / 2]).unwrap();
                dst.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                let _ = dst.read_to_end(&mut rest);
                // nothing can come back; the source must hear that the VM does not run there
                let failed = Wire::Failed {
                    reason: "the relay cut the state in half".into(),
                };
                src.write_all(&encode(&failed).unwrap()).unwrap();
                return (!rest.is_empty()).then(|| decode(&rest).ok()).flatten();
            }
        }
        let spoiled = Wire::State {
            envelope,
            paused_at,
            dirty,
            precopy_pages,
        };
        dst.write_all(&encode(&spoiled).unwrap()).unwrap();
        let (reply, w) = frame(&mut dst, &mut buf)?;
        src.write_all(&reply).unwrap();
        return Some(w);
    }
}

/// A well-formed Offer (a real source's, relayed) followed by a State that is corrupt, short,
/// or cut off on the wire: the destination refuses it before any vCPU runs (with `Failed` and
/// the reason where the link still works), the source resumes its VM each time, the destination
/// keeps listening, and a real migration afterwards succeeds.
#[test]
fn incoming_refuses_a_spoiled_state_then_takes_a_real_source() {
    if !gates("incoming_refuses_a_spoiled_state_then_takes_a_real_source") {
        return;
    }
    let t0 = Instant::now();
    // hostile peers that write the wire format itself: plaintext on both real sides
    let mut src = crate::vm::boot_guest_with(None, 1, "64M", &["--insecure"]);
    let (dest, addr) = start_dest(None, "127.0.0.1", &["--insecure"]);
    let cases = [
        (Spoil::FlipByte, "CRC mismatch"),
        (Spoil::HalfEnvelope, "truncated"),
        (Spoil::CutFrame, "mid-frame"),
    ];
    for (n, (spoil, want)) in cases.into_iter().enumerate() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = l.local_addr().unwrap().to_string();
        let d = addr.clone();
        let relay = std::thread::spawn(move || relay_and_spoil(l, d, spoil));
        let r = migrate(&src, &relay_addr, &[]);
        let answer = relay.join().expect("relay");
        println!("{spoil:?}: the destination answered {answer:?}; the source: {r:?}");
        let refusal = crate::migration::refused(&r);
        let st = attempts(&dest, n as u32 + 1, Duration::from_secs(10));
        assert_eq!(st.state, "incoming", "{spoil:?}: {st:?}");
        let e = st.last_error.as_deref().unwrap_or("");
        println!("{spoil:?}: destination last_error: {e}");
        assert!(e.contains(want), "{spoil:?}: {st:?}");
        match spoil {
            Spoil::CutFrame => assert!(answer.is_none(), "{answer:?}"),
            _ => {
                let Some(vmm::migration::Wire::Failed { reason }) = answer else {
                    panic!("{spoil:?}: the destination did not say Failed: {answer:?}");
                };
                assert!(reason.contains(want), "{reason}");
                let msg = &refusal.message;
                assert!(
                    msg.contains("destination failed before resuming") && msg.contains(want),
                    "{msg}"
                );
            }
        }
        still_running(&src);
    }
    let r = migrate(&src, &addr, &[]);
    check_report(&r, 64 << 20);
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 1);
    let log = dest.stderr_text();
    assert!(!log.contains("panicked"), "{log}");
    dest.ctl(&["shutdown"]);
    println!("took {:?}", t0.elapsed());
}
