use super::*;
use std::process::Command;

/// LIVE as given, FROZEN and TARGET copies of it (cp -a: times, modes and
/// owners kept), in one temporary folder.
struct Copies {
    _dir: tempfile::TempDir,
    live: PathBuf,
    frozen: PathBuf,
    target: PathBuf,
}

fn copies(files: &[(&str, &str)]) -> Copies {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    for (p, text) in files {
        let p = live.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
    }
    fs::create_dir_all(&live).unwrap();
    let frozen = dir.path().join("frozen");
    let target = dir.path().join("target");
    for to in [&frozen, &target] {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(&live)
            .arg(to)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    Copies {
        _dir: dir,
        live,
        frozen,
        target,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn opts(since: i64) -> Options {
    Options {
        since,
        prefix: PathBuf::from("/"),
    }
}

fn carried(c: &Copies, since: i64) -> Plan {
    let p = plan(&c.live, &c.frozen, &c.target, &opts(since)).unwrap();
    if p.refused.is_empty() {
        apply(&c.frozen, &c.target, &p).unwrap();
    }
    p
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

#[test]
fn the_vpss_data_is_carried_into_the_upgraded_tree_and_the_upgrades_files_stay() {
    let c = copies(&[
        ("srv/app/data", "old data"),
        ("srv/app/gone", "removed on the VPS"),
        ("srv/cache/x/y", "a tree removed on the VPS"),
        ("usr/bin/tool", "release 12"),
        ("var/log/syslog", "boot 1\n"),
    ]);
    let since = now() - 60;
    // The VPS, between the live copy and the freeze.
    fs::write(c.frozen.join("srv/app/data"), "new data, longer").unwrap();
    fs::remove_file(c.frozen.join("srv/app/gone")).unwrap();
    fs::remove_dir_all(c.frozen.join("srv/cache")).unwrap();
    fs::create_dir_all(c.frozen.join("srv/app/uploads/2026")).unwrap();
    fs::write(c.frozen.join("srv/app/uploads/2026/a.jpg"), "jpeg").unwrap();
    std::os::unix::fs::symlink("uploads/2026", c.frozen.join("srv/app/latest")).unwrap();
    fs::set_permissions(
        c.frozen.join("srv/app/uploads/2026/a.jpg"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::chown(c.frozen.join("srv/app/uploads"), Some(33), Some(33)).unwrap();
    fs::write(c.frozen.join("var/log/syslog"), "boot 1\nserving\n").unwrap();
    // The upgrade, in the rehearsal.
    fs::write(c.target.join("usr/bin/tool"), "release 13").unwrap();
    fs::write(c.target.join("var/log/syslog"), "boot 1\nworker VM\n").unwrap();

    let p = carried(&c, since);
    assert!(p.refused.is_empty(), "{:?}", p.refused);
    assert_eq!(read(&c.target.join("srv/app/data")), "new data, longer");
    assert!(!c.target.join("srv/app/gone").exists());
    assert!(!c.target.join("srv/cache").exists());
    assert_eq!(read(&c.target.join("srv/app/uploads/2026/a.jpg")), "jpeg");
    assert_eq!(read(&c.target.join("srv/app/latest/a.jpg")), "jpeg");
    let m = fs::metadata(c.target.join("srv/app/uploads/2026/a.jpg")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    let m = fs::metadata(c.target.join("srv/app/uploads")).unwrap();
    assert_eq!((m.uid(), m.gid()), (33, 33));
    assert_eq!(read(&c.target.join("usr/bin/tool")), "release 13");
    // Both wrote the log: the VPS's is kept.
    assert_eq!(read(&c.target.join("var/log/syslog")), "boot 1\nserving\n");
    assert_eq!(p.vps_wins, vec![PathBuf::from("var/log/syslog")]);
    // Times as on the VPS, the data file's and its folder's.
    let (f, t) = (
        fs::metadata(c.frozen.join("srv/app/data")).unwrap(),
        fs::metadata(c.target.join("srv/app/data")).unwrap(),
    );
    assert_eq!(f.modified().unwrap(), t.modified().unwrap());
    let (f, t) = (
        fs::metadata(c.frozen.join("srv/app")).unwrap(),
        fs::metadata(c.target.join("srv/app")).unwrap(),
    );
    assert_eq!(f.modified().unwrap(), t.modified().unwrap());
    // And FROZEN and TARGET now differ only in the upgrade's file.
    let again = plan(&c.frozen, &c.target, &c.target, &opts(since)).unwrap();
    assert!(again.actions.is_empty(), "{again:?}");
    assert_eq!(
        again.refused,
        vec![
            "/usr/bin/tool: changed on the VPS since the live copy, and the upgrade's package manager owns it"
        ]
    );
}

#[test]
fn a_change_to_what_the_package_manager_owns_is_refused_and_nothing_is_applied() {
    let c = copies(&[
        ("etc/app.conf", "a"),
        ("var/lib/dpkg/status", "s"),
        ("srv/d", "d"),
    ]);
    fs::write(c.frozen.join("etc/app.conf"), "b").unwrap();
    fs::write(c.frozen.join("var/lib/dpkg/status"), "s2").unwrap();
    fs::write(c.frozen.join("srv/d"), "d2").unwrap();
    let p = carried(&c, now() - 60);
    assert_eq!(
        p.refused,
        vec![
            "/etc/app.conf: changed on the VPS since the live copy, and the upgrade's package manager owns it",
            "/var/lib/dpkg/status: changed on the VPS since the live copy, and the upgrade's package manager owns it",
        ]
    );
    assert_eq!(read(&c.target.join("srv/d")), "d");
}

#[test]
fn the_package_managers_caches_refreshed_on_the_vps_keep_the_upgrades_version() {
    // apt-daily on the VPS between the live copy and the freeze.
    let c = copies(&[
        ("var/lib/apt/lists/deb_bookworm_InRelease", "12"),
        ("var/lib/apt/daily_lock", ""),
        ("var/cache/apt/pkgcache.bin", "cache 12"),
        ("var/lib/dpkg/status", "s"),
        ("srv/d", "d"),
    ]);
    fs::write(
        c.frozen.join("var/lib/apt/lists/deb_bookworm_InRelease"),
        "12, newer",
    )
    .unwrap();
    fs::write(
        c.frozen.join("var/cache/apt/pkgcache.bin"),
        "cache 12, newer",
    )
    .unwrap();
    fs::write(c.frozen.join("var/lib/apt/daily_lock"), "x").unwrap();
    fs::write(c.frozen.join("srv/d"), "d2").unwrap();
    // The upgrade's own lists and cache.
    fs::remove_file(c.target.join("var/lib/apt/lists/deb_bookworm_InRelease")).unwrap();
    fs::write(
        c.target.join("var/lib/apt/lists/deb_trixie_InRelease"),
        "13",
    )
    .unwrap();
    fs::write(c.target.join("var/cache/apt/pkgcache.bin"), "cache 13").unwrap();
    let p = carried(&c, now() - 60);
    assert!(p.refused.is_empty(), "{:?}", p.refused);
    assert_eq!(p.upgrade_wins.len(), 3, "{p:?}");
    assert_eq!(
        read(&c.target.join("var/cache/apt/pkgcache.bin")),
        "cache 13"
    );
    assert!(
        !c.target
            .join("var/lib/apt/lists/deb_bookworm_InRelease")
            .exists()
    );
    assert_eq!(read(&c.target.join("srv/d")), "d2");
    // dpkg's own state is another matter.
    fs::write(c.frozen.join("var/lib/dpkg/status"), "s2").unwrap();
    let p = plan(&c.live, &c.frozen, &c.target, &opts(now() - 60)).unwrap();
    let dpkg = "/var/lib/dpkg/status: changed on the VPS since the live copy, and the upgrade's package manager owns it";
    assert!(p.refused.iter().any(|r| r == dpkg), "{p:?}");
}

#[test]
fn an_entry_both_changed_is_refused_outside_the_vpss_own_state() {
    let c = copies(&[("srv/shared", "a"), ("srv/dir/keep", "k")]);
    fs::write(c.frozen.join("srv/shared"), "vps").unwrap();
    fs::write(c.target.join("srv/shared"), "upgrade").unwrap();
    // The VPS removed a folder that the upgrade put a file in.
    fs::remove_dir_all(c.frozen.join("srv/dir")).unwrap();
    fs::write(c.target.join("srv/dir/new"), "n").unwrap();
    let p = carried(&c, now() - 60);
    assert_eq!(
        p.refused,
        vec![
            "/srv/dir: changed on the VPS since the live copy, and by the upgrade",
            "/srv/shared: changed on the VPS since the live copy, and by the upgrade",
        ]
    );
    assert_eq!(read(&c.target.join("srv/shared")), "upgrade");
}

#[test]
fn a_folder_the_upgrade_made_a_symlink_is_not_written_through() {
    let c = copies(&[("srv/app/data/x", "1")]);
    let elsewhere = c.live.parent().unwrap().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::remove_dir_all(c.target.join("srv/app")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, c.target.join("srv/app")).unwrap();
    // What the symlink leads to looks like the live copy's folder.
    let ok = Command::new("cp")
        .arg("-a")
        .arg(c.live.join("srv/app/data"))
        .arg(&elsewhere)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    fs::write(c.frozen.join("srv/app/data/x"), "2").unwrap();
    let p = carried(&c, now() - 60);
    assert_eq!(
        p.refused,
        vec!["/srv/app/data/x: changed on the VPS since the live copy, and by the upgrade"]
    );
    assert_eq!(read(&elsewhere.join("data/x")), "1");
}

#[test]
fn a_rewrite_that_keeps_size_and_mtime_is_found_by_its_ctime() {
    let c = copies(&[("srv/torn", "aaaa")]);
    let mtime = fs::metadata(c.frozen.join("srv/torn"))
        .unwrap()
        .modified()
        .unwrap();
    fs::write(c.frozen.join("srv/torn"), "bbbb").unwrap();
    File::options()
        .write(true)
        .open(c.frozen.join("srv/torn"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    // Its inode changed after the live copy began: compared, carried.
    let p = plan(&c.live, &c.frozen, &c.target, &opts(now() - 60)).unwrap();
    assert_eq!(p.actions, vec![Action::Copy("srv/torn".into())]);
    // Had it changed before (ctime older than the live copy), the live
    // copy would have it too: not read.
    let p = plan(&c.live, &c.frozen, &c.target, &opts(now() + 60)).unwrap();
    assert!(p.actions.is_empty(), "{p:?}");
}

#[test]
fn a_hard_linked_file_that_changed_is_refused() {
    let c = copies(&[("srv/a", "1")]);
    fs::write(c.frozen.join("srv/a"), "2").unwrap();
    fs::hard_link(c.frozen.join("srv/a"), c.frozen.join("srv/b")).unwrap();
    let p = plan(&c.live, &c.frozen, &c.target, &opts(now() - 60)).unwrap();
    assert_eq!(
        p.refused,
        vec![
            "/srv/a: changed on the VPS since the live copy and hard-linked (2 links): a copy would split them",
            "/srv/b: changed on the VPS since the live copy and hard-linked (2 links): a copy would split them",
        ]
    );
}

#[test]
fn a_filesystem_mounted_elsewhere_is_judged_by_where_it_is_mounted() {
    // /var on a partition of its own: its top is /var on the VPS.
    let c = copies(&[("lib/dpkg/status", "s"), ("lib/app/db", "x")]);
    fs::write(c.frozen.join("lib/app/db"), "y").unwrap();
    let o = Options {
        since: now() - 60,
        prefix: PathBuf::from("/var"),
    };
    let p = plan(&c.live, &c.frozen, &c.target, &o).unwrap();
    assert!(p.refused.is_empty(), "{p:?}");
    fs::write(c.frozen.join("lib/dpkg/status"), "s2").unwrap();
    let p = plan(&c.live, &c.frozen, &c.target, &o).unwrap();
    assert_eq!(
        p.refused,
        vec![
            "/var/lib/dpkg/status: changed on the VPS since the live copy, and the upgrade's package manager owns it"
        ]
    );
}
