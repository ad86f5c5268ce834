//! Package files the upgrade fetched over HTTPS, fetched again by the VPS
//! itself (issue 32): the helper speaks plain HTTP only, and TLS is the
//! VPS's business (its CAs, its client keys, its proxy, `auth.conf`), so
//! its own apt does it: `/usr/lib/apt/apt-helper download-file URL FILE
//! SHA256:…`, which checks the file against the hash the worker's apt
//! accepted. The files go to a folder in the VPS's RAM (`/run`), all of
//! them before the helper writes a page: apt runs from the disk the push
//! rewrites, so it must be done with it first. They take at most half of
//! the memory the VPS has available (the most pages per byte first); the
//! helper then reads them as it reads a mirror's answer, and the folder is
//! removed after the push. A VPS without apt-helper, or whose fetch fails,
//! is sent those pages, and the push says so.

use std::time::Duration;

use drydock_helper::package::{Piece, Source};

use super::rebuild::Job;
use crate::ssh::{Session, shell_quote};

/// The VPS's folder for the files (tmpfs on systemd and OpenRC hosts),
/// the one the helper reads such sources from.
pub const DIR: &str = "/run/drydock-packages";

/// What the VPS says of itself: whether it has apt-helper, the memory it
/// has available and what /run has free, in KiB.
const ASK: &str = r#"[ -x /usr/lib/apt/apt-helper ] && echo apt-helper
awk '/^MemAvailable:/ { print "available", $2 }' /proc/meminfo
df -Pk /run 2>/dev/null | awk 'NR == 2 { print "run_available", $4 }'; true"#;

/// What /run keeps free for the host itself (the freeze's record is there).
const RUN_MARGIN: u64 = 32 << 20;

/// Bytes the files may take, from ASK's answer: the smaller of half the
/// memory available and /run's free space less RUN_MARGIN (0 when /run's
/// space is not said); None without apt-helper.
fn budget(said: &str) -> Option<u64> {
    let kib = |key: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_mul(1024)
    };
    said.lines()
        .any(|l| l == "apt-helper")
        .then(|| (kib("available ") / 2).min(kib("run_available ").saturating_sub(RUN_MARGIN)))
}

/// Lines `NAME SHA256 URL` on its input; for each, `ok NAME` or
/// `failed NAME WHY`. Each fetch is bounded by `timeout`; the folder is
/// left only with files in it (removed after the push).
const FETCH: &str = r#"d=/run/drydock-packages; mkdir -p -m 700 "$d" || exit 1
while read -r n hash url; do
  if timeout 300 /usr/lib/apt/apt-helper -o APT::Sandbox::User=root download-file "$url" "$d/$n" "SHA256:$hash" >/dev/null 2>"$d/err"; then
    echo "ok $n"
  else
    rc=$?; rm -f "$d/$n" "$d/$n.FAILED"
    why=$(grep -m 1 '^E:' "$d/err" || grep . "$d/err" | tail -n 1)
    echo "failed $n $(printf '%s' "${why:-apt-helper exited with $rc, saying nothing}" | tr -cd '[:print:]' | cut -c 1-200)"
  fi
done
rm -f "$d/err"; rmdir "$d" 2>/dev/null; true"#;

/// The https jobs chosen to fit BUDGET bytes, the most pages per byte
/// first; the rest are returned apart (their pages are sent).
pub fn choose(mut jobs: Vec<Job>, budget: u64) -> (Vec<Job>, Vec<Job>) {
    jobs.sort_by(|a, b| {
        let (x, y) = (
            a.pieces.len() as u128 * b.size.max(1) as u128,
            b.pieces.len() as u128 * a.size.max(1) as u128,
        );
        y.cmp(&x).then(a.url.cmp(&b.url))
    });
    let (mut take, mut leave, mut used) = (Vec::new(), Vec::new(), 0u64);
    for j in jobs {
        if used + j.size <= budget {
            used += j.size;
            take.push(j);
        } else {
            leave.push(j);
        }
    }
    (take, leave)
}

/// Have the VPS fetch JOBS (https, each with its hash) into DIR; the ones
/// fetched, as the helper's sources (a local file: its path as the
/// address). What could not be fetched goes to NOTES.
pub async fn prefetch(
    session: &Session,
    jobs: Vec<Job>,
    notes: &mut Vec<String>,
) -> Vec<(Source, Vec<Piece>)> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let n = jobs.len();
    let host = session.host();
    let said = match tokio::time::timeout(Duration::from_secs(30), session.exec(ASK)).await {
        Ok(Ok(o)) => o.stdout_str(),
        Ok(Err(e)) => {
            notes.push(format!(
                "cannot ask {host} whether its apt can fetch the {n} package file(s) the upgrade \
                 fetched over HTTPS ({e:#}): their pages are sent"
            ));
            return Vec::new();
        }
        Err(_) => {
            notes.push(format!(
                "{host} did not say within 30 s whether its apt can fetch the {n} package file(s) \
                 the upgrade fetched over HTTPS: their pages are sent"
            ));
            return Vec::new();
        }
    };
    let Some(room) = budget(&said) else {
        notes.push(format!(
            "{host} has no /usr/lib/apt/apt-helper to fetch the {n} package file(s) the upgrade \
             fetched over HTTPS: their pages are sent"
        ));
        return Vec::new();
    };
    let (take, leave) = choose(jobs, room);
    if !leave.is_empty() {
        notes.push(format!(
            "{} package file(s) fetched over HTTPS do not fit in the {} MiB {host} can hold in \
             /run (half its available memory, /run's free space less 32 MiB) beside the others: \
             their pages are sent",
            leave.len(),
            room >> 20
        ));
    }
    if take.is_empty() {
        return Vec::new();
    }
    let out = match fetch(session, &take).await {
        Ok(out) => out,
        Err(e) => {
            notes.push(format!("{host}: {e}"));
            return Vec::new();
        }
    };
    let ok = outcomes(&out, &take, &host, notes);
    take.into_iter()
        .zip(ok)
        .enumerate()
        .filter(|(_, (_, ok))| *ok)
        .map(|(i, (j, _))| (source(&j, i), j.pieces))
        .collect()
}

/// FETCH run on the VPS for TAKE (the i-th as file i): what it printed,
/// or why it did not end.
async fn fetch(session: &Session, take: &[Job]) -> Result<String, String> {
    let mut input = String::new();
    for (i, j) in take.iter().enumerate() {
        let hash = j.sha256.as_deref().unwrap_or_default();
        input.push_str(&format!("{i} {hash} {}\n", j.url));
    }
    let bytes: u64 = take.iter().map(|j| j.size).sum();
    // 300 s a file at most, and no more than 60 s and 1 s for each 256 KiB
    // in all (a mirror slower than that costs more downtime than it saves).
    // The host ends the fetch itself at the bound (apt runs from the disk
    // the push rewrites: it must not outlive this step), and drydock waits
    // 30 s longer for the answer.
    let bound = Duration::from_secs(60 + bytes / (256 << 10));
    let cmd = format!(
        "timeout -k 5 {} sh -c {}",
        bound.as_secs(),
        shell_quote(FETCH)
    );
    match tokio::time::timeout(
        bound + Duration::from_secs(30),
        session.exec_input(&cmd, Some(input.as_bytes())),
    )
    .await
    {
        Ok(Ok(o)) => Ok(o.stdout_str()),
        Ok(Err(e)) => Err(format!(
            "could not fetch the package files fetched over HTTPS: {e:#}"
        )),
        Err(_) => Err(format!(
            "took more than {} s to fetch the package files fetched over HTTPS: their pages are \
             sent",
            bound.as_secs()
        )),
    }
}

/// Which of TAKE FETCH said it fetched (`ok I`); each `failed I WHY`
/// goes to NOTES with the file's URL.
fn outcomes(out: &str, take: &[Job], host: &str, notes: &mut Vec<String>) -> Vec<bool> {
    let mut ok = vec![false; take.len()];
    for l in out.lines() {
        let mut w = l.splitn(3, ' ');
        let (what, i) = (w.next(), w.next().and_then(|i| i.parse::<usize>().ok()));
        match (what, i) {
            (Some("ok"), Some(i)) if i < ok.len() => ok[i] = true,
            (Some("failed"), Some(i)) if i < take.len() => notes.push(format!(
                "{host} could not fetch {} with its apt: {}",
                take[i].url,
                crate::services::printable(w.next().unwrap_or("no reason given"))
            )),
            _ => {}
        }
    }
    ok
}

/// The helper's source for job J fetched as file I of DIR.
fn source(j: &Job, i: usize) -> Source {
    let (host, path) = j
        .url
        .strip_prefix("https://")
        .and_then(|r| r.split_once('/'))
        .map(|(h, p)| (h.to_string(), format!("/{p}")))
        .unwrap_or_default();
    Source {
        addr: format!("{DIR}/{i}"),
        host,
        path,
        format: j.format,
    }
}

/// The folder removed from the VPS (after the push, whatever its end).
pub async fn clean(session: &Session) {
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        session.exec(&format!("rm -rf {DIR}")),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use drydock_helper::package::Format;

    fn job(url: &str, pieces: usize, size: u64) -> Job {
        Job {
            url: url.into(),
            format: Format::Deb,
            pieces: (0..pieces)
                .map(|i| Piece {
                    stream_offset: i as u64 * 4096,
                    len: 4096,
                    hash: [0; 32],
                    disk_offset: i as u64 * 4096,
                })
                .collect(),
            sha256: Some("00".repeat(32)),
            size,
        }
    }

    /// FETCH's answers are data from the VPS: an index out of range is
    /// nothing, and a reason is shown escaped.
    #[test]
    fn the_fetchs_answers_are_read_as_data() {
        let take = vec![job("https://m/a.deb", 1, 10), job("https://m/b.deb", 1, 10)];
        let mut notes = Vec::new();
        let ok = outcomes(
            "ok 0\nok 7\nfailed 1 E: \x1b[2J bad\nfailed 9 x\nnonsense\n",
            &take,
            "vps",
            &mut notes,
        );
        assert_eq!(ok, [true, false]);
        assert_eq!(
            notes,
            ["vps could not fetch https://m/b.deb with its apt: E: \\x1b[2J bad"]
        );
        let s = source(&take[1], 1);
        assert_eq!(
            (s.addr.as_str(), s.host.as_str(), s.path.as_str()),
            ("/run/drydock-packages/1", "m", "/b.deb")
        );
    }

    #[test]
    fn the_helper_reads_from_this_folder() {
        assert_eq!(drydock_helper::package::FETCHED_DIR, format!("{DIR}/"));
    }

    /// The files go to /run, a tmpfs of a fifth of the RAM on systemd
    /// hosts: the budget is the smaller of half the memory available and
    /// what /run has free less 32 MiB for the host's own use (a 1 GB VPS's
    /// /run of 200 MiB must not be filled, while frozen). No apt-helper, or
    /// an answer without /run's space: nothing is fetched.
    #[test]
    fn the_budget_is_half_the_memory_and_what_run_can_hold() {
        let b = |s: &str| budget(s);
        assert_eq!(
            b("apt-helper\navailable 700000\nrun_available 204800\n"),
            Some(204800 * 1024 - (32 << 20))
        );
        assert_eq!(
            b("apt-helper\navailable 100000\nrun_available 2048000\n"),
            Some(100000 * 1024 / 2)
        );
        assert_eq!(
            b("apt-helper\navailable 100000\nrun_available 20000\n"),
            Some(0)
        );
        assert_eq!(b("apt-helper\navailable 100000\n"), Some(0));
        assert_eq!(b("available 100000\nrun_available 2048000\n"), None);
    }

    #[test]
    fn the_most_pages_per_byte_are_fetched_first_within_the_budget() {
        let (take, leave) = choose(
            vec![
                job("https://m/big.deb", 10, 1000),
                job("https://m/dense.deb", 10, 100),
                job("https://m/sparse.deb", 1, 500),
            ],
            700,
        );
        let urls = |v: &[Job]| v.iter().map(|j| j.url.clone()).collect::<Vec<_>>();
        assert_eq!(urls(&take), ["https://m/dense.deb", "https://m/sparse.deb"]);
        assert_eq!(urls(&leave), ["https://m/big.deb"]);
        let (take, leave) = choose(vec![job("https://m/a.deb", 1, 10)], 0);
        assert!(take.is_empty() && leave.len() == 1);
    }

    /// FETCH, with a stand-in apt-helper that "fetches" by copying a local
    /// file when the hash matches, as the real one refuses a mismatch: the
    /// answers name each line's outcome, and a failed fetch leaves no file.
    #[test]
    fn the_fetch_script_says_what_it_fetched() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("pkgs");
        let helper = d.path().join("apt-helper");
        std::fs::write(
            &helper,
            "#!/bin/sh\n# -o X download-file URL FILE HASH\n\
             [ \"$4\" = https://m/good.deb ] && [ \"$6\" = SHA256:aa ] && { echo data > \"$5\"; exit 0; }\n\
             echo 'E: Failed to fetch https://m/bad.deb  Hash Sum mismatch' >&2; : > \"$5.FAILED\"; exit 100\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = FETCH
            .replace("/run/drydock-packages", dir.to_str().unwrap())
            .replace("/usr/lib/apt/apt-helper", helper.to_str().unwrap());
        let mut c = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(b"0 aa https://m/good.deb\n1 bb https://m/bad.deb\n")
            .unwrap();
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ok 0\nfailed 1 E: Failed to fetch https://m/bad.deb  Hash Sum mismatch\n"
        );
        assert_eq!(std::fs::read(dir.join("0")).unwrap(), b"data\n");
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["0"]);
    }
}
