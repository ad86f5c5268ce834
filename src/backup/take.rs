//! `drydock backup`: one new version in a store. The helper reads the
//! whole disk on the host and hashes it at disk speed; only the blocks
//! whose hash the store does not hold cross the link, each checked against
//! the hash it was read with, and are kept in the store under that hash.
//! A block the version before held crosses as its changed 4 KiB pages
//! only (`pages.rs`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use drydock_helper::proto::Msg;
use serde::Serialize;

use super::pages::{PagesDone, fetch_pages};
use super::store::{Consistency, Store, Version};
use crate::errors::refused;
use crate::image::manifest::{
    BLOCK_SIZE, Hash, Manifest, SEGMENT_BLOCKS, SegmentHasher, Source, block_count, block_len,
    from_hex, to_hex, zero_hash,
};
use crate::remote::Facts;
use crate::remote::device::{self, Device};
use crate::ssh::Session;
use crate::transfer::helper::{self, Mode};
use crate::transfer::pull::precopy::{BlockSink, fetch_blocks, open_and_hash};
use crate::ui::{Ui, human_bytes};

pub struct BackupOptions {
    pub store: PathBuf,
    /// The user's key file (`--key-file`).
    pub key: Option<PathBuf>,
    pub device: Option<String>,
    pub freeze: bool,
    pub transfer: Mode,
}

#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub id: String,
    pub store: PathBuf,
    /// Whether the store is encrypted (a store made before encryption is
    /// not, and stays so).
    pub encrypted: bool,
    pub host: String,
    pub device: String,
    pub size: u64,
    pub consistency: Consistency,
    /// Blocks of the disk that hold data (not zeros).
    pub data_blocks: u64,
    /// Blocks that crossed the link (the store did not hold them).
    pub sent_blocks: u64,
    /// With --freeze: of those, the blocks sent while the host was frozen
    /// (the others crossed in the live pass before it).
    pub sent_while_frozen: Option<u64>,
    /// Of those, the blocks of which only the 4 KiB pages that differ from
    /// the version before crossed it, and those pages.
    pub sent_as_pages: u64,
    pub pages_sent: u64,
    /// The helper's protocol, both ways (the helper's own copy to the
    /// host is not counted: about 1 MiB, once per backup).
    pub bytes_on_wire: u64,
    /// What this version added to the store, and what it shares with
    /// the versions before it (bytes in the store).
    pub added_bytes: u64,
    pub shared_bytes: u64,
    pub seconds: f64,
    /// With --freeze: from the freeze to the thaw.
    pub frozen_seconds: Option<f64>,
    pub digest: String,
    /// The host's running kernel, initrd and seal, kept with the version
    /// (`versions/ID.boot`): a boot of it holds its services back, and a
    /// restore can boot it sealed to adapt it to a new host. None when
    /// they could not be read (said as a note).
    pub boot_recorded: Option<PathBuf>,
}

impl BackupReport {
    pub fn human(&self) -> String {
        format!(
            "backed up {}:{} as version {}\n  in {}{}\n  {}\n  {} of data in {} blocks; {} \
             blocks sent{} ({} on the wire) in {:.1} s{}\n  the store grew by {}; {} shared with \
             older versions\n  digest {}\n{}",
            self.host,
            self.device,
            self.id,
            self.store.display(),
            if self.encrypted {
                " (encrypted)"
            } else {
                " (unencrypted: a store made before drydock encrypted them)"
            },
            self.consistency.describe(),
            human_bytes(self.data_blocks * BLOCK_SIZE),
            self.data_blocks,
            self.sent_blocks,
            if self.sent_as_pages > 0 {
                format!(
                    ", {} of them as the {} page(s) of 4 KiB that changed",
                    self.sent_as_pages, self.pages_sent
                )
            } else {
                String::new()
            },
            human_bytes(self.bytes_on_wire),
            self.seconds,
            match (self.frozen_seconds, self.sent_while_frozen) {
                (Some(s), Some(n)) => format!(", {s:.1} s frozen ({n} block(s) sent while frozen)"),
                (Some(s), None) => format!(", {s:.1} s frozen"),
                _ => String::new(),
            },
            human_bytes(self.added_bytes),
            human_bytes(self.shared_bytes),
            self.digest,
            match &self.boot_recorded {
                Some(d) => format!("  the kernel it runs is kept with it in {}\n", d.display()),
                None => String::new(),
            }
        )
    }
}

/// Over 80 lines: the backup's steps in the order they must happen (the
/// store, the boot files, the live pass, the freeze and its thaw on every
/// path, the version written last); each step is a function, what is left
/// is the order and the report.
pub async fn backup(
    session: &Session,
    facts: &Facts,
    opts: &BackupOptions,
    ui: &Ui,
) -> Result<BackupReport> {
    device::require_root(facts, session)?;
    if helper::choose(opts.transfer, facts)? != Mode::Helper {
        return Err(refused!(
            "a backup needs drydock's helper on {} (it hashes the disk there so that only new \
             blocks are sent), and it cannot run there ({}); backups in dd mode are not built \
             yet. `drydock pull` copies the whole disk",
            session.host(),
            helper::cannot_run(facts).unwrap_or_else(|| "--transfer dd".to_string())
        ));
    }
    let (store, made_key) = Store::create(&opts.store, opts.key.as_deref())?;
    if made_key && let Some(k) = &opts.key {
        ui.say(format!(
            "made the key file {} for the new store {}: keep a copy of it away from the store; \
             without it nothing in the store can be read",
            k.display(),
            opts.store.display()
        ));
    }
    let _lock = store.lock()?;
    store.clean_temporaries()?;
    let dev = device::inspect(session, facts, opts.device.as_deref()).await?;
    let started = Instant::now();
    let services = super::keptboot::record_boot_and_services(session, facts, &store, ui).await?;
    let live = if opts.freeze {
        live_pass(session, &store, &dev, ui).await?
    } else {
        None
    };
    let frozen_at = if opts.freeze {
        ui.say(format!("freezing {} for a consistent copy", session.host()));
        let r = crate::remote::freeze::freeze(session, facts, opts.device.as_deref()).await?;
        ui.say(r.human(&session.target.typed_arg()).trim_end().to_string());
        Some(Instant::now())
    } else {
        if !dev.rw_mounts().is_empty() {
            ui.say(format!(
                "{} is in use ({}): the copy is crash-consistent, as after a power cut \
                 (--freeze makes it consistent)",
                dev.path,
                Device::describe_mounts(&dev.rw_mounts())
            ));
        }
        None
    };
    // A signal stops the copy (the blocks kept so far are whole; no
    // version is listed) and, after a freeze, the thaw still runs.
    let res = tokio::select! {
        biased;
        sig = ui.interrupted() => Err(crate::errors::Interrupted(format!(
            "{}: the backup stopped before its version was listed; run the same command again: \
             the blocks it already kept are not sent again",
            Ui::interrupted_text(sig)
        ))
        .into()),
        r = take(session, &store, &dev, opts.freeze, ui) => r,
    };
    let frozen_seconds = frozen_at.map(|t| t.elapsed().as_secs_f64());
    if opts.freeze {
        let thawed = crate::remote::freeze::thaw(session, facts, opts.device.as_deref()).await;
        match thawed {
            Ok(r) if r.left.is_empty() => ui.say(r.human()),
            Ok(r) => {
                return Err(anyhow!(
                    "{}; the backup {}. Run `drydock thaw {}` again",
                    r.human(),
                    if res.is_ok() { "is done" } else { "failed" },
                    session.target.typed_arg()
                ));
            }
            Err(e) => {
                return Err(e.context(format!(
                    "the VPS is still frozen: run `drydock thaw {}`",
                    session.target.typed_arg()
                )));
            }
        }
    }
    let mut got = res?;
    if let Some(l) = live {
        got.sent_live = l.sent;
        got.bytes_on_wire += l.bytes_on_wire;
        got.added_bytes += l.added_bytes;
        got.added.extend(l.added);
        got.by_pages.rebuilt += l.by_pages.rebuilt;
        got.by_pages.pages += l.by_pages.pages;
    }
    let previous = store.versions()?.pop();
    let segments = segments_of(&store, &dev, &got.blocks, previous.as_ref())?;
    let blocks: Vec<String> = got.blocks.iter().map(to_hex).collect();
    let manifest = Manifest::new(
        dev.size,
        Some(Source::read_now(session.host(), &dev.path, &facts.boot_id)),
        segments,
        blocks,
    )?;
    let consistency = if opts.freeze {
        Consistency::Frozen
    } else {
        Consistency::CrashConsistent
    };
    let sizes = store.block_sizes()?;
    let version = Version {
        format: String::new(),
        id: store.new_id(),
        created: crate::util::now(),
        consistency,
        added_blocks: got.added.len() as u64,
        added_bytes: got.added_bytes,
        shape: Some(crate::vm::shape::Shape::of(facts, &dev)),
        services,
        manifest,
    };
    let shared_bytes = version
        .block_hashes()
        .iter()
        .filter(|h| !got.added.contains(*h))
        .map(|h| sizes.get(&store.block_name(h)).copied().unwrap_or(0))
        .sum();
    let data_blocks = got
        .blocks
        .iter()
        .enumerate()
        .filter(|(i, h)| **h != zero_hash(block_len(dev.size, *i as u64)))
        .count() as u64;
    let boot_recorded = store.keep_boot(&version.id)?;
    let version = store.commit(version)?;
    Ok(BackupReport {
        id: version.id,
        store: store.location().into(),
        encrypted: store.encrypted(),
        host: session.host(),
        device: dev.path,
        size: dev.size,
        consistency,
        data_blocks,
        sent_blocks: got.sent + got.sent_live,
        sent_while_frozen: opts.freeze.then_some(got.sent),
        sent_as_pages: got.by_pages.rebuilt,
        pages_sent: got.by_pages.pages,
        bytes_on_wire: got.bytes_on_wire,
        added_bytes: got.added_bytes,
        shared_bytes,
        seconds: started.elapsed().as_secs_f64(),
        frozen_seconds,
        digest: version.manifest.digest,
        boot_recorded,
    })
}

/// With --freeze, a live pass first: the blocks the store lacks cross
/// while the host serves, and the frozen pass only hashes the disk and
/// sends what changed since (as the upgrade's pre-copy). A live pass the
/// disk outran is no loss (None): the frozen pass catches up.
async fn live_pass(session: &Session, store: &Store, dev: &Device, ui: &Ui) -> Result<Option<Got>> {
    ui.say(format!(
        "a live pass first, while {} serves: the freeze then waits only for what changes \
         meanwhile",
        session.host()
    ));
    let r = tokio::select! {
        biased;
        sig = ui.interrupted() => Err(crate::errors::Interrupted(format!(
            "{}: the backup stopped in its live pass, before any freeze; run the same \
             command again: the blocks it already kept are not sent again",
            Ui::interrupted_text(sig)
        ))
        .into()),
        r = take(session, store, dev, false, ui) => r,
    };
    match r {
        Ok(g) => Ok(Some(g)),
        Err(e) if format!("{e:#}").contains(OUTRAN) => {
            ui.say(format!("note: the live pass did not finish ({e:#})"));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What a live disk that moved faster than it was read is said to have
/// done; the live pass before a freeze knows that failure by it (the
/// error reaches it as the resumable error's text).
const OUTRAN: &str = "changed under drydock faster than it could be read";

struct Got {
    /// The disk's block hashes, as read.
    blocks: Vec<Hash>,
    sent: u64,
    /// Blocks this backup put in the store, and their bytes there.
    added: BTreeSet<String>,
    added_bytes: u64,
    bytes_on_wire: u64,
    by_pages: PagesDone,
    /// With --freeze: the blocks its live pass sent before the freeze.
    sent_live: u64,
}

/// Blocks into the store.
struct StoreSink<'a> {
    store: &'a Store,
    added: BTreeSet<String>,
    added_bytes: u64,
}

impl BlockSink for StoreSink<'_> {
    fn block(&mut self, _i: u64, _data: &[u8], frame: &[u8], hash: &Hash) -> Result<()> {
        let h = to_hex(hash);
        let n = self.store.put(&h, frame)?;
        if n > 0 {
            self.added_bytes += n;
            self.added.insert(h);
        }
        Ok(())
    }

    fn zeros(&mut self, _i: u64, _len: u64) -> Result<()> {
        Ok(())
    }
}

async fn take(
    session: &Session,
    store: &Store,
    dev: &Device,
    frozen: bool,
    ui: &Ui,
) -> Result<Got> {
    let Some(remote) = helper::install(session, Mode::Helper, ui).await? else {
        return Err(refused!(
            "drydock's helper could not be started on {}, and a backup needs it; nothing was \
             changed",
            session.host()
        ));
    };
    let res = with_helper(session, &remote, store, dev, frozen, ui).await;
    let removed = remote.finish(session).await;
    let got = res.map_err(|e| {
        if e.downcast_ref::<crate::errors::Refused>().is_some() {
            return e;
        }
        crate::errors::resumable!(
            "{e:#}: the backup stopped before its version was listed (the store lists what \
             it did before); run the same command again: the blocks it already kept are not \
             sent again"
        )
    })?;
    removed?;
    Ok(got)
}

/// The disk hashed by the helper, then up to three rounds of the blocks
/// the store lacks (pages or whole), then the helper's end. Over 80 lines:
/// the rounds share the hashes, the sink and the counts.
async fn with_helper(
    session: &Session,
    remote: &helper::Remote,
    store: &Store,
    dev: &Device,
    frozen: bool,
    ui: &Ui,
) -> Result<Got> {
    let size = dev.size;
    let n = block_count(size);
    // The blocks of the version before, where a changed block's pages are
    // compared: the newest of the same disk (same size; the same host and
    // device when it says).
    let before: Vec<String> = store
        .versions()?
        .into_iter()
        .rev()
        .find(|v| {
            v.manifest.size == size
                && v.manifest
                    .source
                    .as_ref()
                    .is_none_or(|s| s.host == session.host() && s.device == dev.path)
        })
        .map(|v| v.manifest.blocks)
        .unwrap_or_default();
    let (mut link, mut host) = open_and_hash(session, remote, dev, ui).await?;
    let mut sink = StoreSink {
        store,
        added: BTreeSet::new(),
        added_bytes: 0,
    };
    let mut sent = 0;
    let mut by_pages = PagesDone::default();
    // A live disk moves: a block read with another hash than it was
    // hashed with is kept under the hash it was read with. A block whose
    // twin was sent in its place may then still be missing: a second
    // round sends it (a third finding more means the disk is being
    // rewritten faster than it is read).
    for round in 0..3 {
        // The blocks to send: data the store does not hold (a block that
        // appears twice on the disk is sent once).
        let mut seen = BTreeSet::new();
        let mut fetch = Vec::new();
        for (i, h) in host.iter().enumerate() {
            let len = block_len(size, i as u64);
            if *h == zero_hash(len) {
                continue;
            }
            let hex = to_hex(h);
            if !store.has(&hex) && seen.insert(hex) {
                fetch.push(i as u64);
            }
        }
        if round > 0 && fetch.is_empty() {
            break;
        }
        if round == 2 {
            bail!(
                "{} {OUTRAN} ({} blocks still missing after two rounds); back it up with \
                 --freeze",
                dev.path,
                fetch.len()
            );
        }
        let fetch_bytes: u64 = fetch.iter().map(|&i| block_len(size, i)).sum();
        if round == 0 {
            ui.say(format!(
                "{} of {n} blocks of {}:{} are not in the store ({})",
                fetch.len(),
                session.host(),
                dev.path,
                human_bytes(fetch_bytes)
            ));
        }
        let bar = ui.bytes_bar(fetch_bytes, "backup");
        // A block the version before holds (not zeros, still in the
        // store) is sent as its changed pages; the others whole.
        let (pages, mut whole): (Vec<u64>, Vec<u64>) = fetch.iter().partition(|&&i| {
            before
                .get(i as usize)
                .is_some_and(|h| *h != to_hex(&zero_hash(block_len(size, i))) && store.has(h))
        });
        let want: Vec<(u64, String)> = pages
            .iter()
            .map(|&i| (i, before[i as usize].clone()))
            .collect();
        let done = fetch_pages(
            &mut link,
            (store, &mut sink),
            size,
            &want,
            (&mut host, !frozen),
            |len| bar.inc(len),
        )
        .await?;
        whole.extend(&done.again);
        whole.sort_unstable();
        fetch_blocks(
            &mut link,
            &mut sink,
            size,
            &whole,
            (&mut host, !frozen),
            |len| bar.inc(len),
        )
        .await?;
        bar.finish();
        sent += fetch.len() as u64;
        by_pages.rebuilt += done.rebuilt;
        by_pages.pages += done.pages;
    }
    link.send(Msg::Finish.encode()).await?;
    match link.recv().await? {
        Msg::Done { .. } => {}
        m => bail!("the helper answered Finish with {}", m.name()),
    }
    let bytes_on_wire = link.received + link.sent;
    link.close().await;
    Ok(Got {
        blocks: host,
        sent,
        added: sink.added,
        added_bytes: sink.added_bytes,
        bytes_on_wire,
        by_pages,
        sent_live: 0,
    })
}

/// The segment hashes of a version with these BLOCKS: a segment whose
/// blocks are those of the same segment of PREVIOUS keeps its hash; the
/// others are hashed from the store.
fn segments_of(
    store: &Store,
    dev: &Device,
    blocks: &[Hash],
    previous: Option<&Version>,
) -> Result<Vec<String>> {
    let size = dev.size;
    let n = block_count(size);
    let same_disk = previous.filter(|p| p.manifest.size == size);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut out = Vec::new();
    for s in 0..n.div_ceil(SEGMENT_BLOCKS) {
        let range = s * SEGMENT_BLOCKS..((s + 1) * SEGMENT_BLOCKS).min(n);
        if let Some(p) = same_disk
            && range
                .clone()
                .all(|i| from_hex(&p.manifest.blocks[i as usize]).ok() == Some(blocks[i as usize]))
        {
            out.push(p.manifest.segments[s as usize].clone());
            continue;
        }
        let mut h = SegmentHasher::default();
        for i in range {
            let len = block_len(size, i);
            if blocks[i as usize] == zero_hash(len) {
                h.add_zero_block(len);
            } else {
                let b = &mut buf[..len as usize];
                store.get(&to_hex(&blocks[i as usize]), b)?;
                h.add_block_hashed(b, blocks[i as usize]);
            }
        }
        out.push(h.finish().0);
    }
    Ok(out)
}
