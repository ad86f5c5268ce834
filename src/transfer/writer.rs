//! The writer on the VPS runs from RAM (safety rule 4): a tmpfs of its own
//! holding copies of sh, dd, head, sha256sum and sync with their shared
//! libraries, run through the copied dynamic loader, so that no write
//! depends on reading a file of the disk being overwritten.

use anyhow::{Context, Result, bail};

use crate::ssh::{Session, shell_quote};

const TOOLS: &[&str] = &["sh", "dd", "head", "sha256sum", "sync"];

const STAGE_SCRIPT: &str = r#"export LC_ALL=C
T=$(mktemp -d /run/drydock-writer.XXXXXX 2>/dev/null || mktemp -d /dev/shm/drydock-writer.XXXXXX) || { echo "cannot make a folder on a tmpfs (/run or /dev/shm)" >&2; exit 1; }
if mount -t tmpfs -o size=64m,mode=0700 drydock-writer "$T" 2>/dev/null; then echo mounted; fi
for b in TOOLS; do
  p=$(command -v "$b") || { echo "the host has no $b" >&2; exit 1; }
  p=$(readlink -f "$p")
  cp "$p" "$T/$b" || exit 1
  ldd "$p" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p' > "$T/.libs"
  while read -r l; do cp -L "$l" "$T/" || exit 1; done < "$T/.libs"
  ld=$(ldd "$p" 2>/dev/null | sed -n 's/^[[:space:]]*\(\/[^ ]*ld[^ ]*\) (.*/\1/p' | head -n 1)
  if [ -n "$ld" ] && [ ! -e "$T/ld.so" ]; then cp -L "$ld" "$T/ld.so" || exit 1; fi
done
rm -f "$T/.libs"
echo "dir $T"
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
    pub dir: String,
    pub mounted: bool,
    loader: bool,
}

impl Staged {
    /// Copy the tools into a fresh tmpfs on the host.
    pub async fn stage(session: &Session) -> Result<Staged> {
        let script = STAGE_SCRIPT.replace("TOOLS", &TOOLS.join(" "));
        let out = session
            .run("copying the writer's tools to a tmpfs", &script)
            .await?;
        let mut st = Staged {
            dir: String::new(),
            mounted: false,
            loader: false,
        };
        for l in out.lines() {
            match l {
                "mounted" => st.mounted = true,
                "loader" => st.loader = true,
                _ => {
                    if let Some(d) = l.strip_prefix("dir ") {
                        st.dir = d.to_string();
                    }
                }
            }
        }
        if st.dir.is_empty() {
            bail!("staging the writer on {} gave no folder", session.host());
        }
        Ok(st)
    }

    /// How to run tool `name` from the tmpfs, as a shell command prefix.
    pub fn tool(&self, name: &str) -> String {
        let d = shell_quote(&self.dir);
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
        let d = shell_quote(&self.dir);
        let cmd = if self.mounted {
            format!("umount {d} && rmdir {d}")
        } else {
            format!("rm -rf {d}")
        };
        session
            .run("removing the writer's tmpfs", &cmd)
            .await
            .context("the writer's tools may be left on the host's tmpfs")?;
        Ok(())
    }
}
