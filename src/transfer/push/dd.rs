//! A push in dd mode: standard tools on the host. The disk's segments and
//! blocks are hashed there with dd and sha256sum to prove what it holds;
//! the blocks that differ are written by a script run from a tmpfs, synced,
//! read back and hashed.

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::{Preflight, PushOptions, PushReport, Range, range_bytes, ranges, save_manifest};
use crate::errors::refused;
use crate::image::manifest::{BLOCK_SIZE, Manifest, SEGMENT_BLOCKS, block_count, block_len};
use crate::remote::Facts;
use crate::remote::device::Device;
use crate::ssh::{Session, shell_quote};
use crate::transfer::helper::Mode;
use crate::transfer::writer::Staged;
use crate::ui::{Ui, human_bytes};

/// Write the blocks that differ with dd, from a tmpfs on the host; each
/// range read back and hashed.
/// Over 80 lines: the blocks to write chosen (proven, planned or all), the
/// report filled in (a 20-line literal), nothing to write or the question,
/// then the writer staged, run and removed, in the order the host sees it.
pub(super) async fn push(
    session: &Session,
    facts: &Facts,
    opts: &PushOptions,
    pf: Preflight,
    ui: &Ui,
) -> Result<PushReport> {
    let (dev, new) = (&pf.dev, &pf.new);
    let image_len = new.size;
    let blocks: Vec<u64> = match &pf.base {
        Some(base) if pf.proven => {
            let to_write: Vec<u64> = (0..new.blocks.len() as u64)
                .filter(|&b| base.blocks[b as usize] != new.blocks[b as usize])
                .collect();
            let all = 0..new.segments.len() as u64;
            prove_skipped(session, dev, opts, base, new, &to_write, all).await?;
            to_write
        }
        Some(base) => {
            let partly = super::partly_written(opts, &new.digest, &dev.path);
            plan(session, dev, opts, base, new, &partly).await?
        }
        None => (0..block_count(image_len)).collect(),
    };
    let rs = ranges(&blocks);
    let bytes: u64 = rs.iter().map(|r| range_bytes(image_len, *r)).sum();
    let mut report = PushReport {
        host: session.host(),
        device: dev.path.clone(),
        image: opts.image.clone(),
        size: image_len,
        blocks_total: block_count(image_len),
        blocks_written: blocks.len() as u64,
        ranges: rs.len(),
        bytes_sent: bytes,
        seconds: 0.0,
        digest: new.digest.clone(),
        writer_dir: None,
        writer_own_tmpfs: false,
        transfer: Mode::Dd,
        bytes_on_wire: bytes,
        bytes_written: bytes,
        helper_peak_rss_kib: None,
        zstd_levels: Vec::new(),
        rebuilt: None,
    };
    if rs.is_empty() {
        ui.say(format!(
            "{} on {} already holds this image; nothing to write",
            dev.path,
            session.host()
        ));
        report.seconds = pf.started.elapsed().as_secs_f64();
        save_manifest(session, facts, opts, pf)?;
        return Ok(report);
    }
    let asked = std::time::Instant::now();
    ui.confirm(&format!(
        "Write {} ({} of {} blocks, {} ranges) of {} to {} on {}?",
        human_bytes(bytes),
        blocks.len(),
        block_count(image_len),
        rs.len(),
        opts.image.display(),
        dev.path,
        session.host()
    ))
    .await?;
    // The push's time is the host's: not the seconds spent at the question.
    let waited = asked.elapsed();

    super::record_intent(opts, &new.digest, &dev.path, &blocks)?;
    let staged = Staged::stage(session).await?;
    report.writer_dir = Some(staged.tmpfs.dir.clone());
    report.writer_own_tmpfs = staged.tmpfs.mounted;
    let result = write_ranges(session, &staged, dev, &opts.image, image_len, &rs, ui).await;
    let removed = staged.remove(session).await;
    result?;
    removed?;
    report.seconds = pf.started.elapsed().saturating_sub(waited).as_secs_f64();
    save_manifest(session, facts, opts, pf)?;
    Ok(report)
}
/// Shell lines that hash [first, first+count) blocks of $DEV, limited to the
/// image's `size`, printing `TAG first count hash`.
fn hash_range_cmd(tag: &str, r: Range, size: u64, dd: &str, head: &str, hasher: &str) -> String {
    format!(
        "{dd} if=\"$DEV\" bs={BLOCK_SIZE} skip={} count={} $Q $IF | {head} -c {} | {hasher} | {{ read h _; echo \"{tag} {} {} $h\"; }}\n",
        r.first,
        r.count,
        range_bytes(size, r),
        r.first,
        r.count
    )
}

/// Hash the given ranges of the disk on the host; answers keyed by first block.
async fn remote_hashes(
    session: &Session,
    dev: &str,
    size: u64,
    ranges: &[Range],
) -> Result<Vec<(u64, String)>> {
    let mut script = format!(
        "export LC_ALL=C; DEV={}\n{}IF=\n",
        shell_quote(dev),
        crate::transfer::HASHER_PICK
    );
    for r in ranges {
        script.push_str(&hash_range_cmd("S", *r, size, "dd", "head", "$H"));
    }
    // The script can be long (one line a range): send it on stdin.
    let out = session.exec_input("sh -s", Some(script.as_bytes())).await?;
    if !out.success() {
        return Err(out.failure("hashing the disk", &session.host()));
    }
    let mut res = Vec::new();
    for l in out.stdout_str().lines() {
        let w: Vec<&str> = l.split(' ').collect();
        if let ["S", first, _, h] = w[..] {
            res.push((first.parse()?, h.to_string()));
        }
    }
    if res.len() != ranges.len() {
        bail!(
            "hashing the disk on {} gave {} answers for {} ranges",
            session.host(),
            res.len(),
            ranges.len()
        );
    }
    Ok(res)
}

fn segment_range(size: u64, s: u64) -> Range {
    let first = s * SEGMENT_BLOCKS;
    Range {
        first,
        count: SEGMENT_BLOCKS.min(block_count(size) - first),
    }
}

/// Which blocks must be written: prove every block of the disk holds either
/// what was pulled (`base`) or already what is to be pushed (`new`, left by
/// an interrupted push); refuse otherwise.
async fn plan(
    session: &Session,
    dev: &Device,
    opts: &PushOptions,
    base: &Manifest,
    new: &Manifest,
    partly: &std::collections::BTreeSet<u64>,
) -> Result<Vec<u64>> {
    let size = new.size;
    if base.size != size {
        return Err(refused!(
            "the image is {} bytes and its manifest says {}: the manifest is not this image's; \
             push with --full to write every block without the check",
            size,
            base.size
        ));
    }
    let segs: Vec<Range> = (0..new.segments.len() as u64)
        .map(|s| segment_range(size, s))
        .collect();
    let seg_hashes = remote_hashes(session, &dev.path, size, &segs).await?;
    let mut to_write = Vec::new();
    let mut drill = Vec::new();
    let mut pulled = Vec::new();
    for (s, (_, h)) in seg_hashes.iter().enumerate() {
        let r = segs[s];
        if *h == base.segments[s] {
            pulled.push(s as u64);
            to_write.extend(
                (r.first..r.first + r.count)
                    .filter(|&b| base.blocks[b as usize] != new.blocks[b as usize]),
            );
        } else if *h == new.segments[s] {
            // Already written by an earlier push.
        } else {
            drill.extend((r.first..r.first + r.count).map(|b| Range { first: b, count: 1 }));
        }
    }
    if !drill.is_empty() {
        let per_block = remote_hashes(session, &dev.path, size, &drill).await?;
        let mut foreign = Vec::new();
        for (b, h) in per_block {
            let i = b as usize;
            if h == new.blocks[i] {
                continue;
            }
            if h == base.blocks[i] || partly.contains(&b) {
                to_write.push(b);
            } else {
                foreign.push(b);
            }
        }
        if let Some(first) = foreign.first() {
            return Err(refused!(
                "{} on {} no longer holds what was pulled: {} block(s) of 1 MiB differ from both the \
                 manifest and the image (the first at byte {}). Writing would mix two versions of \
                 the disk; pull it again, or push with --full to overwrite it whole",
                dev.path,
                session.host(),
                foreign.len(),
                first * BLOCK_SIZE
            ));
        }
    }
    to_write.sort_unstable();
    prove_skipped(session, dev, opts, base, new, &to_write, pulled.into_iter()).await?;
    Ok(to_write)
}

/// The blocks a push leaves unwritten because the manifest says the image
/// did not change them are proven, not trusted: in each segment that
/// changed and that the disk holds as pulled (PULLED), the blocks not in
/// TO_WRITE are hashed on the host and must hold the image's data. A
/// manifest whose block hashes are wrong (damaged, edited, another
/// image's) is refused here, before anything is written.
async fn prove_skipped(
    session: &Session,
    dev: &Device,
    opts: &PushOptions,
    base: &Manifest,
    new: &Manifest,
    to_write: &[u64],
    pulled: impl Iterator<Item = u64>,
) -> Result<()> {
    let size = new.size;
    let writing: std::collections::BTreeSet<u64> = to_write.iter().copied().collect();
    let skipped: Vec<u64> = pulled
        .filter(|&s| base.segments[s as usize] != new.segments[s as usize])
        .flat_map(|s| {
            let r = segment_range(size, s);
            r.first..r.first + r.count
        })
        .filter(|b| !writing.contains(b))
        .collect();
    if skipped.is_empty() {
        return Ok(());
    }
    let rs = ranges(&skipped);
    let on_host = remote_hashes(session, &dev.path, size, &rs).await?;
    let f =
        File::open(&opts.image).with_context(|| format!("cannot open {}", opts.image.display()))?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for (r, (_, theirs)) in rs.iter().zip(&on_host) {
        let mut h = Sha256::new();
        for b in r.first..r.first + r.count {
            let len = block_len(size, b) as usize;
            f.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)?;
            h.update(&buf[..len]);
        }
        if hex::encode(h.finalize()) == *theirs {
            continue;
        }
        // Name the first block of the range that differs.
        let per_block: Vec<Range> = (r.first..r.first + r.count)
            .map(|b| Range { first: b, count: 1 })
            .collect();
        let theirs = remote_hashes(session, &dev.path, size, &per_block).await?;
        let bad = theirs
            .iter()
            .find(|(b, h)| *h != new.blocks[*b as usize])
            .map_or(r.first, |(b, _)| *b);
        return Err(refused!(
            "{} is damaged: it says block {bad} (byte {}) is the same in the image as on the \
             disk, but {} on {} holds other data there. Nothing was written; pull the disk \
             again, or push with --full to write every block without the check",
            Manifest::path_for(&opts.image).display(),
            bad * BLOCK_SIZE,
            dev.path,
            session.host()
        ));
    }
    Ok(())
}

/// The writer script: each range read from stdin by its own dd, a sync,
/// then every range read back and hashed; all from the tmpfs.
fn writer_script(st: &Staged, dev: &Device, size: u64, rs: &[Range]) -> String {
    let dd = st.tool("dd");
    let (oflag, iflag) = if dev.is_block() {
        ("oflag=direct", "IF=iflag=direct")
    } else {
        ("", "IF=")
    };
    let mut s = format!(
        "export LC_ALL=C; DEV={}\nQ=; {dd} if=/dev/null of=/dev/null status=none 2>/dev/null && Q=status=none\n{iflag}\n",
        shell_quote(&dev.path)
    );
    for r in rs {
        let bytes = range_bytes(size, *r);
        let full = bytes / BLOCK_SIZE;
        let rest = bytes % BLOCK_SIZE;
        if full > 0 {
            s.push_str(&format!(
                "{dd} of=\"$DEV\" bs={BLOCK_SIZE} seek={} count={full} iflag=fullblock {oflag} conv=notrunc $Q || exit 1\n",
                r.first
            ));
        }
        if rest > 0 {
            // The image's last, short block: 512-byte units when they fit
            // (always, for a real disk), else single bytes.
            let off = (r.first + full) * BLOCK_SIZE;
            let unit = if rest.is_multiple_of(512) { 512 } else { 1 };
            s.push_str(&format!(
                "{dd} of=\"$DEV\" bs={unit} seek={} count={} iflag=fullblock conv=notrunc $Q || exit 1\n",
                off / unit,
                rest / unit
            ));
        }
    }
    s.push_str(&format!("{} || exit 1\necho synced\n", st.tool("sync")));
    for r in rs {
        s.push_str(&hash_range_cmd(
            "V",
            *r,
            size,
            &dd,
            &st.tool("head"),
            &st.tool("sha256sum"),
        ));
    }
    s
}

/// Upload the writer script, stream the ranges RS of IMAGE into it, and
/// check the hash it read back of each range against the one sent.
/// Over 80 lines: the stream and its check in one place (the hashes are
/// computed while sending and compared with the writer's `V` lines once it
/// exits); most of the length is the messages telling the user the disk is
/// partly written and to push again.
async fn write_ranges(
    session: &Session,
    st: &Staged,
    dev: &Device,
    image: &std::path::Path,
    size: u64,
    rs: &[Range],
    ui: &Ui,
) -> Result<()> {
    let script = writer_script(st, dev, size, rs);
    let path = format!("{}/write.sh", st.tmpfs.dir);
    session.upload(&path, script.as_bytes(), false).await?;
    let total: u64 = rs.iter().map(|r| range_bytes(size, *r)).sum();
    let bar = ui.bytes_bar(total, "push");
    let f = File::open(image).with_context(|| format!("cannot open {}", image.display()))?;

    let mut channel = session.open_exec(&st.exec_script(&path)).await?;
    let mut expected = Vec::with_capacity(rs.len());
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for r in rs {
        let mut h = Sha256::new();
        for b in r.first..r.first + r.count {
            let len = block_len(size, b) as usize;
            f.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)?;
            h.update(&buf[..len]);
            let broke = || {
                format!(
                    "the connection to {} broke during the push: {} is now partly written; \
                     run the same push again to finish it (blocks already written are recognised)",
                    session.host(),
                    dev.path
                )
            };
            session
                .send(&channel, &buf[..len])
                .await
                .map_err(|e| crate::errors::resumable!("{}: {e:#}", broke()))?;
            bar.inc(len as u64);
        }
        expected.push((r.first, hex::encode(h.finalize())));
    }
    channel.eof().await.ok();
    bar.finish();

    // The writer's answer: a line per range read back, its exit status.
    let out = crate::ssh::collect(&mut channel).await?;
    let stdout = out.stdout_str();
    if out.status != Some(0) {
        bail!(
            "the writer on {} failed ({}) after writing part of {}: the disk is now partly \
             written. Run the same push again to finish it (blocks already written are \
             recognised); the writer said:\n  {}",
            session.host(),
            out.describe_end(),
            dev.path,
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "\n  ")
        );
    }
    let got: Vec<(u64, String)> = stdout
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            match w[..] {
                ["V", first, _, h] => Some((first.parse().ok()?, h.to_string())),
                _ => None,
            }
        })
        .collect();
    if got != expected {
        let bad = expected
            .iter()
            .find(|e| !got.contains(e))
            .map(|e| e.0 * BLOCK_SIZE)
            .unwrap_or(0);
        bail!(
            "reading back what was written to {} on {} does not match the image (first bad range \
             at byte {bad}); the disk is not what the image says: push again",
            dev.path,
            session.host()
        );
    }
    Ok(())
}
