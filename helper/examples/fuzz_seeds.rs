//! The fuzz targets' seeds of the helper protocol, made by its own
//! encoder (`scripts/fuzz` runs this): one file per message kind, and a
//! whole session's stream as the two ends exchange it.
//!
//!     cargo run -p drydock-helper --example fuzz_seeds -- DIR

use std::io::Write;

use drydock_helper::package::{Piece, encode_pieces};
use drydock_helper::proto as pages;
use drydock_helper::proto::{Msg, write_msg};

fn main() -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: fuzz_seeds DIR"));
    std::fs::create_dir_all(&dir)?;
    let block: Vec<u8> = (0..1u32 << 16).map(|i| (i % 251) as u8).collect();
    let hash = pages::sha256(&block);
    let zst = zstd::bulk::compress(&block, 1)?;
    let old: Vec<u8> = block.iter().map(|b| b.wrapping_add(1)).collect();
    let (mask, changed) = pages::changed_pages(&block, &old);
    let pieces = encode_pieces(&[Piece {
        stream_offset: 4096,
        len: 4096,
        hash,
        disk_offset: 1 << 20,
    }]);
    let msgs = vec![
        Msg::Hello { version: 3 },
        Msg::Open {
            version: 3,
            device: "/dev/vda".into(),
            write: false,
        },
        Msg::Opened {
            size: 6 << 30,
            direct: true,
        },
        Msg::Read {
            first: 0,
            end: 64,
            level: 1,
        },
        Msg::Zero { first: 3, count: 5 },
        Msg::Block {
            index: 1,
            hash,
            data: zst.clone(),
        },
        Msg::HashBlocks {
            first: 0,
            end: 16,
            pages: true,
        },
        Msg::BlockHash {
            index: 2,
            hash,
            pages: pages::page_hashes(&block),
        },
        Msg::Write {
            offset: 1 << 20,
            len: block.len() as u32,
            hash,
            data: zst.clone(),
        },
        Msg::Written {
            offset: 1 << 20,
            len: block.len() as u32,
        },
        Msg::Rebuild {
            addr: "deb.debian.org:80".into(),
            host: "deb.debian.org".into(),
            path: "/debian/pool/main/b/bash/bash_5.2.37-2_amd64.deb".into(),
            format: 0,
            pieces,
            more: false,
        },
        Msg::RebuildWait,
        Msg::Rebuilt {
            written: vec![0b101],
            fetched: 123456,
            error: String::new(),
        },
        Msg::ReadPages {
            index: 7,
            level: 1,
            old: pages::short_page_hashes(&old),
        },
        Msg::Pages {
            index: 7,
            hash,
            mask,
            data: zstd::bulk::compress(&changed, 1)?,
        },
        Msg::Error {
            message: "cannot open /dev/vda: Permission denied".into(),
        },
        Msg::Finish,
        Msg::Done {
            peak_rss_kib: 9000,
            bytes_read: 1 << 30,
            bytes_written: 0,
        },
    ];
    let mut session = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let mut one = Vec::new();
        write_msg(&mut one, m)?;
        std::fs::write(dir.join(format!("{i:02}-{}", m.name())), &one)?;
        session.write_all(&one)?;
    }
    std::fs::write(dir.join("session"), &session)?;
    Ok(())
}
