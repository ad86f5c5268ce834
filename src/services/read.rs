//! Reading units off a running system: the scripts (systemd's `systemctl
//! show`, and the same keys made up from OpenRC's state folders) and the
//! parsing of their answer. Everything parsed here comes from the host and
//! is bounded: unit names must be unit names, values are kept as data.

use std::collections::BTreeMap;

use super::Init;
use crate::ssh::shell_quote;

/// The properties read of every unit.
const PROPS: &str = "Id,Type,LoadState,ActiveState,SubState,Result,Transient,TriggeredBy,Triggers,\
                     ExecMainStartTimestampMonotonic,NRestarts,ConditionResult";

/// Units kept from one answer, at most (a host that lists more is cut).
const MAX_UNITS: usize = 4096;

/// A unit as a running system reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    /// The name asked for (or, for a listing, the unit's own).
    pub name: String,
    /// The unit's own name: another than `name` when that is an alias.
    pub id: String,
    /// loaded, not-found, masked, bad-setting, error.
    pub load: String,
    /// active, inactive, failed, activating, deactivating, reloading.
    pub active: String,
    pub sub: String,
    /// success, exit-code, signal, timeout, core-dump, start-limit-hit, ...
    pub result: String,
    pub type_: String,
    pub transient: bool,
    pub triggered_by: Vec<String>,
    /// What a socket, path or timer unit starts.
    pub triggers: Vec<String>,
    /// It ran in this boot (its main process was started).
    pub ran: bool,
    pub restarts: Option<u64>,
    /// "no": a Condition*= of the unit was not met, so it was skipped.
    pub condition: String,
}

/// Unit names: letters, digits and `:_.@-\` (systemd's own rule), at most
/// 255 bytes. Anything else from the host is dropped, never given to a
/// shell or shown as a name.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ":_.@-\\".contains(c))
}

/// The set as the probe reads it: every loaded service and socket.
pub fn set_script() -> String {
    format!(
        r#"export LC_ALL=C SYSTEMD_PAGER= PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"
if [ -d /run/systemd/system ]; then
  echo "@@ systemd"
  timeout 60 systemctl show --all -p {PROPS} '*.service' '*.socket'
elif [ -d /run/openrc ]; then
  echo "@@ openrc"
  for f in /run/openrc/started/*; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    u=${{f##*/}}
    printf 'Id=%s\nLoadState=loaded\nActiveState=active\nSubState=started\n\n' "$u"
  done
  for f in /run/openrc/failed/*; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    u=${{f##*/}}
    printf 'Id=%s\nLoadState=loaded\nActiveState=failed\nSubState=failed\n\n' "$u"
  done
fi
echo "@@ end"
"#
    )
}

/// NAMES as they are now, one `@@ unit NAME` section each.
pub fn units_script(init: Init, names: &[String]) -> String {
    let words: Vec<String> = names
        .iter()
        .filter(|n| valid_name(n))
        .map(|n| shell_quote(n))
        .collect();
    let each = match init {
        Init::Systemd => format!("systemctl show -p {PROPS} -- \"$u\" 2>&1"),
        // The same keys, from OpenRC's state folders; `status` tells a
        // started service whose daemon died ("crashed").
        Init::Openrc => r#"printf 'Id=%s\n' "$u"
    if [ ! -e "/etc/init.d/$u" ]; then printf 'LoadState=not-found\nActiveState=inactive\nSubState=dead\n'
    elif [ -e "/run/openrc/failed/$u" ]; then printf 'LoadState=loaded\nActiveState=failed\nSubState=failed\nResult=failed\n'
    elif [ -e "/run/openrc/started/$u" ]; then
      if rc-service "$u" status 2>/dev/null | grep -q crashed; then printf 'LoadState=loaded\nActiveState=failed\nSubState=crashed\nResult=crashed\n'
      else printf 'LoadState=loaded\nActiveState=active\nSubState=started\n'; fi
    elif [ -e "/run/openrc/starting/$u" ]; then printf 'LoadState=loaded\nActiveState=activating\nSubState=starting\n'
    else printf 'LoadState=loaded\nActiveState=inactive\nSubState=stopped\nResult=success\n'; fi"#
            .to_string(),
    };
    format!(
        "export LC_ALL=C SYSTEMD_PAGER= PATH=\"$PATH:/usr/sbin:/sbin:/usr/bin:/bin\"\nfor u in {}; do\n  echo \"@@ unit $u\"\n  {each}\ndone\necho \"@@ end\"\n",
        if words.is_empty() {
            "''".to_string()
        } else {
            words.join(" ")
        }
    )
}

/// The unit names a system knows (unit files and loaded units), for "a
/// unit of a similar name" when one of the set is gone.
pub fn names_script(init: Init) -> &'static str {
    match init {
        Init::Systemd => {
            r#"export LC_ALL=C
for d in /etc/systemd/system /run/systemd/system /lib/systemd/system /usr/lib/systemd/system /run/systemd/generator /run/systemd/generator.late; do
  [ -d "$d" ] && ls -1 "$d"
done
systemctl list-units --all --plain --no-legend --no-pager --type=service,socket 2>/dev/null | awk '{print $1}'
true"#
        }
        Init::Openrc => "ls -1 /etc/init.d 2>/dev/null; true",
    }
}

/// Key=value blocks (systemctl show's form), one state per block.
fn blocks(lines: &[&str]) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut cur: BTreeMap<String, String> = BTreeMap::new();
    for l in lines {
        if l.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            cur.insert(k.to_string(), v.chars().take(1024).collect());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn state_of(name: &str, b: &BTreeMap<String, String>) -> UnitState {
    let get = |k: &str| b.get(k).cloned().unwrap_or_default();
    let id = get("Id");
    UnitState {
        name: name.to_string(),
        id: if valid_name(&id) {
            id
        } else {
            name.to_string()
        },
        load: get("LoadState"),
        active: get("ActiveState"),
        sub: get("SubState"),
        result: get("Result"),
        type_: get("Type"),
        transient: get("Transient") == "yes",
        triggered_by: get("TriggeredBy")
            .split_whitespace()
            .filter(|t| valid_name(t))
            .map(str::to_string)
            .collect(),
        triggers: get("Triggers")
            .split_whitespace()
            .filter(|t| valid_name(t))
            .map(str::to_string)
            .collect(),
        ran: get("ExecMainStartTimestampMonotonic")
            .parse::<u64>()
            .is_ok_and(|t| t > 0),
        restarts: get("NRestarts").parse().ok(),
        condition: get("ConditionResult"),
    }
}

/// The answer to `set_script`: the init system and every unit it listed,
/// or None when the answer was cut short or names no init system drydock
/// knows.
pub fn parse_set(text: &str) -> Option<(Init, Vec<UnitState>)> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "@@ systemd" || *l == "@@ openrc")?;
    let end = lines.iter().rposition(|l| *l == "@@ end")?;
    if end < start {
        return None;
    }
    let init = if lines[start] == "@@ systemd" {
        Init::Systemd
    } else {
        Init::Openrc
    };
    let states = blocks(&lines[start + 1..end])
        .iter()
        .take(MAX_UNITS)
        .filter_map(|b| {
            let id = b.get("Id")?;
            valid_name(id).then(|| state_of(id, b))
        })
        .collect();
    Some((init, states))
}

/// The answer to `units_script`: each unit asked for, by the name asked
/// for. A unit whose section is missing (the answer was cut) is absent.
pub fn parse_units(text: &str) -> BTreeMap<String, UnitState> {
    let mut out = BTreeMap::new();
    let mut name: Option<String> = None;
    let mut body: Vec<&str> = Vec::new();
    let mut flush = |name: &Option<String>, body: &mut Vec<&str>| {
        if let Some(n) = name {
            let b = blocks(body).into_iter().next().unwrap_or_default();
            // "Unit name x is not valid" and such: nothing was said of it.
            if !b.is_empty() && out.len() < MAX_UNITS {
                out.insert(n.clone(), state_of(n, &b));
            }
        }
        body.clear();
    };
    for l in text.lines() {
        if let Some(n) = l.strip_prefix("@@ unit ") {
            flush(&name, &mut body);
            name = valid_name(n).then(|| n.to_string());
        } else if l == "@@ end" {
            flush(&name, &mut body);
            name = None;
        } else {
            body.push(l);
        }
    }
    out
}
