//! Pages the VPS rebuilds from package files instead of receiving them
//! (issue 18). The worker VM's sealed proxy keeps every package file the
//! upgrade downloaded, with the URL it came from (`NAME.url` beside it);
//! each page to push whose content is a 4 KiB-aligned piece of a file in
//! one of those packages (padded with zeros at the file's end, as the file
//! system holds it) is named to the helper with the package's URL, and the
//! helper fetches the package from the VPS's own mirror and writes the
//! pieces whose SHA-256 matches. What it does not write is sent as usual.
//!
//! The planning reads each package's data archive once here (tar, with
//! the `tar` crate, for each file's offset in the decompressed stream) and
//! hashes every page of it; the helper then needs no tar parser.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use drydock_helper::package::{Format, Piece, content};
use drydock_helper::proto::PAGE;

use crate::transfer::helper::Patch;

/// A package file the worker VM downloaded, its URL and how it is packed.
#[derive(Debug, Clone)]
pub struct PackageFile {
    pub file: PathBuf,
    pub url: String,
    pub format: Format,
    /// An `https://` one's SHA-256 (`NAME.sha256`, hex): the VPS's apt
    /// fetches it and checks it against this (`push::https`).
    pub sha256: Option<String>,
}

/// The package files in DIR (a run's `downloads/`): every `NAME` with a
/// `NAME.url` naming a plain-HTTP `.deb`, or an index file apt fetched
/// by-hash (compressed whole: apt keeps it decompressed in its lists), or
/// an `https://` `.deb` with its `NAME.sha256` (`pipeline::https_debs`).
/// Missing DIR: none.
pub fn package_files(dir: &Path) -> Vec<PackageFile> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PackageFile> = rd
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let url = std::fs::read_to_string(p.with_extension("url")).ok()?;
            let url = url.trim().to_string();
            // An https:// one only with its hash (the worker's apt kept it).
            let sha256 = std::fs::read_to_string(p.with_extension("sha256"))
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            let https = url.starts_with("https://") && sha256.is_some();
            if p.extension().is_some() || !(url.starts_with("http://") || https) {
                return None;
            }
            if https && !url.ends_with(".deb") {
                return None;
            }
            let format = if url.ends_with(".deb") || url.ends_with(".udeb") {
                Format::Deb
            } else if url.contains("/by-hash/") {
                let mut head = [0u8; 6];
                File::open(&p).ok()?.read_exact(&mut head).ok()?;
                Format::sniff(&head)
            } else {
                return None;
            };
            Some(PackageFile {
                file: p,
                url,
                format,
                sha256: if https { sha256 } else { None },
            })
        })
        .collect();
    out.sort_by(|a, b| a.url.cmp(&b.url));
    out
}

/// An `http://HOST[:PORT]/PATH` URL's parts.
pub fn split_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = authority.rsplit('@').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => (h, p.parse().ok()?),
        _ => (authority, 80),
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port, path.to_string()))
}

/// A page of a package's data archive that a push wants: its offset in
/// the decompressed archive, its length before padding, its hash.
type Candidate = (u64, u32, [u8; 32]);
type Found = Result<Vec<Candidate>, String>;

/// One package file's pieces.
#[derive(Debug, Clone)]
pub struct Job {
    pub url: String,
    pub format: Format,
    pub pieces: Vec<Piece>,
    /// An `https://` one's SHA-256 and size (`push::https`).
    pub sha256: Option<String>,
    pub size: u64,
}

/// What the planning found.
#[derive(Debug, Default)]
pub struct Planned {
    pub jobs: Vec<Job>,
    /// Package files read, and those that could not be (with why).
    pub read: usize,
    pub unreadable: Vec<String>,
}

/// The pages of PATCHES (in IMAGE) that a piece of one of FILES rebuilds:
/// each page to one package file (the first, in FILES' order, holding it),
/// pieces in the order of their package's data archive. Pages of zeros are
/// left to the push (they cost it nothing).
pub fn plan(files: &[PackageFile], image: &File, patches: &[Patch]) -> Result<Planned> {
    let mut wanted: HashMap<[u8; 32], Vec<u64>> = HashMap::new();
    let mut page = vec![0u8; PAGE as usize];
    for p in patches {
        let mut off = p.offset;
        // Whole pages only (a disk's short last page is sent).
        while off + PAGE <= p.offset + p.len as u64 {
            image
                .read_exact_at(&mut page, off)
                .context("cannot read the image")?;
            if !drydock_helper::proto::is_zero(&page) {
                wanted
                    .entry(drydock_helper::proto::sha256(&page))
                    .or_default()
                    .push(off);
            }
            off += PAGE;
        }
    }
    let mut out = Planned::default();
    if wanted.is_empty() {
        return Ok(out);
    }
    // Each package's candidate pieces, read on every core.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(files.len().max(1));
    let found: Vec<Found> = {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let slots: Vec<std::sync::Mutex<Option<Found>>> =
            files.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(f) = files.get(i) else { break };
                        let r = candidates(f, &wanted);
                        *slots[i].lock().expect("slot") = Some(r);
                    }
                });
            }
        });
        slots
            .into_iter()
            .map(|m| m.into_inner().expect("slot").expect("every file read"))
            .collect()
    };
    for (f, r) in files.iter().zip(found) {
        match r {
            Ok(cands) => {
                out.read += 1;
                let mut pieces = Vec::new();
                for (stream_offset, len, hash) in cands {
                    if let Some(offs) = wanted.remove(&hash) {
                        pieces.extend(offs.into_iter().map(|disk_offset| Piece {
                            stream_offset,
                            len,
                            hash,
                            disk_offset,
                        }));
                    }
                }
                if !pieces.is_empty() {
                    pieces.sort_by_key(|p| (p.stream_offset, p.disk_offset));
                    out.jobs.push(Job {
                        url: f.url.clone(),
                        format: f.format,
                        pieces,
                        sha256: f.sha256.clone(),
                        size: std::fs::metadata(&f.file).map(|m| m.len()).unwrap_or(0),
                    });
                }
            }
            Err(e) => out.unreadable.push(format!("{}: {e}", f.url)),
        }
    }
    Ok(out)
}

/// The pages of PF's content (a package's data archive, or an index file)
/// that WANTED holds: offset in the decompressed stream, length before
/// padding, hash of the padded page.
fn candidates(pf: &PackageFile, wanted: &HashMap<[u8; 32], Vec<u64>>) -> Found {
    let file = &pf.file;
    let f = File::open(file).map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    let mut stream = content(std::io::BufReader::with_capacity(1 << 16, f), pf.format)?;
    let mut out = Vec::new();
    let mut page = vec![0u8; PAGE as usize];
    if pf.format != Format::Deb {
        // One file, from offset 0.
        let mut at = 0u64;
        loop {
            page.fill(0);
            let n = read_full(&mut stream, &mut page).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            let h = drydock_helper::proto::sha256(&page);
            if wanted.contains_key(&h) {
                out.push((at, n as u32, h));
            }
            at += n as u64;
            if n < page.len() {
                break;
            }
        }
        return Ok(out);
    }
    let mut ar = tar::Archive::new(stream);
    for entry in ar.entries().map_err(|e| format!("tar: {e}"))? {
        let mut e = entry.map_err(|e| format!("tar: {e}"))?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let start = e.raw_file_position();
        let size = e.size();
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(PAGE) as usize;
            page.fill(0);
            e.read_exact(&mut page[..n])
                .map_err(|e| format!("tar: {e}"))?;
            let h = drydock_helper::proto::sha256(&page);
            if wanted.contains_key(&h) {
                out.push((start + at, n as u32, h));
            }
            at += n as u64;
        }
    }
    Ok(out)
}

/// Bytes read into BUF until it is full or R ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// PATCHES less the pages in DONE (sorted page offsets), split where a
/// page was taken out.
pub fn without(patches: &[Patch], done: &[u64]) -> Vec<Patch> {
    let mut out = Vec::new();
    for p in patches {
        let mut run: Option<Patch> = None;
        let mut off = p.offset;
        while off < p.offset + p.len as u64 {
            let len = (p.offset + p.len as u64 - off).min(PAGE) as u32;
            if done.binary_search(&off).is_ok() {
                out.extend(run.take());
            } else {
                match run.as_mut() {
                    Some(r) => r.len += len,
                    None => run = Some(Patch { offset: off, len }),
                }
            }
            off += PAGE;
        }
        out.extend(run);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            split_url("http://deb.debian.org/debian/pool/main/a/a.deb"),
            Some((
                "deb.debian.org".into(),
                80,
                "/debian/pool/main/a/a.deb".into()
            ))
        );
        assert_eq!(
            split_url("http://127.0.0.1:8080/x.deb"),
            Some(("127.0.0.1".into(), 8080, "/x.deb".into()))
        );
        assert_eq!(split_url("https://a/x.deb"), None);
        assert_eq!(split_url("http:///x.deb"), None);
    }

    #[test]
    fn pages_taken_out_split_the_patches() {
        let p = [
            Patch {
                offset: 0,
                len: 4 * 4096,
            },
            Patch {
                offset: 1 << 20,
                len: 4096,
            },
        ];
        assert_eq!(
            without(&p, &[4096, 1 << 20]),
            vec![
                Patch {
                    offset: 0,
                    len: 4096
                },
                Patch {
                    offset: 8192,
                    len: 8192
                }
            ]
        );
        assert_eq!(without(&p, &[]), p.to_vec());
    }
}
