//! Property tests: every message survives encode → decode, and no byte string makes the decoder
//! panic.

use proptest::prelude::*;
use proto::*;

const PS: u32 = 4096;

fn layout() -> impl Strategy<Value = Layout> {
    prop::collection::vec((0u64..1 << 30, 1u64..1 << 20), 0..5).prop_map(|v| Layout {
        regions: v
            .into_iter()
            .map(|(g, l)| Region {
                gpa_start: GuestPhysAddr(g * 4096),
                len_bytes: l * 4096,
            })
            .collect(),
    })
}

fn channel() -> impl Strategy<Value = Channel> {
    prop_oneof![
        Just(Channel::Control),
        Just(Channel::Urgent),
        Just(Channel::Bulk)
    ]
}

fn check(msg: &Message<'_>) {
    let bytes = msg.to_vec();
    let (back, used) = Message::decode_frame(&bytes, PS).expect("decodes");
    assert_eq!(used, bytes.len());
    assert_eq!(&back, msg);
}

proptest! {
    #[test]
    fn hello_round_trips(ch in channel(), session: u64, l in layout(), v: u16) {
        check(&Message::Hello(Hello { version: v, channel: ch, session, page_size: PS, layout: l }));
    }

    #[test]
    fn welcome_round_trips(session: u64, l in layout(), ps: u32) {
        check(&Message::Welcome(Welcome { version: 1, session, page_size: ps, layout: l }));
    }

    #[test]
    fn request_round_trips(first in 0u64..u64::MAX / 2, count in 1u32..=MAX_PAGES_PER_FRAME, f in 0u32..=1) {
        check(&Message::Request(Request { first: PageIndex(first), count, fault_pages: f.min(count) }));
    }

    #[test]
    fn pages_round_trip(first in 0u64..1 << 40, zeros in prop::collection::vec(any::<bool>(), 1..40), seed: u8) {
        let count = zeros.len() as u32;
        let mut mask = vec![0u8; mask_len(count)];
        let mut data = Vec::new();
        for (i, z) in zeros.iter().enumerate() {
            if *z { mask[i / 8] |= 1 << (i % 8); } else {
                data.extend(std::iter::repeat_n(seed.wrapping_add(i as u8) | 1, PS as usize));
            }
        }
        let p = Pages { first: PageIndex(first), count, origin: Origin::Stream, zero_mask: &mask, data: &data };
        check(&Message::Pages(p));
        // runs cover every page once, in order, and carry exactly the data
        let mut next = first;
        let mut bytes = 0;
        for r in p.runs(PS) {
            prop_assert_eq!(r.first.0, next);
            next += u64::from(r.count);
            if let Some(d) = r.data { prop_assert_eq!(d.len(), r.count as usize * PS as usize); bytes += d.len(); }
        }
        prop_assert_eq!(next, first + u64::from(count));
        prop_assert_eq!(bytes, data.len());
    }

    #[test]
    fn bitmap_round_trips(first in 0u64..1 << 40, bits in prop::collection::vec(any::<u8>(), 0..64), dirty: bool) {
        let count = bits.len() as u64 * 8;
        let kind = if dirty { BitmapKind::Dirty } else { BitmapKind::Received };
        check(&Message::Bitmap(Bitmap { kind, first: PageIndex(first), count, bits: &bits }));
    }

    #[test]
    fn state_round_trips(blob in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&Message::State { blob: &blob });
    }

    #[test]
    fn small_messages_round_trip(enable: bool, code: u16, reason in ".{0,64}") {
        check(&Message::Stream { enable });
        check(&Message::InFlight { first: PageIndex(u64::from(code) << 20), count: u32::from(code) % MAX_PAGES_PER_FRAME + 1 });
        check(&Message::Done);
        check(&Message::Error { code, reason: &reason });
    }

    /// Any bytes at all: decode returns Ok or Err, never panics, never over-reads.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Message::decode_frame(&bytes, PS);
    }

    /// A valid header followed by random payload bytes of any kind.
    #[test]
    fn random_payloads_never_panic(kind in 1u16..=10, payload in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut bytes = Header { kind: Kind::from_u16(kind).unwrap(), payload_len: payload.len() as u32 }.encode().to_vec();
        bytes.extend_from_slice(&payload);
        let _ = Message::decode_frame(&bytes, PS);
    }

    /// Flipping any byte of a valid frame yields Ok or a typed error, never a panic.
    #[test]
    fn corrupted_frames_never_panic(idx: prop::sample::Index, val: u8, n in 1u32..20) {
        let mask = vec![0b1010_1010u8; mask_len(n)];
        let mask_last = mask.len() - 1;
        let mut mask = mask;
        if n % 8 != 0 { mask[mask_last] &= (1u8 << (n % 8)) - 1; }
        let zeros: u32 = mask.iter().map(|b| b.count_ones()).sum();
        let data = vec![7u8; ((n - zeros) * PS) as usize];
        let mut bytes = Message::Pages(Pages { first: PageIndex(5), count: n, origin: Origin::Fault, zero_mask: &mask, data: &data }).to_vec();
        let i = idx.index(bytes.len());
        bytes[i] = val;
        let _ = Message::decode_frame(&bytes, PS);
        let _ = Message::decode_frame(&bytes[..i], PS);
    }
}

#[test]
fn oversized_and_lying_lengths_are_refused_before_allocating() {
    // a header announcing 4 GiB
    let mut b = Header {
        kind: Kind::Pages,
        payload_len: 0,
    }
    .encode();
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Header::decode(&b),
        Err(DecodeError::TooLong { .. })
    ));
    // a Pages frame claiming more pages than the cap
    let mut p = Vec::new();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&(MAX_PAGES_PER_FRAME + 1).to_le_bytes());
    p.extend_from_slice(&[3, 0, 0, 0]);
    let h = Header {
        kind: Kind::Pages,
        payload_len: p.len() as u32,
    };
    assert!(matches!(
        Message::decode(&h, &p, PS),
        Err(DecodeError::TooLong {
            what: "pages count",
            ..
        })
    ));
    // a Hello with 2^32-1 regions
    let mut hello = Message::Hello(Hello {
        version: 1,
        channel: Channel::Control,
        session: 0,
        page_size: PS,
        layout: Layout::default(),
    })
    .to_vec();
    let n = hello.len();
    hello[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Message::decode_frame(&hello, PS),
        Err(DecodeError::TooLong {
            what: "region count",
            ..
        })
    ));
    // data shorter than the zero mask says
    let mask = [0u8; 1];
    let mut pages = Message::Pages(Pages {
        first: PageIndex(0),
        count: 1,
        origin: Origin::Fault,
        zero_mask: &mask,
        data: &[1u8; 4096],
    })
    .to_vec();
    pages.truncate(pages.len() - 1);
    let plen = (pages.len() - HEADER_LEN) as u32;
    pages[8..12].copy_from_slice(&plen.to_le_bytes());
    assert!(matches!(
        Message::decode_frame(&pages, PS),
        Err(DecodeError::LengthMismatch { .. })
    ));
    // a state blob with a wrong CRC
    let mut st = Message::State { blob: b"abc" }.to_vec();
    let last = st.len() - 1;
    st[last] ^= 1;
    assert!(matches!(
        Message::decode_frame(&st, PS),
        Err(DecodeError::BadCrc { .. })
    ));
}

/// `InFlight`: truncated, trailing, zero, oversized and wrapping payloads are typed errors.
#[test]
fn in_flight_garbage_is_refused() {
    let good = Message::InFlight {
        first: PageIndex(7),
        count: 3,
    }
    .to_vec();
    let payload = &good[HEADER_LEN..];
    let frame = |p: &[u8]| {
        let mut b = Header {
            kind: Kind::InFlight,
            payload_len: p.len() as u32,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(p);
        b
    };
    for cut in 0..payload.len() {
        assert!(
            matches!(
                Message::decode_frame(&frame(&payload[..cut]), PS),
                Err(DecodeError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    let mut long = payload.to_vec();
    long.push(0);
    assert!(matches!(
        Message::decode_frame(&frame(&long), PS),
        Err(DecodeError::LengthMismatch { .. })
    ));
    let with = |first: u64, count: u32| {
        let mut p = first.to_le_bytes().to_vec();
        p.extend_from_slice(&count.to_le_bytes());
        match Message::decode_frame(&frame(&p), PS) {
            Ok((Message::InFlight { first, count }, _)) => Ok((first, count)),
            Ok((m, _)) => panic!("decoded as {:?}", m.kind()),
            Err(e) => Err(e),
        }
    };
    assert!(matches!(
        with(7, 0),
        Err(DecodeError::InvalidField { value: 0, .. })
    ));
    assert!(matches!(
        with(7, MAX_PAGES_PER_FRAME + 1),
        Err(DecodeError::TooLong { .. })
    ));
    assert!(matches!(
        with(u64::MAX, 2),
        Err(DecodeError::InvalidField { .. })
    ));
    assert_eq!(with(7, 3), Ok((PageIndex(7), 3)));
}
