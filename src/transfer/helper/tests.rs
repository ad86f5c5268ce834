//! The protocol end to end, in-process: the helper's real server on
//! temporary files, drydock's real client halves, no SSH in between.
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Result;
use drydock_helper::proto::{self, BLOCK, Decoder, Msg, PAGE, VERSION, page_hashes, sha256};
use drydock_helper::server::serve;
use proptest::prelude::*;

use super::*;
use crate::image::manifest::block_len;

/// A pull's destination in memory.
struct VecSink {
    data: Vec<u8>,
    next: u64,
    size: u64,
}

impl BlockSink for VecSink {
    fn next_block(&self) -> u64 {
        self.next
    }
    fn zeros(&mut self, count: u64) -> Result<()> {
        for _ in 0..count {
            let len = block_len(self.size, self.next) as usize;
            self.data.extend(std::iter::repeat_n(0, len));
            self.next += 1;
        }
        Ok(())
    }
    fn block(&mut self, data: &[u8], _: [u8; 32]) -> Result<()> {
        self.data.extend_from_slice(data);
        self.next += 1;
        Ok(())
    }
}

/// A disk file: `size` bytes, a hole-y file with the given runs of
/// random data and of written zeros.
fn disk(dir: &Path, name: &str, size: u64, runs: &[(u64, u64, u8)]) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    for &(off, len, kind) in runs {
        if off >= size {
            continue;
        }
        let len = len.min(size - off) as usize;
        let data: Vec<u8> = match kind {
            0 => vec![0; len],
            k => (0..len)
                .map(|i| ((i as u64 * 2654435761) >> 7) as u8 ^ k)
                .collect(),
        };
        f.write_all_at(&data, off).unwrap();
    }
    p
}

fn run_helper(input: &[u8]) -> (Result<(), String>, Vec<u8>) {
    let mut out = Vec::new();
    let r = serve(input, &mut out);
    (r, out)
}

fn pull_all(path: &Path) -> Vec<u8> {
    let size = std::fs::metadata(path).unwrap().len();
    let n = size.div_ceil(BLOCK);
    let (r, out) = run_helper(&pull_request(path.to_str().unwrap(), 0, n));
    r.unwrap();
    let mut feed = PullFeed::new(size).unwrap();
    let mut sink = VecSink {
        data: Vec::new(),
        next: 0,
        size,
    };
    // In odd-sized pieces, as SSH delivers them.
    for piece in out.chunks(7919) {
        feed.feed(piece, &mut sink).unwrap();
    }
    assert_eq!(feed.pending(), 0);
    let done = feed.done.lock().unwrap().expect("the helper said Done");
    assert!(done.peak_rss_kib > 0);
    sink.data
}

/// Everything drydock sends for a push of `new` onto `disk`, whose
/// content was `old`: hash the blocks and pages, plan, write frames.
fn push_frames(disk: &Path, old: &Path, new: &Path) -> Vec<Vec<u8>> {
    let size = std::fs::metadata(new).unwrap().len();
    let n = size.div_ceil(BLOCK);
    let mut ask = Msg::Open {
        version: VERSION,
        device: disk.to_str().unwrap().into(),
        write: false,
    }
    .encode();
    ask.extend(
        Msg::HashBlocks {
            first: 0,
            end: n,
            pages: true,
        }
        .encode(),
    );
    ask.extend(Msg::Finish.encode());
    let (r, out) = run_helper(&ask);
    r.unwrap();
    let mut rd = &out[..];
    let oldf = File::open(old).unwrap();
    let newf = File::open(new).unwrap();
    let mut frames = vec![
        Msg::Open {
            version: VERSION,
            device: disk.to_str().unwrap().into(),
            write: true,
        }
        .encode(),
    ];
    let mut z = zstd::bulk::Compressor::new(PUSH_LEVEL).unwrap();
    while let Some(m) = proto::read_msg(&mut rd).unwrap() {
        if let Msg::BlockHash { index, hash, pages } = m {
            let len = block_len(size, index) as usize;
            let mut o = vec![0; len];
            let mut b = vec![0; len];
            oldf.read_exact_at(&mut o, index * BLOCK).unwrap();
            newf.read_exact_at(&mut b, index * BLOCK).unwrap();
            let old_hash = sha256(&o);
            for p in plan_block(index, &hash, &pages, Some(&old_hash), &b, None).unwrap() {
                frames.push(write_frame(&newf, p, &mut z).unwrap());
            }
        }
    }
    frames.push(Msg::Finish.encode());
    frames
}

fn written(out: &[u8]) -> Vec<(u64, u32)> {
    let mut rd = out;
    let mut v = Vec::new();
    while let Ok(Some(m)) = proto::read_msg(&mut rd) {
        if let Msg::Written { offset, len } = m {
            v.push((offset, len));
        }
    }
    v
}

fn layout() -> impl Strategy<Value = (u64, Vec<(u64, u64, u8)>)> {
    // Sizes up to 5 MiB and a bit, rarely a multiple of the block or
    // the page; runs of data (kind 1..) and of written zeros (kind 0).
    (1u64..(5 * BLOCK + 5000)).prop_flat_map(|size| {
        let run = (0..size, 1u64..(BLOCK + 4096), 0u8..4);
        (Just(size), proptest::collection::vec(run, 0..8))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn pull_round_trips_bit_exact((size, runs) in layout()) {
        let t = tempfile::tempdir().unwrap();
        let d = disk(t.path(), "disk", size, &runs);
        prop_assert_eq!(pull_all(&d), std::fs::read(&d).unwrap());
    }

    #[test]
    fn push_round_trips_bit_exact(
        (size, runs) in layout(),
        changes in proptest::collection::vec((0u64..(6 * BLOCK), 1u64..(2 * BLOCK), 0u8..4), 0..6),
    ) {
        let t = tempfile::tempdir().unwrap();
        let old = disk(t.path(), "old", size, &runs);
        let mut all = runs.clone();
        all.extend(changes.iter().map(|&(o, l, k)| (o, l, k.wrapping_add(5))));
        let new = disk(t.path(), "new", size, &all);
        let target = t.path().join("disk");
        std::fs::copy(&old, &target).unwrap();
        let frames = push_frames(&target, &old, &new);
        let (r, out) = run_helper(&frames.concat());
        prop_assert!(r.is_ok(), "{:?}", r);
        prop_assert_eq!(written(&out).len(), frames.len() - 2);
        prop_assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&new).unwrap());
        // Nothing left to write afterwards.
        prop_assert_eq!(push_frames(&target, &old, &new).len(), 2);
    }
}

/// Old and new images that differ in four separate places.
fn four_changes(t: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let size = 4 * BLOCK + 777;
    let runs = [(0, 4 * BLOCK + 777, 1)];
    let old = disk(t, "old", size, &runs);
    let new = disk(
        t,
        "new",
        size,
        &[
            (0, 4 * BLOCK + 777, 1),
            (10, 5, 9),
            (BLOCK + 8192, 100, 9),
            (3 * BLOCK, 4096, 9),
            (size - 3, 3, 9),
        ],
    );
    let target = t.join("disk");
    std::fs::copy(&old, &target).unwrap();
    (old, new, target)
}

#[test]
fn a_damaged_frame_stops_the_helper_before_it_writes() {
    let t = tempfile::tempdir().unwrap();
    let (old, new, target) = four_changes(t.path());
    let mut frames = push_frames(&target, &old, &new);
    assert_eq!(frames.len(), 6);
    // Damage the third write's data (frame 3: Open, W, W, [W], W, Finish).
    let f = &mut frames[3];
    let n = f.len();
    f[n - 10] ^= 0x40;
    let before = std::fs::read(&target).unwrap();
    let (r, out) = run_helper(&frames.concat());
    let e = r.unwrap_err();
    assert!(e.contains("a frame arrived damaged"), "{e}");
    // The two writes before it were done and confirmed; nothing after.
    assert_eq!(written(&out).len(), 2);
    let after = std::fs::read(&target).unwrap();
    let newb = std::fs::read(&new).unwrap();
    assert_eq!(after[..BLOCK as usize * 2], newb[..BLOCK as usize * 2]);
    assert_eq!(after[BLOCK as usize * 2..], before[BLOCK as usize * 2..]);
    // The error reached drydock's side as a frame.
    let mut rd = &out[..];
    let mut last = None;
    while let Ok(Some(m)) = proto::read_msg(&mut rd) {
        last = Some(m);
    }
    assert!(matches!(last, Some(Msg::Error { message }) if message.contains("damaged")));
}

#[test]
fn data_that_does_not_match_its_hash_is_not_written() {
    let t = tempfile::tempdir().unwrap();
    let (old, new, target) = four_changes(t.path());
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    // A well-formed frame whose data is not what its hash says.
    let bad = Msg::Write {
        offset: 0,
        len: 4096,
        hash: [7; 32],
        data: z.compress(&[1u8; 4096]).unwrap(),
    }
    .encode();
    let mut frames = push_frames(&target, &old, &new);
    frames.insert(1, bad);
    let before = std::fs::read(&target).unwrap();
    let (r, out) = run_helper(&frames.concat());
    assert!(
        r.unwrap_err()
            .contains("arrived damaged (its hash does not match); nothing of it was written")
    );
    assert!(written(&out).is_empty());
    assert_eq!(std::fs::read(&target).unwrap(), before);
}

#[test]
fn a_truncated_stream_writes_nothing_further() {
    let t = tempfile::tempdir().unwrap();
    let (old, new, target) = four_changes(t.path());
    let frames = push_frames(&target, &old, &new);
    let before = std::fs::read(&target).unwrap();
    // Open, one write, then half of the next.
    let mut input = frames[0].clone();
    input.extend(&frames[1]);
    input.extend(&frames[2][..frames[2].len() / 2]);
    let (r, out) = run_helper(&input);
    let e = r.unwrap_err();
    assert!(e.contains("the stream ended inside a frame"), "{e}");
    assert_eq!(written(&out).len(), 1);
    let after = std::fs::read(&target).unwrap();
    assert_eq!(after[BLOCK as usize..], before[BLOCK as usize..]);
    // A pull cut short is reported by drydock's side as well.
    let size = std::fs::metadata(&new).unwrap().len();
    let (_, out) = run_helper(&pull_request(new.to_str().unwrap(), 0, 5));
    let mut feed = PullFeed::new(size).unwrap();
    let mut sink = VecSink {
        data: Vec::new(),
        next: 0,
        size,
    };
    feed.feed(&out[..out.len() - 100], &mut sink).unwrap();
    assert!(feed.pending() > 0);
    assert!(feed.done.lock().unwrap().is_none());
}

#[test]
fn a_version_mismatch_is_refused_by_both_ends() {
    let t = tempfile::tempdir().unwrap();
    let (_, _, target) = four_changes(t.path());
    let before = std::fs::read(&target).unwrap();
    let mut input = Msg::Open {
        version: VERSION + 1,
        device: target.to_str().unwrap().into(),
        write: true,
    }
    .encode();
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    let data = [5u8; 4096];
    input.extend(
        Msg::Write {
            offset: 0,
            len: 4096,
            hash: sha256(&data),
            data: z.compress(&data).unwrap(),
        }
        .encode(),
    );
    let (r, out) = run_helper(&input);
    let e = r.unwrap_err();
    assert_eq!(
        e,
        format!(
            "protocol version mismatch: this helper speaks version {VERSION}, drydock sent \
             version {}; use the helper that comes with your drydock",
            VERSION + 1
        )
    );
    assert_eq!(std::fs::read(&target).unwrap(), before);
    assert!(written(&out).is_empty());
    // drydock's side, given a helper of another version.
    let e = check_hello(&Msg::Hello { version: 9 }).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "protocol version mismatch: the helper on the host speaks version 9, this drydock \
             speaks version {VERSION}; nothing was read or written"
        )
    );
}

/// The real static helper removes its own copy before it says Hello;
/// when it cannot, it says why in an Error frame instead of Hello.
#[test]
fn the_helper_removes_its_own_copy_before_hello() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    let run = |dir: &std::path::Path| {
        let exe = dir.join("drydock-helper");
        std::fs::write(&exe, BINARY).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)).unwrap();
        let o = Command::new(&exe)
            .args(["--remove", dir.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let mut dec = Decoder::default();
        dec.feed(&o.stdout);
        (o.status.code(), dec.next_msg().unwrap().unwrap())
    };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("helper");
    std::fs::create_dir(&dir).unwrap();
    let (_, first) = run(&dir);
    check_hello(&first).unwrap();
    assert!(!dir.exists(), "the helper's folder is still there");

    // A folder it cannot remove (something else in it): no Hello.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("other"), b"x").unwrap();
    let (code, first) = run(&dir);
    assert_eq!(code, Some(1));
    let e = check_hello(&first).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "the helper on the host stopped before it started: cannot remove its own copy: {}:",
            dir.display()
        )) && e.ends_with(
            "; nothing was read or written: run the same command again, or use --transfer dd"
        ),
        "{e}"
    );
}

#[test]
fn a_damaged_block_in_a_pull_is_named() {
    let t = tempfile::tempdir().unwrap();
    let d = disk(t.path(), "disk", 2 * BLOCK, &[(0, 2 * BLOCK, 1)]);
    let (_, mut out) = run_helper(&pull_request(d.to_str().unwrap(), 0, 2));
    // Re-encode the first Block frame with a wrong hash but a valid
    // checksum: only the hash can tell.
    let mut rd = &out[..];
    let mut msgs = Vec::new();
    while let Ok(Some(m)) = proto::read_msg(&mut rd) {
        msgs.push(m);
    }
    for m in &mut msgs {
        if let Msg::Block { hash, .. } = m {
            hash[0] ^= 1;
            break;
        }
    }
    out.clear();
    for m in &msgs {
        out.write_all(&m.encode()).unwrap();
    }
    let mut feed = PullFeed::new(2 * BLOCK).unwrap();
    let mut sink = VecSink {
        data: Vec::new(),
        next: 0,
        size: 2 * BLOCK,
    };
    let e = feed.feed(&out, &mut sink).unwrap_err();
    assert_eq!(
        e.to_string(),
        "block 0 (byte 0) arrived damaged: its hash is not the one the helper read on the host"
    );
    assert!(sink.data.is_empty());
}

#[test]
fn plan_refuses_a_block_that_is_neither_old_nor_new_unless_pages_prove_it() {
    let old = vec![1u8; 3 * PAGE as usize];
    let mut new = old.clone();
    new[5] = 2;
    new[2 * PAGE as usize] = 2;
    // Disk: the first page already new (a cut push), the rest old.
    let mut disk = old.clone();
    disk[5] = 2;
    let oh = sha256(&old);
    let e = plan_block(
        3,
        &sha256(&disk),
        &page_hashes(&disk),
        Some(&oh),
        &new,
        None,
    )
    .unwrap_err();
    assert_eq!(
        e,
        format!(
            "block 3 (byte {}) holds neither what was pulled nor the new image",
            3 * BLOCK
        )
    );
    let p = plan_block(
        3,
        &sha256(&disk),
        &page_hashes(&disk),
        Some(&oh),
        &new,
        Some(&old),
    )
    .unwrap();
    assert_eq!(
        p,
        vec![Patch {
            offset: 3 * BLOCK + 2 * PAGE,
            len: PAGE as u32
        }]
    );
    // A page that is neither: refused even with the base at hand.
    let mut foreign = disk.clone();
    foreign[PAGE as usize + 1] = 9;
    let e = plan_block(
        3,
        &sha256(&foreign),
        &page_hashes(&foreign),
        Some(&oh),
        &new,
        Some(&old),
    )
    .unwrap_err();
    assert!(e.contains(&format!("byte {}", 3 * BLOCK + PAGE)), "{e}");
}
