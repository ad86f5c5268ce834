//! The rebuild's side of a push (issue 18, issue 32): the planning of
//! which pages the host rebuilds from package files, each plain-HTTP
//! mirror's name resolved on the host, the HTTPS ones fetched by its apt
//! (`https`); what it cannot rebuild is sent.

use std::fs::File;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{PushOptions, https, rebuild};
use crate::ssh::Session;
use crate::transfer::helper::Patch;
use crate::ui::{Ui, human_bytes};
use drydock_helper::proto::PAGE;

/// What a push asks the host to rebuild: package files at addresses the
/// host resolved, with their pieces.
#[derive(Debug, Default)]
pub(super) struct Rebuild {
    pub(super) jobs: Vec<(
        drydock_helper::package::Source,
        Vec<drydock_helper::package::Piece>,
    )>,
    pub(super) files: usize,
    pub(super) notes: Vec<String>,
    /// Package files of HTTPS sources, for the host's apt to fetch once the
    /// push is confirmed (`fetch_https`): nothing changes on the host
    /// before.
    pub(super) https: Vec<rebuild::Job>,
    /// The host's apt was asked to fetch into `https::DIR` (removed after
    /// the push, however it ended).
    pub(super) fetched_https: bool,
}

impl Rebuild {
    /// The pages it rebuilds, those of HTTPS sources still to fetch
    /// counted.
    pub(super) fn pages(&self) -> u64 {
        let https: usize = self.https.iter().map(|j| j.pieces.len()).sum();
        self.jobs.iter().map(|(_, p)| p.len() as u64).sum::<u64>() + https as u64
    }

    /// The package files it rebuilds from.
    pub(super) fn files(&self) -> usize {
        self.jobs.len() + self.https.len()
    }
}

/// The package files of HTTPS sources fetched by the host's apt, after the
/// push's confirmation and before its first write; what it could not fetch
/// is said, kept in the notes, and sent.
pub(super) async fn fetch_https(rebuild: &mut Rebuild, session: &Session, ui: &Ui) {
    if rebuild.https.is_empty() {
        return;
    }
    // Removed after the push whatever came of it (a fetch cut short leaves
    // part of a file there).
    rebuild.fetched_https = true;
    let jobs = std::mem::take(&mut rebuild.https);
    let n = jobs.len();
    let mut notes = Vec::new();
    let fetched = https::prefetch(session, jobs, &mut notes).await;
    ui.say(format!(
        "{} fetched {} of the {n} package file(s) of HTTPS sources with its own apt",
        session.host(),
        fetched.len()
    ));
    for note in &notes {
        ui.say(format!("not rebuilt on the host: {note}"));
    }
    rebuild.jobs.extend(fetched);
    rebuild.notes.extend(notes);
}

/// A rebuild's planning under way (on a blocking thread).
pub(super) struct PlanStarted {
    /// The plan, and the time it took.
    task: tokio::task::JoinHandle<Result<(rebuild::Planned, Duration)>>,
    files: usize,
}

/// The planning of a rebuild from the package files in OPTS.packages
/// started, for the pages of PATCHES in IMAGE; none without package files.
pub(super) fn start_plan(
    opts: &PushOptions,
    image: &File,
    patches: Vec<Patch>,
    ui: &Ui,
) -> Result<Option<PlanStarted>> {
    // No folder: the run downloaded nothing (`push --packages` refuses a
    // path that is not one before connecting).
    let Some(dir) = opts.packages.as_ref().filter(|d| d.is_dir()) else {
        return Ok(None);
    };
    let files = rebuild::package_files(dir);
    if files.is_empty() {
        ui.say(format!(
            "{} holds no package file with its URL (NAME beside NAME.url): every page is sent",
            dir.display()
        ));
        return Ok(None);
    }
    let image = image.try_clone()?;
    let n = files.len();
    Ok(Some(PlanStarted {
        task: tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            rebuild::plan(&files, &image, &patches).map(|p| (p, t.elapsed()))
        }),
        files: n,
    }))
}

/// The rebuild STARTED planned, kept to the pages of PATCHES, each
/// mirror's name resolved on the host (its own resolver, as apt there
/// would); none when there is nothing to write, or when the host cannot
/// resolve a mirror (said, and sent instead).
pub(super) async fn plan_rebuild(
    started: Option<PlanStarted>,
    patches: &[Patch],
    session: &Session,
    ui: &Ui,
) -> Result<Rebuild> {
    let Some(started) = started else {
        return Ok(Rebuild::default());
    };
    if patches.is_empty() {
        // Nothing to write: the planning is left to end on its own.
        return Ok(Rebuild::default());
    }
    let n = started.files;
    let (mut planned, took) = started.task.await??;
    // Only the pages this push writes (the planning may have started from
    // every page of the blocks that changed).
    let mut pages: Vec<u64> = patches
        .iter()
        .flat_map(|p| (p.offset..p.offset + p.len as u64).step_by(PAGE as usize))
        .collect();
    pages.sort_unstable();
    for job in &mut planned.jobs {
        job.pieces
            .retain(|p| pages.binary_search(&p.disk_offset).is_ok());
    }
    planned.jobs.retain(|j| !j.pieces.is_empty());
    let found_pages: u64 = planned.jobs.iter().map(|j| j.pieces.len() as u64).sum();
    let found_files = planned.jobs.len();
    let mut out = Rebuild {
        files: n,
        notes: planned.unreadable.clone(),
        ..Default::default()
    };
    let (https_jobs, http_jobs): (Vec<_>, Vec<_>) = planned
        .jobs
        .into_iter()
        .partition(|j| j.sha256.is_some() && j.url.starts_with("https://"));
    out.jobs = resolved(session, http_jobs, &mut out.notes).await;
    out.https = https_jobs;
    let unreached = found_pages - out.pages();
    ui.say(format!(
        "{} of the pages to write are in {} of the {} package files the upgrade downloaded \
         (planned in {:.1} s): {}",
        human_bytes(found_pages * PAGE),
        found_files,
        n,
        took.as_secs_f64(),
        if unreached == 0 {
            "the host rebuilds them from its mirror".to_string()
        } else if out.files() == 0 {
            "the host cannot reach their mirror, so they are sent".to_string()
        } else {
            format!(
                "the host rebuilds {} from its mirror; it cannot reach the mirror of the other {}, \
                 which are sent",
                human_bytes(out.pages() * PAGE),
                human_bytes(unreached * PAGE)
            )
        }
    ));
    for note in &out.notes {
        ui.say(format!("not rebuilt on the host: {note}"));
    }
    if !out.https.is_empty() {
        ui.say(format!(
            "{} of those package files come from HTTPS sources: once the push is confirmed, the \
             host's own apt fetches them into {} before the first write",
            out.https.len(),
            https::DIR
        ));
    }
    Ok(out)
}

/// Plain-HTTP JOBS as the helper's sources, each mirror's name resolved
/// on the host (once per host and port); a name it cannot resolve goes to
/// NOTES and its jobs are left out (their pages are sent).
async fn resolved(
    session: &Session,
    jobs: Vec<rebuild::Job>,
    notes: &mut Vec<String>,
) -> Vec<(
    drydock_helper::package::Source,
    Vec<drydock_helper::package::Piece>,
)> {
    let mut addrs: std::collections::HashMap<(String, u16), Option<String>> = Default::default();
    let mut out = Vec::new();
    for job in jobs {
        let Some((host, port, path)) = rebuild::split_url(&job.url) else {
            continue;
        };
        let key = (host.clone(), port);
        if !addrs.contains_key(&key) {
            let a = match resolve(session, &host).await {
                Ok(ip) => Some(ip),
                Err(e) => {
                    notes.push(e);
                    None
                }
            };
            addrs.insert(key.clone(), a);
        }
        let Some(ip) = addrs[&key].clone() else {
            continue;
        };
        let addr = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        let http_host = if port == 80 {
            host
        } else {
            format!("{host}:{port}")
        };
        out.push((
            drydock_helper::package::Source {
                addr,
                host: http_host,
                path,
                format: job.format,
            },
            job.pieces,
        ));
    }
    out
}

/// HOST's address as the host itself resolves it (its first IPv4
/// address, else its first address), within 30 s.
async fn resolve(session: &Session, host: &str) -> std::result::Result<String, String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(host.to_string());
    }
    let q = crate::ssh::shell_quote(host);
    let cmd = format!(
        "getent ahostsv4 {q} 2>/dev/null | head -n 1 || true; getent ahosts {q} | head -n 1"
    );
    let out = tokio::time::timeout(Duration::from_secs(30), session.exec(&cmd)).await;
    let text = match out {
        Ok(Ok(o)) => o.stdout_str(),
        Ok(Err(e)) => {
            return Err(format!(
                "cannot ask {} for {host}'s address: {e:#}",
                session.host()
            ));
        }
        Err(_) => {
            return Err(format!(
                "{} took more than 30 s to resolve {host}",
                session.host()
            ));
        }
    };
    text.split_whitespace()
        .next()
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .map(str::to_string)
        .ok_or_else(|| format!("{} cannot resolve {host} (getent ahosts)", session.host()))
}
