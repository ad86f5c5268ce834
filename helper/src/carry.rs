//! Carrying a rehearsal over to the frozen disk: in the worker VM, with
//! three copies of one filesystem mounted (LIVE, the copy the rehearsal
//! upgraded; FROZEN, the VPS's disk as frozen; TARGET, the rehearsal's
//! result), make TARGET hold what the VPS changed between the live copy
//! and the freeze, so that the rehearsal need not run again while the VPS
//! is down.
//!
//! The package manager's caches and locks that the VPS refreshed on its
//! own (`UPGRADE_WINS`: apt-daily's package lists, man-db's index) keep
//! the upgraded system's version. It is refused, and the upgrade runs
//! again on the frozen copy, when the VPS changed anything else the
//! upgrade's package manager owns (`DENIED`: the
//! result would be an upgrade of a system that no longer exists), when
//! the upgrade changed the same entry (outside `VPS_WINS`, state that is
//! the VPS's own: its logs, its random seed, timer stamps), or when a
//! changed file is hard-linked (copying it would split its links).
//!
//! What counts as changed: an entry present on one side only, or with
//! another type, mode, owner, symlink target or device number; a file
//! with another size or modification time; and, when its inode changed
//! after the live copy began (ctime at or after `since`, by the VPS's
//! clock), a file's content or any entry's extended attributes. A write
//! always moves ctime, whatever it does to mtime, so a file whose ctime is
//! older than the live copy is the same on both sides.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What the VPS may not have changed since the live copy: the package
/// manager's files, and what it installs, configures or reads.
pub const DENIED: &[&str] = &[
    "/etc",
    "/usr",
    "/boot",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt",
    "/nix",
    "/var/lib/dpkg",
    "/var/lib/apt",
    "/var/cache/apt",
    "/var/cache/debconf",
    "/var/lib/ucf",
    "/var/lib/systemd/deb-systemd-helper-enabled",
    "/var/lib/systemd/deb-systemd-user-helper-enabled",
    "/var/lib/dkms",
    "/var/lib/initramfs-tools",
    "/var/lib/rpm",
    "/var/lib/pacman",
    "/lib/apk",
    "/var/cache/apk",
];

/// What the VPS may have changed and the upgrade's version is kept
/// (checked before `DENIED`): the package manager's caches and locks,
/// which it rebuilds from the upgraded system's own state (apt's package
/// lists and their binary caches, apt-daily's stamps, man-db's index).
/// Debian's apt-daily.timer refreshes them on a running VPS twice a day.
pub const UPGRADE_WINS: &[&str] = &[
    "/var/lib/apt/lists",
    "/var/lib/apt/daily_lock",
    "/var/lib/apt/periodic",
    "/var/cache/apt/pkgcache.bin",
    "/var/cache/apt/srcpkgcache.bin",
    "/var/cache/apt/archives/lock",
    "/var/cache/apt/archives/partial",
    "/var/lib/dpkg/lock",
    "/var/lib/dpkg/lock-frontend",
    "/var/lib/dpkg/triggers/Lock",
    "/var/cache/man",
];

/// What both may have changed, the VPS's version kept: its own logs and
/// state that any boot writes.
pub const VPS_WINS: &[&str] = &[
    "/var/log",
    "/var/lib/systemd/random-seed",
    "/var/lib/systemd/timers",
    "/var/lib/systemd/timesync",
    "/var/lib/systemd/coredump",
    "/var/lib/logrotate",
    "/var/tmp",
    "/tmp",
];

fn under(path: &Path, list: &[&str]) -> bool {
    list.iter().any(|p| path.starts_with(p))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    /// A device node or a FIFO.
    Node,
    /// A socket: made by whatever listens on it, never carried.
    Socket,
}

#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: i64,
    nlink: u64,
    rdev: u64,
}

fn entry(p: &Path) -> io::Result<Option<Entry>> {
    let m = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let t = m.file_type();
    let kind = if t.is_file() {
        Kind::File
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else if t.is_socket() {
        Kind::Socket
    } else {
        Kind::Node
    };
    Ok(Some(Entry {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: m.ctime(),
        nlink: m.nlink(),
        rdev: m.rdev(),
    }))
}

fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// An entry's extended attributes, sorted (none where they are not
/// supported).
fn xattrs(p: &Path) -> io::Result<Vec<(OsString, Vec<u8>)>> {
    use std::os::unix::ffi::OsStrExt;
    let mut names = vec![0u8; 64 * 1024];
    let n = match rustix::fs::llistxattr(p, &mut names[..]) {
        Ok(n) => n,
        Err(e) if e == rustix::io::Errno::NOTSUP => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let mut v = vec![0u8; 64 * 1024];
        let k = rustix::fs::lgetxattr(p, name, &mut v[..])?;
        v.truncate(k);
        out.push((std::ffi::OsStr::from_bytes(name).to_os_string(), v));
    }
    out.sort();
    Ok(out)
}

/// Whether entry A at PA and entry B at PB differ (see the module's
/// words); CONTENT: compare content and attributes whatever the ctimes.
fn differs(
    a: Option<&Entry>,
    pa: &Path,
    b: Option<&Entry>,
    pb: &Path,
    since: i64,
    content: bool,
) -> io::Result<bool> {
    let (a, b) = match (a, b) {
        (None, None) => return Ok(false),
        (Some(a), Some(b)) => (a, b),
        _ => return Ok(true),
    };
    if a.kind != b.kind || a.mode != b.mode || a.uid != b.uid || a.gid != b.gid {
        return Ok(true);
    }
    let deep = content || a.ctime >= since || b.ctime >= since;
    let shallow = match a.kind {
        Kind::File => a.size != b.size || a.mtime != b.mtime,
        Kind::Symlink => fs::read_link(pa)? != fs::read_link(pb)?,
        Kind::Node => a.rdev != b.rdev,
        Kind::Dir | Kind::Socket => false,
    };
    if shallow {
        return Ok(true);
    }
    if !deep || a.kind == Kind::Socket {
        return Ok(false);
    }
    if a.kind == Kind::File && !same_content(pa, pb)? {
        return Ok(true);
    }
    Ok(xattrs(pa)? != xattrs(pb)?)
}

/// What is done to TARGET for one path (relative to the filesystem's top).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Made as it is on FROZEN (a directory: made, or its mode, owner and
    /// attributes set; its content follows entry by entry).
    Copy(PathBuf),
    /// Gone on FROZEN: removed, with all it holds.
    Remove(PathBuf),
}

#[derive(Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Paths where the upgrade had changed the entry too and the VPS's
    /// version is kept (under `VPS_WINS`).
    pub vps_wins: Vec<PathBuf>,
    /// Paths the VPS changed that keep the upgrade's version (under
    /// `UPGRADE_WINS`).
    pub upgrade_wins: Vec<PathBuf>,
    /// Why it cannot be carried over, one line a path.
    pub refused: Vec<String>,
    /// Entries compared on LIVE and FROZEN.
    pub compared: u64,
    /// Folders the plan makes on TARGET (their entries' parents).
    made: BTreeSet<PathBuf>,
}

pub struct Options {
    /// The VPS's clock when the live copy began, less a margin.
    pub since: i64,
    /// Where this filesystem is mounted on the VPS ("/", "/var", ...).
    pub prefix: PathBuf,
}

fn names(dir: &Path) -> io::Result<BTreeSet<OsString>> {
    match fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.map(|e| e.file_name())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(20) => {
            Ok(BTreeSet::new())
        }
        Err(e) => Err(e),
    }
}

struct Trees<'a> {
    live: &'a Path,
    frozen: &'a Path,
    target: &'a Path,
    o: &'a Options,
}

/// What carrying FROZEN's changes since LIVE into TARGET would do.
pub fn plan(live: &Path, frozen: &Path, target: &Path, o: &Options) -> io::Result<Plan> {
    let t = Trees {
        live,
        frozen,
        target,
        o,
    };
    let mut p = Plan::default();
    walk(&t, Path::new(""), &mut p)?;
    Ok(p)
}

fn walk(t: &Trees, rel: &Path, p: &mut Plan) -> io::Result<()> {
    let mut all = names(&t.live.join(rel))?;
    all.extend(names(&t.frozen.join(rel))?);
    for name in all {
        let r = rel.join(&name);
        let (pl, pf) = (t.live.join(&r), t.frozen.join(&r));
        let (l, f) = (entry(&pl)?, entry(&pf)?);
        p.compared += 1;
        if [&l, &f]
            .iter()
            .all(|e| e.as_ref().is_none_or(|e| e.kind == Kind::Socket))
        {
            continue;
        }
        if !differs(l.as_ref(), &pl, f.as_ref(), &pf, t.o.since, false)? {
            if l.as_ref().is_some_and(|e| e.kind == Kind::Dir) {
                walk(t, &r, p)?;
            }
            continue;
        }
        classify(t, &r, l.as_ref(), f.as_ref(), p)?;
        if f.as_ref().is_some_and(|e| e.kind == Kind::Dir) {
            walk(t, &r, p)?;
        }
    }
    Ok(())
}

/// One path the VPS changed since the live copy: carried, kept as the
/// VPS's, or a reason to refuse.
fn classify(
    t: &Trees,
    rel: &Path,
    l: Option<&Entry>,
    f: Option<&Entry>,
    p: &mut Plan,
) -> io::Result<()> {
    let shown = t.o.prefix.join(rel);
    if under(&shown, UPGRADE_WINS) {
        p.upgrade_wins.push(rel.to_path_buf());
        return Ok(());
    }
    if under(&shown, DENIED) {
        p.refused.push(format!(
            "{}: changed on the VPS since the live copy, and the upgrade's package manager owns it",
            shown.display()
        ));
        return Ok(());
    }
    if let Some(f) = f
        && f.kind == Kind::File
        && f.nlink > 1
    {
        p.refused.push(format!(
            "{}: changed on the VPS since the live copy and hard-linked ({} links): a copy would split them",
            shown.display(),
            f.nlink
        ));
        return Ok(());
    }
    let pt = t.target.join(rel);
    let r = entry(&pt)?;
    let mut both = differs(l, &t.live.join(rel), r.as_ref(), &pt, t.o.since, true)?;
    if !both
        && r.as_ref().is_some_and(|r| r.kind == Kind::Dir)
        && f.is_none_or(|f| f.kind != Kind::Dir)
    {
        // A directory to be removed or replaced: the upgrade must not have
        // put anything in it.
        both = subtree_differs(t, rel)?;
    }
    // Every folder on the way must be a folder on TARGET too (made by the
    // plan, or there): a symlink the upgrade put in its place would lead
    // the copy out of this filesystem.
    for a in rel.ancestors().skip(1) {
        if a.as_os_str().is_empty() || p.made.contains(a) {
            continue;
        }
        if !entry(&t.target.join(a))?.is_some_and(|e| e.kind == Kind::Dir) {
            both = true;
        }
    }
    if both {
        if under(&shown, VPS_WINS) {
            p.vps_wins.push(rel.to_path_buf());
        } else {
            p.refused.push(format!(
                "{}: changed on the VPS since the live copy, and by the upgrade",
                shown.display()
            ));
            return Ok(());
        }
    }
    if f.is_some_and(|f| f.kind == Kind::Dir) {
        p.made.insert(rel.to_path_buf());
    }
    p.actions.push(match f {
        Some(_) => Action::Copy(rel.to_path_buf()),
        None => Action::Remove(rel.to_path_buf()),
    });
    Ok(())
}

/// Whether TARGET's tree at REL differs from LIVE's anywhere.
fn subtree_differs(t: &Trees, rel: &Path) -> io::Result<bool> {
    let mut all = names(&t.live.join(rel))?;
    all.extend(names(&t.target.join(rel))?);
    for name in all {
        let r = rel.join(&name);
        let (pl, pt) = (t.live.join(&r), t.target.join(&r));
        let (l, e) = (entry(&pl)?, entry(&pt)?);
        if differs(l.as_ref(), &pl, e.as_ref(), &pt, t.o.since, false)? {
            return Ok(true);
        }
        if l.as_ref().is_some_and(|e| e.kind == Kind::Dir) && subtree_differs(t, &r)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn set_xattrs(from: &Path, to: &Path) -> io::Result<()> {
    let want = xattrs(from)?;
    for (name, _) in xattrs(to)? {
        if !want.iter().any(|(n, _)| *n == name) {
            rustix::fs::lremovexattr(to, name.as_os_str())?;
        }
    }
    for (name, v) in want {
        rustix::fs::lsetxattr(to, name.as_os_str(), &v, rustix::fs::XattrFlags::empty())?;
    }
    Ok(())
}

/// Owner, mode, attributes and (not for symlinks) times as on FROM.
fn set_meta(from: &Path, to: &Path, e: &Entry) -> io::Result<()> {
    std::os::unix::fs::lchown(to, Some(e.uid), Some(e.gid))?;
    if e.kind != Kind::Symlink {
        // After the owner: chown clears set-user-ID and set-group-ID.
        fs::set_permissions(to, fs::Permissions::from_mode(e.mode))?;
    }
    set_xattrs(from, to)?;
    set_times(from, to)
}

fn set_times(from: &Path, to: &Path) -> io::Result<()> {
    let st = rustix::fs::lstat(from)?;
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        to,
        &ts,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Carry the plan out: TARGET made as FROZEN at every path the plan
/// names; each parent's times set back to FROZEN's after.
pub fn apply(frozen: &Path, target: &Path, plan: &Plan) -> io::Result<()> {
    let mut parents = BTreeSet::new();
    for a in &plan.actions {
        let rel = match a {
            Action::Copy(r) | Action::Remove(r) => r,
        };
        if let Some(parent) = rel.parent() {
            parents.insert(parent.to_path_buf());
        }
        let to = target.join(rel);
        match a {
            Action::Remove(_) => remove_any(&to)?,
            Action::Copy(_) => copy_one(&frozen.join(rel), &to)?,
        }
    }
    // Deepest first, so that setting a child's times does not move its
    // parent's again.
    for rel in parents.iter().rev() {
        let (from, to) = (frozen.join(rel), target.join(rel));
        if from.is_dir() && to.is_dir() {
            set_times(&from, &to)?;
        }
    }
    Ok(())
}

fn copy_one(from: &Path, to: &Path) -> io::Result<()> {
    let Some(e) = entry(from)? else {
        return remove_any(to);
    };
    if e.kind == Kind::Dir {
        if !to.is_dir() || fs::symlink_metadata(to)?.file_type().is_symlink() {
            remove_any(to)?;
            fs::create_dir(to)?;
        }
        return set_meta(from, to, &e);
    }
    let name = to
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{}: no file name", to.display())))?;
    let mut tmp_name = OsString::from(".drydock-carry.");
    tmp_name.push(name);
    let tmp = to.with_file_name(tmp_name);
    remove_any(&tmp)?;
    match e.kind {
        Kind::File => {
            fs::copy(from, &tmp)?;
        }
        Kind::Symlink => std::os::unix::fs::symlink(fs::read_link(from)?, &tmp)?,
        Kind::Node => {
            let t = fs::symlink_metadata(from)?.file_type();
            let ft = if t.is_fifo() {
                rustix::fs::FileType::Fifo
            } else if t.is_char_device() {
                rustix::fs::FileType::CharacterDevice
            } else {
                rustix::fs::FileType::BlockDevice
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &tmp,
                ft,
                rustix::fs::Mode::from_raw_mode(e.mode),
                e.rdev,
            )?;
        }
        Kind::Dir | Kind::Socket => return Ok(()),
    }
    set_meta(from, &tmp, &e)?;
    if to.is_dir() && !fs::symlink_metadata(to)?.file_type().is_symlink() {
        fs::remove_dir_all(to)?;
    }
    fs::rename(&tmp, to)
}

#[cfg(test)]
mod tests;
