//! `IMAGE.pull`, the state of a pull under way: a header line (what is
//! being pulled) and a line per verified segment, appended as each is made
//! durable. A rerun resumes after the last of them.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::errors::refused;
use crate::image::manifest::{Manifest, Source};
use crate::ui::Ui;

/// The first line of `IMAGE.pull`: what is being pulled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct PullHeader {
    pub(super) format: String,
    pub(super) host: String,
    pub(super) device: String,
    pub(super) size: u64,
    pub(super) boot_id: String,
    pub(super) started_at: String,
}

pub(super) const STATE_FORMAT: &str = "drydock-pull/1";

pub fn state_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".pull");
    PathBuf::from(p)
}

/// One verified segment, as a line of `IMAGE.pull`.
#[derive(Debug, Clone)]
pub(super) struct Verified {
    pub(super) first_block: u64,
    pub(super) segment: String,
    pub(super) blocks: Vec<String>,
}

impl Verified {
    pub(super) fn line(&self) -> String {
        format!(
            "S {} {} {}\n",
            self.first_block,
            self.segment,
            self.blocks.join(",")
        )
    }

    pub(super) fn parse(line: &str) -> Option<Verified> {
        let mut w = line.split(' ');
        (w.next()? == "S").then_some(())?;
        let first_block = w.next()?.parse().ok()?;
        let segment = w.next()?.to_string();
        let blocks = w.next()?.split(',').map(str::to_string).collect();
        Some(Verified {
            first_block,
            segment,
            blocks,
        })
    }
}

/// What an earlier, interrupted pull left.
pub(super) fn read_state(path: &Path) -> Result<Option<(PullHeader, Vec<Verified>)>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut lines = BufReader::new(f).lines();
    let header: PullHeader = match lines.next() {
        Some(l) => {
            serde_json::from_str(&l?).with_context(|| format!("{} is damaged", path.display()))?
        }
        None => return Ok(None),
    };
    let mut segs = Vec::new();
    let mut next = 0;
    for l in lines {
        let l = l?;
        // A torn last line (crash mid-append) is simply not counted.
        match Verified::parse(&l) {
            Some(v) if v.first_block == next => {
                next += v.blocks.len() as u64;
                segs.push(v);
            }
            _ => break,
        }
    }
    Ok(Some((header, segs)))
}

/// Where a pull of HEADER's disk into IMAGE starts: after the segments an
/// interrupted pull of the same disk verified, or at 0. Refused: another
/// disk's state file, or an image drydock would overwrite.
pub(super) fn resume_or_start(
    header: PullHeader,
    image: &Path,
    ui: &Ui,
) -> Result<(PullHeader, Vec<Verified>)> {
    let state_file = state_path(image);
    match read_state(&state_file)? {
        Some((h, segs)) => {
            if h.host != header.host || h.device != header.device || h.size != header.size {
                return Err(refused!(
                    "{} belongs to an interrupted pull of {}:{} ({} bytes), not {}:{}; \
                     finish that one, or delete {} and {} to start over",
                    state_file.display(),
                    h.host,
                    h.device,
                    h.size,
                    header.host,
                    header.device,
                    state_file.display(),
                    image.display()
                ));
            }
            if h.boot_id != header.boot_id {
                ui.say(format!(
                    "{} rebooted since the interrupted pull: what was pulled may be stale, starting over",
                    header.host
                ));
                Ok((header, Vec::new()))
            } else {
                Ok((h, segs))
            }
        }
        None => {
            if image.exists() {
                let what = if Manifest::path_for(image).exists() {
                    "a finished pull"
                } else {
                    "a file drydock did not write"
                };
                return Err(refused!(
                    "{} already exists ({what}); drydock will not overwrite it: choose another \
                     path with --output, or delete it",
                    image.display()
                ));
            }
            Ok((header, Vec::new()))
        }
    }
}

/// The image (sized as the disk) and its state file, opened to start
/// (both emptied, the header written and synced) or to resume at
/// START_BLOCK (appended to).
pub(super) fn open(
    image: &Path,
    header: &PullHeader,
    start_block: u64,
) -> Result<(std::fs::File, std::fs::File)> {
    let state_file = state_path(image);
    let image_file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(start_block == 0)
        .mode(0o600)
        .open(image)
        .with_context(|| format!("cannot create {}", image.display()))?;
    image_file.set_len(header.size)?;
    let mut state = OpenOptions::new()
        .create(true)
        .write(true)
        .append(start_block != 0)
        .truncate(start_block == 0)
        .mode(0o600)
        .open(&state_file)
        .with_context(|| format!("cannot write {}", state_file.display()))?;
    if start_block == 0 {
        state.write_all(format!("{}\n", serde_json::to_string(header)?).as_bytes())?;
        state.sync_all()?;
    }
    Ok((image_file, state))
}

/// Every segment verified: the manifest replaces the state file.
pub(super) fn finish(
    state_file: &Path,
    manifest_file: &Path,
    header: &PullHeader,
) -> Result<Manifest> {
    let (_, segs) = read_state(state_file)?.context("the pull state vanished")?;
    let segments: Vec<String> = segs.iter().map(|v| v.segment.clone()).collect();
    let blocks: Vec<String> = segs.into_iter().flat_map(|v| v.blocks).collect();
    let source = Source {
        host: header.host.clone(),
        device: header.device.clone(),
        boot_id: header.boot_id.clone(),
        pulled_at: header.started_at.clone(),
    };
    let manifest = Manifest::new(header.size, Some(source), segments, blocks)?;
    manifest.save(manifest_file)?;
    std::fs::remove_file(state_file).ok();
    Ok(manifest)
}
