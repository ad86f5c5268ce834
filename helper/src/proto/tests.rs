use super::*;

fn all() -> Vec<Msg> {
    vec![
        Msg::Hello { version: 7 },
        Msg::Open {
            version: 1,
            device: "/dev/vda".into(),
            write: true,
        },
        Msg::Opened {
            size: 123,
            direct: true,
        },
        Msg::Read {
            first: 3,
            end: 9,
            level: -2,
        },
        Msg::Zero { first: 1, count: 2 },
        Msg::Block {
            index: 4,
            hash: [9; 32],
            data: vec![1, 2, 3],
        },
        Msg::HashBlocks {
            first: 0,
            end: 5,
            pages: true,
        },
        Msg::BlockHash {
            index: 2,
            hash: [1; 32],
            pages: vec![5; 32],
        },
        Msg::Write {
            offset: 4096,
            len: 8192,
            hash: [3; 32],
            data: vec![7; 10],
        },
        Msg::Written {
            offset: 4096,
            len: 8192,
        },
        Msg::Finish,
        Msg::Done {
            peak_rss_kib: 4000,
            bytes_read: 1,
            bytes_written: 2,
        },
        Msg::Error {
            message: "no".into(),
        },
        Msg::Rebuild {
            addr: "192.0.2.1:80".into(),
            host: "deb.debian.org".into(),
            path: "/debian/pool/main/a/a_1_amd64.deb".into(),
            format: 0,
            pieces: vec![1; 52],
            more: true,
        },
        Msg::RebuildWait,
        Msg::Rebuilt {
            written: vec![0b101],
            fetched: 9,
            error: String::new(),
        },
    ]
}

#[test]
fn every_message_round_trips_through_both_readers() {
    let mut stream = Vec::new();
    for m in all() {
        write_msg(&mut stream, &m).unwrap();
    }
    let mut r = &stream[..];
    let mut back = Vec::new();
    while let Some(m) = read_msg(&mut r).unwrap() {
        back.push(m);
    }
    assert_eq!(back, all());
    // Byte by byte through the decoder.
    let mut d = Decoder::default();
    let mut back = Vec::new();
    for b in &stream {
        d.feed(std::slice::from_ref(b));
        while let Some(m) = d.next_msg().unwrap() {
            back.push(m);
        }
    }
    assert_eq!(back, all());
    assert_eq!(d.pending(), 0);
}

#[test]
fn a_flipped_bit_is_a_damaged_frame() {
    let f = Msg::Block {
        index: 1,
        hash: [0; 32],
        data: vec![0; 100],
    }
    .encode();
    for i in [0usize, 6, 50, f.len() - 1] {
        let mut g = f.clone();
        g[i] ^= 0x10;
        let e = read_msg(&mut &g[..]).unwrap_err();
        assert!(
            matches!(
                e,
                ProtoError::Checksum { .. }
                    | ProtoError::Truncated { .. }
                    | ProtoError::UnknownKind(_)
            ),
            "byte {i}: {e}"
        );
    }
}

#[test]
fn a_cut_stream_is_truncated_not_clean() {
    let f = Msg::Hello { version: 1 }.encode();
    for cut in 1..f.len() {
        let e = read_msg(&mut &f[..cut]).unwrap_err();
        assert!(matches!(e, ProtoError::Truncated { .. }), "{cut}: {e}");
    }
    assert!(read_msg(&mut &f[..0]).unwrap().is_none());
}

#[test]
fn an_absurd_length_is_refused_before_allocating() {
    let mut f = Msg::Finish.encode();
    f[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        read_msg(&mut &f[..]).unwrap_err(),
        ProtoError::TooLarge(_)
    ));
}
