//! apt's package files fetched over HTTPS (issue 32). The sealed proxy
//! sees only a CONNECT tunnel's host for an `https://` source, so it
//! cannot keep those files as it keeps plain-HTTP ones, and the push would
//! send every page of them over the uplink. Instead, apt in the worker VM
//! says what the upgrade fetches (`apt-get --print-uris full-upgrade`,
//! after the index update on the new release: URL, file name, size); apt's
//! cache holds those files until the recipe's clean, and they are copied
//! out of it just before (into the worker's RAM, `/run`), then read here
//! over the worker's SSH session into the run's `downloads/`, each with
//! its URL and SHA-256 (`NAME.url`, `NAME.sha256`). The push then has the
//! VPS fetch them from its own mirror with its own apt (its TLS, its keys,
//! its proxy: `apt-helper download-file`) and rebuild the pages they hold
//! (`transfer::push::https`).
//!
//! apt was checked against the signed index in the worker: the hash kept
//! here is of the file apt accepted, and the VPS's apt checks its download
//! against it.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::ssh::{Session, shell_quote};
use crate::ui::Ui;

/// The worker's folder for the list and the kept files (tmpfs).
const DIR: &str = "/run/drydock-https";

/// After the index update: what the full upgrade fetches over HTTPS, one
/// `URL FILE SIZE` line each (apt quotes the URL; file names are apt's
/// own, `name_version_arch.deb`, never a path).
pub const LIST_SCRIPT: &str = r#"d=/run/drydock-https; rm -rf "$d"; mkdir -p -m 700 "$d/debs"
apt-get -qq --print-uris -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold full-upgrade 2>/dev/null \
  | sed -n "s/^'\(https:\/\/[^' ]*\)' \([^ /']*\.deb\) \([0-9][0-9]*\) .*/\1 \2 \3/p" > "$d/uris" || true
n=$(wc -l < "$d/uris"); [ "$n" -eq 0 ] || echo "apt fetches $n package file(s) of the upgrade over HTTPS"
"#;

/// Before the recipe's clean: those files copied out of apt's cache into
/// the worker's RAM, within half of what it has available and what /run (a
/// tmpfs of a fifth of the RAM) has free less 32 MiB, so that the worker's
/// init keeps its room there (counted in the shell: mawk prints a product
/// over 2^31 in exponent form).
pub const KEEP_SCRIPT: &str = r#"d=/run/drydock-https; [ -s "$d/uris" ] || exit 0
kib=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo); budget=$(( ${kib:-0} * 512 ))
room=$(df -Pk "$d" 2>/dev/null | awk 'NR == 2 { print $4 }'); room=$(( ${room:-0} * 1024 - 33554432 ))
[ "$room" -lt "$budget" ] && budget=$room; used=0; n=0; left=0
while read -r url file size; do
  f=/var/cache/apt/archives/$file
  [ -f "$f" ] || continue
  if [ $((used + size)) -gt "$budget" ]; then left=$((left + 1)); continue; fi
  cp "$f" "$d/debs/$file" && used=$((used + size)) && n=$((n + 1))
done < "$d/uris"
echo "kept $n package file(s) fetched over HTTPS for the push ($used bytes); $left left out for want of memory"
"#;

/// Run one of the scripts in the worker: what it says goes to the run log
/// and the terminal. It changes nothing on the disk; a failure only means
/// that the pages are sent, so it is said and the upgrade goes on.
pub async fn run(s: &Session, script: &str, log: &Path, ui: &Ui) {
    let said = match tokio::time::timeout(Duration::from_secs(600), s.exec(script)).await {
        Ok(Ok(o)) if o.success() => o.stdout_str(),
        Ok(Ok(o)) => format!("{}\n", o.describe_end()),
        Ok(Err(e)) => format!("{e:#}\n"),
        Err(_) => "took more than 600 s\n".to_string(),
    };
    let said = crate::services::printable(said.trim());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        use std::io::Write;
        let _ = writeln!(f, "\n$ (drydock: package files fetched over HTTPS)\n{said}");
    }
    if !said.is_empty() {
        ui.say(format!("worker VM: {said}"));
    }
}

/// A short command's output in the worker, within 60 s (the worker VM
/// that stops answering ends the upgrade with this error; nothing was
/// pushed).
async fn read(s: &Session, cmd: &str) -> Result<String> {
    match tokio::time::timeout(Duration::from_secs(60), s.exec(cmd)).await {
        Ok(r) => Ok(r?.stdout_str()),
        Err(_) => anyhow::bail!(
            "the worker VM did not answer within 60 s while its package files fetched over \
             HTTPS were read; nothing was pushed"
        ),
    }
}

/// One listed file: its URL, apt's file name, its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub url: String,
    pub file: String,
    pub size: u64,
}

/// The lines of LIST_SCRIPT's list that are what it promises: an
/// `https://` URL without spaces or control characters, a plain file name
/// ending in `.deb`, a size. Anything else from the worker is dropped.
pub fn parse_list(text: &str) -> Vec<Listed> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            let (url, file, size) = (w.next()?, w.next()?, w.next()?);
            if w.next().is_some()
                || !url.starts_with("https://")
                || url.chars().any(|c| c.is_control())
                || file.is_empty()
                || file.starts_with('.')
                || !file.ends_with(".deb")
                || file.contains(['/', '\\'])
                || file.chars().any(|c| c.is_control())
            {
                return None;
            }
            Some(Listed {
                url: url.to_string(),
                file: file.to_string(),
                size: size.parse().ok()?,
            })
        })
        .collect()
}

/// What the collection brought into `downloads/`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub files: usize,
    pub bytes: u64,
}

/// Read the files KEEP_SCRIPT kept from the worker into DOWNLOADS, each
/// as the proxy names a download (the SHA-256 of its URL) with `.url` and
/// `.sha256` beside it. A file that does not arrive whole is left out (its
/// pages are then sent, as for any file not kept); each read is bounded.
pub async fn collect(s: &Session, downloads: &Path, ui: &Ui) -> Result<Collected> {
    let list = read(s, &format!("cat {DIR}/uris 2>/dev/null; true")).await?;
    let kept = read(
        s,
        &format!(
            "cd {DIR}/debs 2>/dev/null && for f in *; do [ -f \"$f\" ] && echo \"$f\"; done; true"
        ),
    )
    .await?;
    let kept: Vec<&str> = kept.lines().collect();
    let mut out = Collected::default();
    for l in parse_list(&list) {
        if !kept.contains(&l.file.as_str()) {
            continue;
        }
        // 30 s, and one more for each MiB: the worker's SSH under TCG.
        let bound = Duration::from_secs(30 + l.size / (1 << 20));
        let cmd = format!("cat {}", shell_quote(&format!("{DIR}/debs/{}", l.file)));
        let got = match tokio::time::timeout(bound, s.exec(&cmd)).await {
            Ok(Ok(o)) if o.success() && o.stdout.len() as u64 == l.size => o.stdout,
            _ => {
                ui.warn(format!(
                    "{} did not come out of the worker VM whole within {} s: its pages are sent",
                    crate::services::printable(&l.url),
                    bound.as_secs()
                ));
                continue;
            }
        };
        let name = hex::encode(crate::image::manifest::sha256(l.url.as_bytes()));
        let path = downloads.join(&name);
        std::fs::create_dir_all(downloads)?;
        let hash = hex::encode(crate::image::manifest::sha256(&got));
        crate::util::write_atomic(&path.with_extension("url"), l.url.as_bytes())?;
        crate::util::write_atomic(&path.with_extension("sha256"), hash.as_bytes())?;
        crate::util::write_atomic(&path, &got)?;
        out.files += 1;
        out.bytes += l.size;
    }
    let _ = read(s, &format!("rm -rf {DIR}")).await;
    if out.files > 0 {
        ui.say(format!(
            "{} package file(s) the upgrade fetched over HTTPS ({}) kept for the push: the VPS \
             fetches them from its own mirror with its own apt and rebuilds their pages",
            out.files,
            crate::ui::human_bytes(out.bytes)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An executable stand-in for PROGRAM in DIR (put first in PATH).
    fn stand_in(dir: &Path, program: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(program);
        std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// SCRIPT run by sh with its folder at RUN, apt's cache at CACHE and
    /// BIN first in PATH.
    fn sh(script: &str, run: &Path, cache: &Path, bin: &Path) -> std::process::Output {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(
                script
                    .replace("/run/drydock-https", run.to_str().unwrap())
                    .replace("/var/cache/apt/archives", cache.to_str().unwrap()),
            )
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap()
    }

    #[test]
    fn the_list_keeps_only_what_it_promises() {
        let text = "https://deb.debian.org/debian/pool/main/a/apt/apt_3.0.3_amd64.deb apt_3.0.3_amd64.deb 1404456\n\
                    https://deb.debian.org/debian/pool/main/b/bash/bash_5.2.37-2%2bb5_amd64.deb bash_5.2.37-2+b5_amd64.deb 1500000\n\
                    https://x/y.deb ../../etc/passwd.deb 10\n\
                    https://x/y.deb .deb 10\n\
                    http://deb.debian.org/a.deb a.deb 10\n\
                    https://x/\x1b[2Jy.deb y.deb 10\n\
                    https://x/z.deb z.deb ten\n\
                    https://x/z.deb z.deb 10 more\n\
                    https://x/z.tar z.tar 10\n";
        let l = parse_list(text);
        assert_eq!(
            l.iter().map(|l| l.file.as_str()).collect::<Vec<_>>(),
            ["apt_3.0.3_amd64.deb", "bash_5.2.37-2+b5_amd64.deb"]
        );
        assert_eq!(l[0].size, 1404456);
    }

    /// LIST_SCRIPT's sed, on the lines apt prints (apt 2.6's hash is
    /// MD5Sum, apt 3's SHA256: either is dropped; the hash kept is of the
    /// file the worker's apt accepted).
    #[test]
    fn the_list_script_reads_apts_print_uris() {
        let d = tempfile::tempdir().unwrap();
        stand_in(
            d.path(),
            "apt-get",
            "cat <<'E'\n\
             'https://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb' hello_2.10-3_amd64.deb 53080 MD5Sum:d04c2e9639dee67aa836d8232b1ca658\n\
             'http://deb.debian.org/debian/pool/main/a/a/a_1_amd64.deb' a_1_amd64.deb 10 SHA256:00\n\
             'https://security.debian.org/pool/updates/main/o/openssl/libssl3t64_3.5.1-1%2bdeb13u1_amd64.deb' libssl3t64_3.5.1-1+deb13u1_amd64.deb 2345678 SHA256:abcd\n\
             E\n",
        );
        let run = d.path().join("run");
        let out = sh(LIST_SCRIPT, &run, d.path(), d.path());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "apt fetches 2 package file(s) of the upgrade over HTTPS\n"
        );
        let list = std::fs::read_to_string(run.join("uris")).unwrap();
        assert_eq!(
            parse_list(&list),
            vec![
                Listed {
                    url: "https://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
                        .into(),
                    file: "hello_2.10-3_amd64.deb".into(),
                    size: 53080
                },
                Listed {
                    url: "https://security.debian.org/pool/updates/main/o/openssl/libssl3t64_3.5.1-1%2bdeb13u1_amd64.deb".into(),
                    file: "libssl3t64_3.5.1-1+deb13u1_amd64.deb".into(),
                    size: 2345678
                }
            ]
        );
    }

    /// An upgrade from plain-HTTP sources only: LIST_SCRIPT says nothing
    /// and KEEP_SCRIPT does nothing.
    #[test]
    fn nothing_is_said_or_kept_without_https_sources() {
        let d = tempfile::tempdir().unwrap();
        stand_in(
            d.path(),
            "apt-get",
            "echo \"'http://deb.debian.org/a_1_amd64.deb' a_1_amd64.deb 10 SHA256:00\"\n",
        );
        let run = d.path().join("run");
        let o = sh(LIST_SCRIPT, &run, d.path(), d.path());
        assert!(o.status.success() && o.stdout.is_empty(), "{o:?}");
        let o = sh(KEEP_SCRIPT, &run, d.path(), d.path());
        assert!(o.status.success() && o.stdout.is_empty(), "{o:?}");
    }

    /// KEEP_SCRIPT copies what the cache holds, within half the memory
    /// available and what the folder's filesystem (the worker's /run, a
    /// tmpfs of a fifth of its RAM) has free less 32 MiB, and leaves the
    /// rest.
    #[test]
    fn the_keep_script_copies_what_fits() {
        let d = tempfile::tempdir().unwrap();
        let (run, cache, bin) = (
            d.path().join("run"),
            d.path().join("archives"),
            d.path().join("bin"),
        );
        for p in [&run.join("debs"), &cache, &bin] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(cache.join("a_1_amd64.deb"), b"aaaa").unwrap();
        std::fs::write(cache.join("b_1_amd64.deb"), vec![b'b'; 9000]).unwrap();
        std::fs::write(cache.join("huge_1_amd64.deb"), b"h").unwrap();
        std::fs::write(
            run.join("uris"),
            "https://x/a_1_amd64.deb a_1_amd64.deb 4\n\
             https://x/gone_1_amd64.deb gone_1_amd64.deb 4\n\
             https://x/b_1_amd64.deb b_1_amd64.deb 9000\n\
             https://x/huge_1_amd64.deb huge_1_amd64.deb 99999999999999\n",
        )
        .unwrap();
        let out = sh(KEEP_SCRIPT, &run, &cache, &bin);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "kept 2 package file(s) fetched over HTTPS for the push (9004 bytes); 1 left out for want of memory\n"
        );
        assert_eq!(
            std::fs::read(run.join("debs/a_1_amd64.deb")).unwrap(),
            b"aaaa"
        );
        assert!(!run.join("debs/huge_1_amd64.deb").exists());

        // A /run with 32 MiB and 8 KiB free: the 9000 bytes do not fit.
        std::fs::remove_dir_all(run.join("debs")).unwrap();
        std::fs::create_dir_all(run.join("debs")).unwrap();
        stand_in(
            &bin,
            "df",
            "echo 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n\
             echo 'tmpfs 819200 786424 32776 97% /run'\n",
        );
        let out = sh(KEEP_SCRIPT, &run, &cache, &bin);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "kept 1 package file(s) fetched over HTTPS for the push (4 bytes); 2 left out for want of memory\n"
        );
        assert!(!run.join("debs/b_1_amd64.deb").exists());
    }
}
