//! A push in helper mode: the helper hashes the blocks that may need
//! writing (and their 4 KiB pages), drydock decides page by page and
//! refuses before writing anything if the disk holds something unexpected,
//! then sends only the differing pages; each range is written with
//! O_DIRECT, read back and confirmed by the helper.

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail};

use super::mirror::{Rebuild, plan_rebuild, start_plan};
use super::writes::Writer;
use super::{Preflight, PushOptions, PushReport, ranges, rebuild, save_manifest};
use crate::errors::refused;
use crate::image::manifest::{self, BLOCK_SIZE, block_count, block_len};
use crate::remote::Facts;
use crate::remote::device::Device;
use crate::ssh::Session;
use crate::transfer::helper::{self, Link, Mode, Patch, Remote};
use crate::ui::{Ui, human_bytes};
use drydock_helper::proto::PAGE;

/// Push in helper mode with a helper installed on the host (removed
/// afterwards, whatever happens).
pub(super) async fn push(
    session: &Session,
    facts: &Facts,
    opts: &PushOptions,
    pf: Preflight,
    remote: Remote,
    ui: &Ui,
) -> Result<PushReport> {
    let res = push_with(session, &pf, opts, &remote, ui).await;
    let removed = remote.finish(session).await;
    let counts = res?;
    removed?;
    let size = pf.new.size;
    let blocks_written = pf
        .base
        .as_ref()
        .map(|b| {
            b.blocks
                .iter()
                .zip(&pf.new.blocks)
                .filter(|(a, b)| a != b)
                .count() as u64
        })
        // --full: the blocks the pages that differed were in.
        .unwrap_or(counts.blocks);
    let report = PushReport {
        host: session.host(),
        device: pf.dev.path.clone(),
        image: opts.image.clone(),
        size,
        blocks_total: block_count(size),
        blocks_written,
        ranges: counts.ranges,
        bytes_sent: counts.page_bytes,
        seconds: pf
            .started
            .elapsed()
            .saturating_sub(counts.waited)
            .as_secs_f64(),
        digest: pf.new.digest.clone(),
        writer_dir: Some(remote.tmpfs.dir.clone()),
        writer_own_tmpfs: remote.tmpfs.mounted,
        transfer: Mode::Helper,
        bytes_on_wire: counts.bytes_on_wire,
        bytes_written: counts.bytes_written,
        helper_peak_rss_kib: Some(counts.done.peak_rss_kib),
        zstd_levels: counts.zstd_levels,
        rebuilt: (counts.rebuilt.package_files > 0).then_some(counts.rebuilt),
    };
    save_manifest(session, facts, opts, pf)?;
    Ok(report)
}

/// What a helper-mode push moved.
struct Counts {
    /// Bytes sent on the channel: frames and compressed pages.
    bytes_on_wire: u64,
    /// Bytes the helper wrote to the disk.
    bytes_written: u64,
    /// Bytes of the pages that differed (uncompressed).
    page_bytes: u64,
    /// Runs of pages written, and the blocks they are in.
    ranges: usize,
    blocks: u64,
    done: helper::Done,
    /// The zstd levels the pages were sent at, in order.
    zstd_levels: Vec<i32>,
    /// Spent at the confirmation question.
    waited: std::time::Duration,
    /// What the host rebuilt from package files.
    rebuilt: Rebuilt,
}

/// Pages the host rebuilt from package files instead of receiving them.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Rebuilt {
    /// Package files the run kept that could rebuild pages, and those
    /// asked of the host.
    pub package_files: usize,
    pub asked: usize,
    pub pages: u64,
    /// Bytes the host fetched from its mirror.
    pub fetched_bytes: u64,
    /// Why some were not rebuilt (each was sent instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

async fn push_with(
    session: &Session,
    pf: &Preflight,
    opts: &PushOptions,
    remote: &Remote,
    ui: &Ui,
) -> Result<Counts> {
    let mut link = Link::start(session, remote).await?;
    let mut fetched_https = false;
    let res = push_on(&mut link, session, pf, opts, ui, &mut fetched_https).await;
    // Refused, failed or done: the helper has exited when drydock returns.
    link.close().await;
    if fetched_https {
        super::https::clean(session).await;
    }
    res
}

/// The push over the helper's LINK: open the disk, plan the patches and the
/// rebuild from package files, ask, record the intent, send; the counts.
/// Over 80 lines: the steps in the order the host must see them, with the
/// rebuild's planning started early from the manifests so that it runs
/// while the host hashes its disk (else after the plan); split, that
/// early-or-late choice would sit apart from the hashing it overlaps.
async fn push_on(
    link: &mut Link,
    session: &Session,
    pf: &Preflight,
    opts: &PushOptions,
    ui: &Ui,
    fetched_https: &mut bool,
) -> Result<Counts> {
    let dev = &pf.dev;
    open_device(link, dev).await?;
    let image =
        File::open(&opts.image).with_context(|| format!("cannot open {}", opts.image.display()))?;
    // The rebuild's planning reads the package files while the host hashes
    // its disk: the blocks that changed are known from the manifests.
    let early = match &pf.base {
        Some(b) => {
            let size = pf.new.size;
            let changed: Vec<Patch> = (0..block_count(size))
                .filter(|&i| b.blocks[i as usize] != pf.new.blocks[i as usize])
                .map(|i| Patch {
                    offset: i * BLOCK_SIZE,
                    len: block_len(size, i) as u32,
                })
                .collect();
            start_plan(opts, &image, changed, ui)?
        }
        None => None,
    };
    let candidates = candidates(link, pf, opts, session, ui).await?;
    let patches = plan(link, pf, opts, &image, &candidates, session, ui).await?;
    let started = match early {
        Some(s) => Some(s),
        None if pf.base.is_none() && !patches.is_empty() => {
            start_plan(opts, &image, patches.clone(), ui)?
        }
        None => None,
    };
    let mut rebuild = plan_rebuild(started, &patches, session, ui).await?;

    let total: u64 = patches.iter().map(|p| p.len as u64).sum();
    let asked = std::time::Instant::now();
    if patches.is_empty() {
        ui.say(format!(
            "{} on {} already holds this image; nothing to write",
            dev.path,
            session.host()
        ));
    } else {
        let from_packages = match rebuild.pages() {
            0 => String::new(),
            n => format!(
                "; {} of it rebuilt on the host from {} package files its mirror serves",
                human_bytes(n * PAGE),
                rebuild.files()
            ),
        };
        ui.confirm(&format!(
            "Write {} ({} ranges of 4 KiB pages{from_packages}) of {} to {} on {}?",
            human_bytes(total),
            patches.len(),
            opts.image.display(),
            dev.path,
            session.host()
        ))
        .await?;
    }
    // The push's time is the host's: not the seconds spent at the question.
    let waited = asked.elapsed();
    *fetched_https = !rebuild.https.is_empty();
    super::mirror::fetch_https(&mut rebuild, session, ui).await;
    let mut blocks: Vec<u64> = patches.iter().map(|p| p.offset / BLOCK_SIZE).collect();
    blocks.dedup();
    super::record_intent(opts, &pf.new.digest, &dev.path, &blocks)?;
    let (done, zstd_levels, rebuilt) =
        send(link, &image, &patches, total, dev, &rebuild, ui).await?;
    Ok(Counts {
        rebuilt,
        bytes_on_wire: link.sent,
        bytes_written: done.bytes_written,
        page_bytes: total,
        ranges: patches.len(),
        blocks: blocks.len() as u64,
        done,
        zstd_levels,
        waited,
    })
}

/// The helper opens DEV for writing and sees the size drydock saw.
async fn open_device(link: &mut Link, dev: &Device) -> Result<()> {
    link.send(
        drydock_helper::proto::Msg::Open {
            version: drydock_helper::proto::VERSION,
            device: dev.path.clone(),
            write: true,
        }
        .encode(),
    )
    .await?;
    match link.recv().await? {
        drydock_helper::proto::Msg::Opened { size: s, .. } if s == dev.size => Ok(()),
        drydock_helper::proto::Msg::Opened { size: s, .. } => bail!(
            "the helper sees {} as {s} bytes where drydock saw {}",
            dev.path,
            dev.size
        ),
        m => bail!("the helper answered Open with {}", m.name()),
    }
}

/// The blocks to look at page by page, in order: those the manifests say
/// changed (the disk proven untouched since the pull), else those whose
/// hash on the host differs from the new image's (refused if one differs
/// from both), else every block.
async fn candidates(
    link: &mut Link,
    pf: &Preflight,
    opts: &PushOptions,
    session: &Session,
    ui: &Ui,
) -> Result<Vec<u64>> {
    let (base, new) = (pf.base.as_ref(), &pf.new);
    let size = new.size;
    let nblocks = block_count(size);
    let mut out: Vec<u64> = match base {
        // Every block of a segment that changed, not only those the
        // block hashes name: a block the manifest calls unchanged is then
        // proven so by the host's hash, not trusted (a damaged manifest
        // would leave it unwritten).
        Some(b) if pf.proven => (0..nblocks)
            .filter(|&i| {
                let s = (i / manifest::SEGMENT_BLOCKS) as usize;
                b.segments[s] != new.segments[s] || b.blocks[i as usize] != new.blocks[i as usize]
            })
            .collect(),
        Some(b) => {
            // No proof that the disk is untouched: hash all of it on the
            // host (blocks of zeros cost no hashing there).
            let partly = super::partly_written(opts, &new.digest, &pf.dev.path);
            let bar = ui.bytes_bar(size, "check");
            let mut out = Vec::new();
            let answers = link
                .hash_blocks(&[(0, nblocks)], false, |i, h, _| {
                    bar.inc(block_len(size, i));
                    let (old, neu) = (&b.blocks[i as usize], &new.blocks[i as usize]);
                    if helper::same(h, neu) {
                        // Already written (an earlier push), or unchanged.
                    } else if helper::same(h, old)
                        || opts.base_image.is_some()
                        || partly.contains(&i)
                    {
                        out.push(i);
                    } else {
                        return Err(format!(
                            "block {i} (byte {}) differs from both the manifest and the image",
                            i * BLOCK_SIZE
                        ));
                    }
                    Ok(())
                })
                .await;
            bar.finish();
            refuse_changed(answers, &pf.dev, session)?;
            out
        }
        None => (0..nblocks).collect(),
    };
    out.sort_unstable();
    Ok(out)
}

/// The pages of CANDIDATES to write: the host's page hashes of each block
/// compared with IMAGE's (and the base image's, when the push is of a
/// worker VM's overlay).
async fn plan(
    link: &mut Link,
    pf: &Preflight,
    opts: &PushOptions,
    image: &File,
    candidates: &[u64],
    session: &Session,
    ui: &Ui,
) -> Result<Vec<Patch>> {
    let size = pf.new.size;
    let base_img = match &opts.base_image {
        Some(p) => Some(File::open(p).with_context(|| format!("cannot open {}", p.display()))?),
        None => None,
    };
    let partly = super::partly_written(opts, &pf.new.digest, &pf.dev.path);
    let runs: Vec<(u64, u64)> = ranges(candidates)
        .iter()
        .map(|r| (r.first, r.first + r.count))
        .collect();
    let mut patches: Vec<Patch> = Vec::new();
    let bar = ui.bytes_bar(candidates.len() as u64 * BLOCK_SIZE, "compare");
    let mut nb = vec![0u8; BLOCK_SIZE as usize];
    let mut bb = vec![0u8; BLOCK_SIZE as usize];
    let answers = link
        .hash_blocks(&runs, true, |i, h, pages| {
            bar.inc(BLOCK_SIZE);
            let len = block_len(size, i) as usize;
            image
                .read_exact_at(&mut nb[..len], i * BLOCK_SIZE)
                .map_err(|e| format!("cannot read the image: {e}"))?;
            let base_block = match &base_img {
                Some(f) => {
                    f.read_exact_at(&mut bb[..len], i * BLOCK_SIZE)
                        .map_err(|e| format!("cannot read the base image: {e}"))?;
                    Some(&bb[..len])
                }
                None => None,
            };
            // A block an interrupted push of this image was writing may hold
            // pages of both versions: it is this push's own to finish, every
            // page that differs from the image written again (as in dd mode).
            let old = match pf.base.as_ref() {
                Some(_) if partly.contains(&i) => None,
                Some(b) => {
                    Some(manifest::from_hex(&b.blocks[i as usize]).map_err(|e| e.to_string())?)
                }
                None => None,
            };
            let p = helper::plan_block(i, h, pages, old.as_ref(), &nb[..len], base_block)?;
            patches.extend(p);
            Ok(())
        })
        .await;
    bar.finish();
    refuse_changed(answers, &pf.dev, session)?;
    Ok(patches)
}

/// PATCHES sent (TOTAL bytes), at most `writes::WRITE_WINDOW` bytes unconfirmed,
/// each written, read back and checked by the helper; then its Finish.
/// With a REBUILD, the host rebuilds its pages from package files while
/// the other pages go; then the pages it did not rebuild are sent.
/// Over 80 lines: the one exchange with the helper from the first Write to
/// Finish; with a rebuild it sends the Rebuild frames, writes the other
/// pages while the host fetches, reads one Rebuilt answer per job into
/// `rebuilt`, then sends what was not rebuilt as page runs; split, the
/// frames' order on the link would be spread over functions sharing the
/// writer, the bar and the link.
async fn send(
    link: &mut Link,
    image: &File,
    patches: &[Patch],
    total: u64,
    dev: &Device,
    rebuild: &Rebuild,
    ui: &Ui,
) -> Result<(helper::Done, Vec<i32>, Rebuilt)> {
    use drydock_helper::package::{PIECES_PER_FRAME, encode_pieces};
    use drydock_helper::proto::Msg;
    let bar = ui.bytes_bar(total, "push");
    let levels = helper::level::LevelControl::new(helper::PUSH_LEVEL);
    let mut w = Writer {
        z: zstd::bulk::Compressor::new(levels.level())?,
        levels,
        image,
        dev,
    };
    let mut rebuilt = Rebuilt {
        package_files: rebuild.files,
        asked: rebuild.jobs.len(),
        notes: rebuild.notes.clone(),
        ..Default::default()
    };
    if rebuild.jobs.is_empty() {
        w.write(link, patches, &bar).await?;
    } else {
        for (src, pieces) in &rebuild.jobs {
            let chunks: Vec<_> = pieces.chunks(PIECES_PER_FRAME).collect();
            for (i, c) in chunks.iter().enumerate() {
                link.send(
                    Msg::Rebuild {
                        addr: src.addr.clone(),
                        host: src.host.clone(),
                        path: src.path.clone(),
                        format: src.format as u8,
                        pieces: encode_pieces(c),
                        more: i + 1 < chunks.len(),
                    }
                    .encode(),
                )
                .await
                .map_err(|e| w.partly(e))?;
            }
        }
        let mut asked: Vec<u64> = rebuild
            .jobs
            .iter()
            .flat_map(|(_, p)| p.iter().map(|p| p.disk_offset))
            .collect();
        asked.sort_unstable();
        // The other pages go while the host fetches.
        w.write(link, &rebuild::without(patches, &asked), &bar)
            .await?;
        link.send(Msg::RebuildWait.encode())
            .await
            .map_err(|e| w.partly(e))?;
        let mut done: Vec<u64> = Vec::new();
        for (src, pieces) in &rebuild.jobs {
            match link.recv().await.map_err(|e| w.partly(e))? {
                Msg::Rebuilt {
                    written,
                    fetched,
                    error,
                } => {
                    rebuilt.fetched_bytes += fetched;
                    let before = done.len();
                    for (i, p) in pieces.iter().enumerate() {
                        if written.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
                            done.push(p.disk_offset);
                        }
                    }
                    let got = (done.len() - before) as u64;
                    bar.inc(got * PAGE);
                    if !error.is_empty() {
                        rebuilt
                            .notes
                            .push(format!("http://{}{}: {error}", src.host, src.path));
                    } else if got < pieces.len() as u64 {
                        rebuilt.notes.push(format!(
                            "http://{}{}: {} of {} pages differ from the worker VM's copy",
                            src.host,
                            src.path,
                            pieces.len() as u64 - got,
                            pieces.len()
                        ));
                    }
                }
                m => bail!("the helper answered RebuildWait with {}", m.name()),
            }
        }
        rebuilt.pages = done.len() as u64;
        done.sort_unstable();
        done.dedup();
        // What was asked and not rebuilt: sent.
        let left: Vec<u64> = asked
            .iter()
            .copied()
            .filter(|o| done.binary_search(o).is_err())
            .collect();
        let mut rest: Vec<Patch> = Vec::new();
        for o in left {
            match rest.last_mut() {
                Some(r) if r.offset + r.len as u64 == o && (o % BLOCK_SIZE) != 0 => {
                    r.len += PAGE as u32
                }
                _ => rest.push(Patch {
                    offset: o,
                    len: PAGE as u32,
                }),
            }
        }
        w.write(link, &rest, &bar).await?;
    }
    bar.finish();
    link.send(Msg::Finish.encode()).await?;
    match link.recv().await.map_err(|e| w.partly(e))? {
        Msg::Done {
            peak_rss_kib,
            bytes_read,
            bytes_written,
        } => Ok((
            helper::Done {
                peak_rss_kib,
                bytes_read,
                bytes_written,
            },
            w.levels.used,
            rebuilt,
        )),
        m => bail!("the helper answered Finish with {}", m.name()),
    }
}

fn refuse_changed(
    answers: Result<Result<(), String>>,
    dev: &Device,
    session: &Session,
) -> Result<()> {
    match answers? {
        Ok(()) => Ok(()),
        Err(why) => Err(refused!(
            "{} on {} no longer holds what was pulled: {why}. Writing would mix two versions \
             of the disk; nothing was written. Pull it again, or push with --full to overwrite \
             it whole",
            dev.path,
            session.host()
        )),
    }
}
