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
        Msg::ReadPages {
            index: 7,
            level: 3,
            old: vec![4; 1024],
        },
        Msg::Pages {
            index: 7,
            hash: [2; 32],
            mask: vec![0b10; 32],
            data: vec![8; 11],
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

/// A block of LEN bytes of a seeded pseudo-random pattern.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn only_the_changed_pages_are_sent_and_they_rebuild_the_block() {
    let old = pattern(BLOCK as usize, 1);
    let mut new = old.clone();
    // A database page of 8 KiB across two pages, a byte in another, and
    // the last page.
    new[40960..49152].copy_from_slice(&pattern(8192, 2));
    new[200 * 4096 + 17] ^= 1;
    let last = new.len() - 1;
    new[last] ^= 0xff;
    let (mask, pages) = changed_pages(&new, &short_page_hashes(&old));
    let sent: Vec<usize> = (0..PAGES_PER_BLOCK)
        .filter(|p| mask[p / 8] & (1 << (p % 8)) != 0)
        .collect();
    assert_eq!(sent, vec![10, 11, 200, 255]);
    assert_eq!(pages.len(), 4 * 4096);
    assert_eq!(apply_pages(&old, &mask, &pages).unwrap(), new);
}

#[test]
fn a_short_last_block_and_a_foreign_old_block_send_what_they_must() {
    // The disk's last block: 10 000 bytes, three pages, the third short.
    let old = pattern(10_000, 3);
    let mut new = old.clone();
    new[9_000] ^= 1;
    let (mask, pages) = changed_pages(&new, &short_page_hashes(&old));
    assert_eq!(mask, vec![0b100]);
    assert_eq!(pages.len(), 10_000 - 8192);
    assert_eq!(apply_pages(&old, &mask, &pages).unwrap(), new);
    // Hashes of another shape (a block of another length): every page.
    let (mask, pages) = changed_pages(&new, &short_page_hashes(&old[..4096]));
    assert_eq!(mask, vec![0b111]);
    assert_eq!(pages, new);
}

#[test]
fn pages_that_do_not_fit_the_mask_are_refused() {
    let old = pattern(3 * 4096, 4);
    assert!(apply_pages(&old, &[0b1], &[0; 4095]).is_err());
    assert!(apply_pages(&old, &[0b1], &[0; 4097]).is_err());
    assert!(apply_pages(&old, &[0b1, 0], &[0; 4096]).is_err());
    assert_eq!(apply_pages(&old, &[0], &[]).unwrap(), old);
}
