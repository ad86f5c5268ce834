//! The shell scripts that put the seal on the worker VM and take it off
//! again (the module's doc says why each is there).

use super::{Init, OPENRC_STASH, Seal, words};

impl Seal {
    /// Run in the worker VM right after the sealed first boot: every
    /// held-back unit masked in /run (so no maintainer script starts one),
    /// any that runs after all stopped, and a policy-rc.d that says "do not
    /// run" on Debian-family systems that have none. Prints "running UNIT"
    /// for a held-back unit that had started, "policy-rc.d installed" or
    /// "policy-rc.d kept".
    pub fn runtime_script(&self) -> String {
        if self.init == Init::Openrc {
            return format!(
                r#"set -e
export LC_ALL=C PATH="$PATH:/usr/sbin:/sbin"
# The boot's runlevels first (SSH answers before the default runlevel ends).
n=0
while [ $n -lt 300 ]; do
  busy=0
  for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = openrc ] && busy=1 && break; done
  [ $busy = 0 ] && break
  n=$((n + 1)); sleep 1
done
[ $busy = 0 ] || echo "openrc still busy after 300 s" >&2
for u in {units}; do
  if [ -e "/run/openrc/started/$u" ] || [ -e "/run/openrc/starting/$u" ]; then echo "running $u"; rc-service "$u" stop >/dev/null 2>&1 || true; fi
done
{policy}"#,
                units = words(&self.held_back),
                policy = POLICY_RC_D
            );
        }
        format!(
            r#"set -e
export LC_ALL=C
D=/run/systemd/system.control
mkdir -p "$D"
for u in {units}; do
  ln -sfn /dev/null "$D/$u"
done
systemctl daemon-reload
for u in {units}; do
  if systemctl -q is-active "$u" 2>/dev/null; then echo "running $u"; systemctl stop "$u" || true; fi
done
{policy}"#,
            units = words(&self.held_back),
            policy = POLICY_RC_D
        )
    }

    /// Run at the end of the upgrade, before the power-off: policy-rc.d
    /// removed (when drydock installed it), then the seal of the verify
    /// reboot written to /etc/systemd/system.control. `held` is the
    /// held-back set as the upgraded disk has it. Prints "made DIR" when
    /// the folder did not exist.
    pub fn disk_seal_script(&self, held: &[String], installed_policy: bool) -> String {
        let policy = if installed_policy {
            "rm -f /usr/sbin/policy-rc.d"
        } else {
            ""
        };
        if self.init == Init::Openrc {
            // Every runlevel's link of a held-back service, moved aside.
            return format!(
                r#"set -e
export LC_ALL=C
{policy}
D={OPENRC_STASH}
if [ -e "$D" ] || [ -L "$D" ]; then echo "$D exists already: drydock will not write over it" >&2; exit 3; fi
mkdir "$D"; echo "made $D"
for u in {held}; do
  for l in /etc/runlevels/*/; do
    [ -e "$l$u" ] || [ -L "$l$u" ] || continue
    lv=${{l%/}}; lv=${{lv##*/}}
    mkdir -p "$D/$lv"; mv "$l$u" "$D/$lv/$u"
  done
done
sync
"#,
                held = words(held),
            );
        }
        format!(
            r#"set -e
export LC_ALL=C
{policy}
D=/etc/systemd/system.control
[ -d "$D" ] || {{ mkdir "$D"; echo "made $D"; }}
for u in default.target sysinit.target.wants {held}; do
  if [ -e "$D/$u" ] || [ -L "$D/$u" ]; then echo "$D/$u exists already: drydock will not write over it" >&2; exit 3; fi
done
t=$(systemctl show -p FragmentPath --value sysinit.target)
# Without the alias the verify boot would reach the VPS's default target.
[ -n "$t" ] || {{ echo "systemd did not say where sysinit.target is" >&2; exit 1; }}
ln -s "$t" "$D/default.target"
mkdir "$D/sysinit.target.wants"
for u in {wants}; do
  f=$(systemctl show -p FragmentPath --value "$u" 2>/dev/null || true)
  ln -s "${{f:-/dev/null}}" "$D/sysinit.target.wants/$u"
done
for u in {held}; do ln -s /dev/null "$D/$u"; done
sync
"#,
            held = words(held),
            wants = words(&self.wants),
        )
    }

    /// Run before the last power-off: the verify reboot's seal removed
    /// from the disk, and checked gone. `made_dir`: drydock made the folder.
    pub fn disk_unseal_script(&self, held: &[String], made_dir: bool) -> String {
        if self.init == Init::Openrc {
            return format!(
                r#"set -e
D={OPENRC_STASH}
for l in "$D"/*/; do
  [ -d "$l" ] || continue
  lv=${{l%/}}; lv=${{lv##*/}}
  for u in "$l"*; do
    [ -e "$u" ] || [ -L "$u" ] || continue
    t=/etc/runlevels/$lv/${{u##*/}}
    if [ -e "$t" ] || [ -L "$t" ]; then echo "$t is there again: the upgraded disk put it back itself; drydock keeps it" >&2; rm -f "$u"; else mv "$u" "$t"; fi
  done
  rmdir "$l"
done
rmdir "$D"
if [ -e "$D" ] || [ -L "$D" ]; then echo "$D is still there" >&2; exit 1; fi
if [ -e /usr/sbin/policy-rc.d ] && grep -qs '^# drydock:' /usr/sbin/policy-rc.d; then echo "drydock's policy-rc.d is still there" >&2; exit 1; fi
sync
"#
            );
        }
        format!(
            r#"set -e
D=/etc/systemd/system.control
rm -f "$D/default.target"
for u in {wants}; do rm -f "$D/sysinit.target.wants/$u"; done
rmdir "$D/sysinit.target.wants"
for u in {held}; do rm -f "$D/$u"; done
{rmdir}
for u in default.target sysinit.target.wants {held}; do
  if [ -e "$D/$u" ] || [ -L "$D/$u" ]; then echo "$D/$u is still there" >&2; exit 1; fi
done
if [ -e /usr/sbin/policy-rc.d ] && grep -qs '^# drydock:' /usr/sbin/policy-rc.d; then echo "drydock's policy-rc.d is still there" >&2; exit 1; fi
sync
"#,
            wants = words(&self.wants),
            held = words(held),
            rmdir = if made_dir { "rmdir \"$D\"" } else { "" },
        )
    }
}

/// On Debian-family systems (systemd or OpenRC), a policy-rc.d that says
/// "do not run" unless the VPS has one of its own.
const POLICY_RC_D: &str = r#"if [ -x /usr/sbin/invoke-rc.d ] || [ -x /usr/bin/deb-systemd-invoke ]; then
  if [ -e /usr/sbin/policy-rc.d ]; then echo "policy-rc.d kept"; else
    printf '%s\n' '#!/bin/sh' '# drydock: no service starts in the worker VM; removed before the power-off' 'exit 101' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    echo "policy-rc.d installed"
  fi
fi
"#;
