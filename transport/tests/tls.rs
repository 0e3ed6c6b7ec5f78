//! Handshakes and data over real TCP sockets on loopback.

use std::io;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use transport::tls::*;
use transport::{Security, Sock};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("transport-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn psk(key: &str) -> Security {
    Security::psk(key.as_bytes(), "test key").unwrap()
}

/// Runs `server` on an accepted connection in a thread while `client` connects; returns both
/// results.
fn pair(client: &Security, server: &Security) -> (io::Result<Sock>, io::Result<Sock>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = transport::Addr::Tcp(l.local_addr().unwrap());
    let server = server.clone();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        server.server(Sock::Tcp(s), Duration::from_secs(5))
    });
    let c = Sock::connect(&addr, true, Duration::from_secs(5))
        .and_then(|s| client.client(s, Duration::from_secs(5)));
    let s = t.join().unwrap();
    (c, s)
}

#[test]
fn psk_peers_talk_both_ways_and_share_a_connection_between_threads() {
    let k = psk("0123456789abcdef0123456789abcdef");
    let (c, s) = pair(&k, &k);
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.peer_identity().as_deref(), Some(PSK_IDENTITY));
    assert_eq!(s.peer_identity().as_deref(), Some(PSK_IDENTITY));
    // one thread writes 8 MiB while another reads the replies on a clone
    let mut c2 = c.try_clone().unwrap();
    let data: Vec<u8> = (0..8 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let sent = data.clone();
    let w = std::thread::spawn(move || c2.write_all(&sent).unwrap());
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 100_000];
        let mut n = 0;
        while n < 8 << 20 {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0);
            s.write_all(&buf[..k]).unwrap();
            n += k;
        }
        s
    });
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).unwrap();
    w.join().unwrap();
    let s = echo.join().unwrap();
    assert!(back == data, "data changed on the way");
    drop(s);
    let mut b = [0u8; 1];
    assert_eq!(
        c.read(&mut b).unwrap(),
        0,
        "end of stream after the peer closed"
    );
}

#[test]
fn a_wrong_psk_is_refused_on_both_sides_with_a_clear_error() {
    let (c, s) = pair(
        &psk("0123456789abcdef0123456789abcdef"),
        &psk("ffffffffffffffffffffffffffffffff"),
    );
    let ce = c.map(|_| ()).unwrap_err().to_string();
    assert!(ce.contains("TLS"), "{ce}");
    let se = s.map(|_| ()).unwrap_err().to_string();
    assert!(se.contains("pre-shared key"), "{se}");
}

#[test]
fn plaintext_and_unset_are_refused_or_named() {
    let k = psk("0123456789abcdef0123456789abcdef");
    // a TLS client against a plaintext server that answers garbage
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = transport::Addr::Tcp(l.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
        let _ = s.write_all(b"PGSV this is not TLS at all, just a frame of some protocol");
    });
    let e = Sock::connect(&addr, true, Duration::from_secs(5))
        .and_then(|s| k.client(s, Duration::from_secs(5)))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    t.join().unwrap();
    assert!(e.contains("does not speak TLS"), "{e}");
    // nothing configured: refused before a byte is sent
    let (c, _) = std::os::unix::net::UnixStream::pair().unwrap();
    let e = Security::Unset
        .client(Sock::Unix(c), Duration::from_secs(1))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("--insecure"), "{e}");
}

#[test]
fn a_silent_peer_fails_the_handshake_at_its_deadline() {
    let k = psk("0123456789abcdef0123456789abcdef");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = transport::Addr::Tcp(l.local_addr().unwrap());
    let t0 = Instant::now();
    let e = Sock::connect(&addr, true, Duration::from_secs(5))
        .and_then(|s| k.client(s, Duration::from_millis(300)))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    drop(l);
}

#[test]
fn certificates_with_the_allowed_identity_pass_and_others_are_refused() {
    let d = tmpdir("certs");
    make_certificates(&d, &["src".into(), "dst".into(), "mallory".into()]).unwrap();
    let key_mode = std::fs::metadata(d.join("src-key.pem")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(key_mode.mode() & 0o777, 0o600);
    // nothing is overwritten
    assert!(make_certificates(&d, &["src".into()]).is_err());
    let node = |n: &str, peers: &[&str]| {
        Security::certificates(
            &d.join("ca.pem"),
            &d.join(format!("{n}.pem")),
            &d.join(format!("{n}-key.pem")),
            &peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        )
        .unwrap()
    };
    let (c, s) = pair(&node("src", &["dst"]), &node("dst", &["src"]));
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.peer_identity().as_deref(), Some("dst"));
    assert_eq!(s.peer_identity().as_deref(), Some("src"));
    // a valid certificate of the same CA, but an identity the destination does not accept
    let (c, s) = pair(&node("mallory", &["dst"]), &node("dst", &["src"]));
    let se = s.map(|_| ()).unwrap_err().to_string();
    assert!(
        se.contains("mallory") && se.contains("not one this node accepts"),
        "{se}"
    );
    let mut c = c.unwrap_or_else(|e| panic!("client side finishes first: {e}"));
    let mut b = [0u8; 1];
    let ce = c.read(&mut b).unwrap_err().to_string();
    assert!(ce.contains("refused"), "{ce}");
    // and a server with the wrong identity is refused by the client
    let (c, _) = pair(&node("src", &["dst"]), &node("mallory", &["src"]));
    let ce = c.map(|_| ()).unwrap_err().to_string();
    assert!(ce.contains("mallory"), "{ce}");
    // another CA's certificate is refused
    let d2 = tmpdir("certs2");
    make_certificates(&d2, &["src".into()]).unwrap();
    let other = Security::certificates(
        &d2.join("ca.pem"),
        &d2.join("src.pem"),
        &d2.join("src-key.pem"),
        &["dst".into()],
    )
    .unwrap();
    // (the client, of the other CA, refuses the server's certificate first)
    let (c, s) = pair(&other, &node("dst", &["src"]));
    let ce = c.map(|_| ()).unwrap_err().to_string();
    assert!(ce.contains("certificate is refused"), "{ce}");
    assert!(s.is_err());
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&d2);
}

#[test]
fn key_files_must_be_private_and_keys_long() {
    let d = tmpdir("psk");
    let p = d.join("k");
    make_psk(&p).unwrap();
    assert!(Security::psk_file(&p).unwrap().is_secure());
    assert!(make_psk(&p).is_err(), "an existing key is not overwritten");
    let short = d.join("short");
    std::fs::write(&short, "tooshort\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = Security::psk_file(&short)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 32"), "{e}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Security::psk_file(&p).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("readable by other users"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_non_blocking_server_handshakes_as_it_is_read_and_written() {
    let k = psk("0123456789abcdef0123456789abcdef");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = transport::Addr::Tcp(l.local_addr().unwrap());
    let kc = k.clone();
    let t = std::thread::spawn(move || {
        let mut c = Sock::connect(&addr, true, Duration::from_secs(5))
            .and_then(|s| kc.client(s, Duration::from_secs(5)))
            .unwrap();
        c.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
        b
    });
    let (s, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let mut s = k.server_start(Sock::Tcp(s)).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < 5 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no hello");
        let _ = s.flush_pending();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => panic!("closed"),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(&got, b"hello");
    assert_eq!(s.peer_identity().as_deref(), Some(PSK_IDENTITY));
    s.write_all(b"world").unwrap();
    while s.pending_out() {
        let _ = s.flush_pending();
    }
    assert_eq!(&t.join().unwrap(), b"world");
}

/// Reads much smaller than a record, and bursts larger than the read buffer: every byte comes
/// through in order (rustls takes no more ciphertext while 16 KiB of plaintext wait).
#[test]
fn small_reads_of_a_large_burst_lose_nothing() {
    let k = psk("0123456789abcdef0123456789abcdef");
    let (c, s) = pair(&k, &k);
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    let data: Vec<u8> = (0..3 << 20).map(|i| (i * 13 % 241) as u8).collect();
    let sent = data.clone();
    let w = std::thread::spawn(move || {
        c.write_all(&sent).unwrap();
        c
    });
    let mut got = Vec::with_capacity(data.len());
    let mut b = [0u8; 3000];
    while got.len() < data.len() {
        let want = (data.len() - got.len()).min(if got.len() % 2 == 0 { 7 } else { b.len() });
        let n = s.read(&mut b[..want]).unwrap();
        assert!(n > 0, "early end of stream at {}", got.len());
        got.extend_from_slice(&b[..n]);
    }
    assert!(got == data);
    drop(w.join().unwrap());
}

/// A byte changed on the wire after the handshake: the receiver refuses the record (it never
/// sees the altered plaintext) and says why.
#[test]
fn a_record_altered_on_the_wire_is_refused() {
    let k = psk("0123456789abcdef0123456789abcdef");
    // client <-> relay <-> server; the relay flips one byte of the 2nd record after 4 KiB
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_addr = transport::Addr::Tcp(l.local_addr().unwrap());
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = transport::Addr::Tcp(relay.local_addr().unwrap());
    let ks = k.clone();
    let srv = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut s = ks.server(Sock::Tcp(s), Duration::from_secs(5)).unwrap();
        let mut got = vec![0u8; 64 << 10];
        s.read_exact(&mut got).map(|_| got)
    });
    let rl = std::thread::spawn(move || {
        let (mut from_client, _) = relay.accept().unwrap();
        let to_server = std::net::TcpStream::connect(match &server_addr {
            transport::Addr::Tcp(a) => *a,
            _ => unreachable!(),
        })
        .unwrap();
        let mut back_from = to_server.try_clone().unwrap();
        let mut back_to = from_client.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
        });
        let mut to_server = to_server;
        let mut total = 0usize;
        let mut b = vec![0u8; 8192];
        let mut flipped = false;
        loop {
            let n = match from_client.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // the handshake is a few KiB at most; past 20 KiB we are in the data records
            if !flipped && total + n > 20 << 10 {
                b[n / 2] ^= 0x40;
                flipped = true;
            }
            total += n;
            if to_server.write_all(&b[..n]).is_err() {
                break;
            }
        }
    });
    let mut c = Sock::connect(&relay_addr, true, Duration::from_secs(5))
        .and_then(|s| k.client(s, Duration::from_secs(5)))
        .unwrap();
    let _ = c.write_all(&vec![0x5a; 64 << 10]);
    let r = srv.join().unwrap();
    let e = r.map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("failed authentication"), "{e}");
    drop(c);
    rl.join().unwrap();
}
