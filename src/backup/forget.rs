//! Which versions a retention policy keeps, as restic's `forget` spells
//! and decides it: newest first, each `--keep-*` rule keeps the newest
//! version of each of its last N periods that have one (hour, day, ISO
//! week, month, year; `--keep-last` every version), and a version is kept
//! if any rule keeps it. Periods are counted in UTC (restic counts in the
//! local time zone), the zone `created` is written in.

use anyhow::{Result, anyhow};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How many of each to keep; 0 is the rule not given.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    pub last: u64,
    pub hourly: u64,
    pub daily: u64,
    pub weekly: u64,
    pub monthly: u64,
    pub yearly: u64,
}

impl Keep {
    pub fn is_empty(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
        .iter()
        .all(|&n| n == 0)
    }
}

/// One version's fate, and why it is kept.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub created: String,
    pub keep: bool,
    /// The rules that keep it: "last", "hourly", "daily", "weekly",
    /// "monthly", "yearly".
    pub reasons: Vec<&'static str>,
}

/// The decision for each version of VERSIONS (id, created as RFC 3339),
/// newest first.
pub fn decide(versions: &[(String, String)], keep: &Keep) -> Result<Vec<Decision>> {
    let mut dated = versions
        .iter()
        .map(|(id, created)| {
            let t = OffsetDateTime::parse(created, &Rfc3339)
                .map_err(|e| anyhow!("version {id}'s time {created:?} does not parse: {e}"))?;
            Ok((id.clone(), created.clone(), t))
        })
        .collect::<Result<Vec<_>>>()?;
    dated.sort_by(|a, b| b.2.cmp(&a.2).then(b.0.cmp(&a.0)));
    type Period = fn(&OffsetDateTime, &str) -> String;
    let rules: [(&'static str, u64, Period); 6] = [
        ("last", keep.last, |_, id| id.to_string()),
        ("hourly", keep.hourly, |t, _| {
            format!("{}-{}-{}", t.date(), t.hour(), "h")
        }),
        ("daily", keep.daily, |t, _| t.date().to_string()),
        ("weekly", keep.weekly, |t, _| {
            let (y, w, _) = t.to_iso_week_date();
            format!("{y}-W{w}")
        }),
        ("monthly", keep.monthly, |t, _| {
            format!("{}-{}", t.year(), t.month() as u8)
        }),
        ("yearly", keep.yearly, |t, _| t.year().to_string()),
    ];
    let mut left: Vec<u64> = rules.iter().map(|r| r.1).collect();
    let mut seen: Vec<Option<String>> = vec![None; rules.len()];
    let mut out = Vec::new();
    for (id, created, t) in dated {
        let mut reasons = Vec::new();
        for (k, (name, _, period)) in rules.iter().enumerate() {
            let p = period(&t, &id);
            if left[k] > 0 && seen[k].as_deref() != Some(p.as_str()) {
                left[k] -= 1;
                seen[k] = Some(p);
                reasons.push(*name);
            }
        }
        out.push(Decision {
            id,
            created,
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(days: &[&str]) -> Vec<(String, String)> {
        days.iter()
            .enumerate()
            .map(|(k, d)| (format!("v{k:02}"), d.to_string()))
            .collect()
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .filter(|x| x.keep)
            .map(|x| x.created.as_str())
            .collect()
    }

    #[test]
    fn each_rule_keeps_the_newest_of_its_periods() {
        let v = at(&[
            "2026-01-05T03:00:00Z",
            "2026-01-05T22:00:00Z",
            "2026-01-06T01:00:00Z",
            "2026-01-06T23:00:00Z",
            "2026-01-12T10:00:00Z",
            "2026-02-01T10:00:00Z",
            "2026-02-02T10:00:00Z",
        ]);
        let daily = decide(
            &v,
            &Keep {
                daily: 3,
                ..Keep::default()
            },
        )
        .unwrap();
        assert_eq!(
            kept(&daily),
            vec![
                "2026-02-02T10:00:00Z",
                "2026-02-01T10:00:00Z",
                "2026-01-12T10:00:00Z"
            ]
        );
        // Weeks: 2026-02-02 is a Monday (week 6), 02-01 a Sunday (week 5,
        // with 01-26..); 01-12 week 3; 01-06 and 01-05 week 2.
        let weekly = decide(
            &v,
            &Keep {
                weekly: 4,
                ..Keep::default()
            },
        )
        .unwrap();
        assert_eq!(
            kept(&weekly),
            vec![
                "2026-02-02T10:00:00Z",
                "2026-02-01T10:00:00Z",
                "2026-01-12T10:00:00Z",
                "2026-01-06T23:00:00Z"
            ]
        );
        // Several rules: a version kept by two says both; the rest go.
        let both = decide(
            &v,
            &Keep {
                last: 1,
                monthly: 2,
                ..Keep::default()
            },
        )
        .unwrap();
        assert_eq!(both[0].reasons, vec!["last", "monthly"]);
        assert_eq!(both[1].created, "2026-02-01T10:00:00Z");
        assert!(!both[1].keep);
        assert_eq!(
            kept(&both),
            vec!["2026-02-02T10:00:00Z", "2026-01-12T10:00:00Z"]
        );
        assert_eq!(
            decide(&v, &Keep::default())
                .unwrap()
                .iter()
                .filter(|d| d.keep)
                .count(),
            0
        );
    }

    #[test]
    fn a_time_that_does_not_parse_is_said() {
        let e = decide(
            &[("x".into(), "yesterday".into())],
            &Keep {
                last: 1,
                ..Keep::default()
            },
        )
        .unwrap_err();
        assert!(format!("{e}").contains("version x's time"), "{e}");
    }
}
