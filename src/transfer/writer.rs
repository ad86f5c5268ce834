//! The writer on the VPS runs from RAM (docs/safety.md, rule 4): a tmpfs of its own
//! holding copies of sh, dd, head, sha256sum and sync with their shared
//! libraries, run through the copied dynamic loader, so that no write
//! depends on reading a file of the disk being overwritten.

use anyhow::{Context, Result, bail};

use crate::ssh::{Session, shell_quote};

const TOOLS: &[&str] = &["sh", "dd", "head", "sha256sum", "sync"];

/// A folder on the host's RAM: a tmpfs of its own mounted on a fresh
/// folder under /run (or /dev/shm), so that what runs from it reads
/// nothing of the disk and may execute (/run itself is often noexec).
///
/// A cut connection must not leave it behind: SIGPIPE is ignored, so a
/// write to the gone channel fails instead of killing the shell, and that
/// failure, a hangup or a kill (TERM) removes what was made (`gone`).
const TMPFS_SCRIPT: &str = r#"export LC_ALL=C
trap '' PIPE
m=
T=$(mktemp -d /run/drydock-NAME.XXXXXX 2>/dev/null || mktemp -d /dev/shm/drydock-NAME.XXXXXX) || { echo "cannot make a folder on a tmpfs (/run or /dev/shm)" >&2; exit 1; }
gone() { [ -n "$m" ] && umount "$T" 2>/dev/null; rm -rf "$T"; exit 1; }
trap gone HUP TERM INT
if mount -t tmpfs -o size=SIZE,mode=0700 drydock-NAME "$T" 2>/dev/null; then m=1; echo mounted || gone; fi
echo "dir $T" || gone
"#;

/// The script that makes the folder: sets `T` to it and `m` to 1 when a
/// tmpfs was mounted on it; prints "mounted" and "dir T"; `gone` removes
/// it and exits 1.
pub fn tmpfs_script(name: &str, size: &str) -> String {
    TMPFS_SCRIPT.replace("NAME", name).replace("SIZE", size)
}

#[derive(Debug, Clone)]
pub struct Tmpfs {
    pub dir: String,
    /// A tmpfs was mounted for it (else it is a folder on /run or /dev/shm).
    pub mounted: bool,
}

impl Tmpfs {
    pub async fn make(session: &Session, name: &str, size: &str) -> Result<Tmpfs> {
        let script = tmpfs_script(name, size);
        let out = session
            .run(&format!("making a tmpfs for the {name}"), &script)
            .await?;
        Tmpfs::parse(&out, session)
    }

    pub fn parse(out: &str, session: &Session) -> Result<Tmpfs> {
        let mounted = out.lines().any(|l| l == "mounted");
        let dir = out
            .lines()
            .find_map(|l| l.strip_prefix("dir "))
            .map(str::to_string);
        match dir {
            Some(dir) => Ok(Tmpfs { dir, mounted }),
            None => bail!("making a tmpfs on {} gave no folder", session.host()),
        }
    }

    pub async fn remove(&self, session: &Session) -> Result<()> {
        let d = shell_quote(&self.dir);
        // Gone already (the helper removes its own): nothing to do. What
        // ran from it may take a moment to exit after its channel closed:
        // retry the unmount for up to ten seconds.
        let cmd = if self.mounted {
            format!(
                "[ -e {d} ] || exit 0; i=0; until umount {d} 2>/dev/null; do i=$((i+1)); [ $i -ge 20 ] && {{ umount {d}; exit 1; }}; sleep 0.5; done; rmdir {d}"
            )
        } else {
            format!("rm -rf {d}")
        };
        session
            .run("removing drydock's tmpfs", &cmd)
            .await
            .with_context(|| format!("{} may be left on the host", self.dir))?;
        tracing::debug!("removed {} on {}", self.dir, session.host());
        Ok(())
    }
}

const STAGE_SCRIPT: &str = r#"for b in TOOLS; do
  p=$(command -v "$b") || { echo "the host has no $b" >&2; exit 1; }
  p=$(readlink -f "$p")
  cp "$p" "$T/$b" || exit 1
  ldd "$p" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p' > "$T/.libs"
  while read -r l; do cp -L "$l" "$T/" || exit 1; done < "$T/.libs"
  ld=$(ldd "$p" 2>/dev/null | sed -n 's/^[[:space:]]*\(\/[^ ]*ld[^ ]*\) (.*/\1/p' | head -n 1)
  if [ -n "$ld" ] && [ ! -e "$T/ld.so" ]; then cp -L "$ld" "$T/ld.so" || exit 1; fi
done
rm -f "$T/.libs"
if [ -e "$T/ld.so" ]; then
  "$T/ld.so" --library-path "$T" "$T/dd" if=/dev/null of=/dev/null 2>&1 || { echo "the copied dd does not run from $T" >&2; exit 1; }
  echo loader
else
  "$T/dd" if=/dev/null of=/dev/null 2>&1 || { echo "the copied dd does not run from $T" >&2; exit 1; }
fi
"#;

/// Tools copied to a tmpfs on the host; removed by [`Staged::remove`].
#[derive(Debug, Clone)]
pub struct Staged {
    pub tmpfs: Tmpfs,
    loader: bool,
}

impl Staged {
    /// Copy the tools into a fresh tmpfs on the host.
    pub async fn stage(session: &Session) -> Result<Staged> {
        let tmpfs = Tmpfs::make(session, "writer", "64m").await?;
        let script = format!(
            "export LC_ALL=C; T={}\n{}",
            shell_quote(&tmpfs.dir),
            STAGE_SCRIPT.replace("TOOLS", &TOOLS.join(" "))
        );
        let out = match session
            .run("copying the writer's tools to a tmpfs", &script)
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let _ = tmpfs.remove(session).await;
                return Err(e);
            }
        };
        Ok(Staged {
            tmpfs,
            loader: out.lines().any(|l| l == "loader"),
        })
    }

    /// How to run tool `name` from the tmpfs, as a shell command prefix.
    pub fn tool(&self, name: &str) -> String {
        let d = shell_quote(&self.tmpfs.dir);
        if self.loader {
            format!("{d}/ld.so --library-path {d} {d}/{name}")
        } else {
            format!("{d}/{name}")
        }
    }

    /// Run a script file in the tmpfs with the copied shell, replacing the
    /// login shell (`exec`), so nothing of the disk stays in use.
    pub fn exec_script(&self, script_path: &str) -> String {
        format!("exec {} {}", self.tool("sh"), shell_quote(script_path))
    }

    pub async fn remove(&self, session: &Session) -> Result<()> {
        self.tmpfs.remove(session).await
    }
}
