//! Retention: which versions history keeps. `serve --keep POLICY` and `prune --keep POLICY`.
//!
//! A policy is `all` (every version forever), `current` (only what each path holds now: sync
//! without history) or rules separated by commas:
//! - `all:AGE`: every version younger than AGE;
//! - `hourly:AGE`, `daily:AGE`, `weekly:AGE`, `monthly:AGE`: for versions younger than AGE, the
//!   last one of each hour, day (UTC), week or 30-day month;
//! - `deleted:AGE`: a deleted path's versions are kept this long after its delete (then the path
//!   is forgotten); without it, as long as the other rules keep them.
//!
//! AGE is like `90m`, `36h`, `30d`, `2w`, `1y`. The default is
//! `all:1d,daily:30d,weekly:1y,deleted:90d`. A current version is always kept, whatever the
//! policy; a version is kept when any rule keeps it.

use std::str::FromStr;

use crate::when::parse_age;

pub const DEFAULT_POLICY: &str = "all:1d,daily:30d,weekly:1y,deleted:90d";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    All,
    Current,
    Rules(Rules),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Every version younger than this many seconds.
    pub all: u64,
    /// (bucket width in seconds, for versions younger than this many seconds).
    pub buckets: Vec<(u64, u64)>,
    /// A deleted path is forgotten this many seconds after its delete; `None`: never by this rule.
    pub deleted: Option<u64>,
}

impl Default for Keep {
    fn default() -> Self {
        DEFAULT_POLICY.parse().unwrap_or(Keep::All)
    }
}

impl FromStr for Keep {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "all" => return Ok(Keep::All),
            "current" => return Ok(Keep::Current),
            _ => {}
        }
        let mut rules = Rules::default();
        for rule in s.split(',') {
            let bad = || {
                format!(
                    "`{rule}` is not a retention rule: use all, current, or rules like `all:1d,daily:30d,weekly:1y,deleted:90d` (kinds: all, hourly, daily, weekly, monthly, deleted; ages like 90m, 36h, 30d, 2w, 1y)"
                )
            };
            let (kind, age) = rule.trim().split_once(':').ok_or_else(bad)?;
            let age = parse_age(age).ok_or_else(bad)?;
            match kind {
                "all" => rules.all = rules.all.max(age),
                "hourly" => rules.buckets.push((3600, age)),
                "daily" => rules.buckets.push((86_400, age)),
                "weekly" => rules.buckets.push((7 * 86_400, age)),
                "monthly" => rules.buckets.push((30 * 86_400, age)),
                "deleted" => rules.deleted = Some(age),
                _ => return Err(bad()),
            }
        }
        Ok(Keep::Rules(rules))
    }
}

impl Keep {
    /// Which of one path's versions to keep. `times` are the commit times (Unix seconds) of its
    /// versions, oldest first; the last is the current one and always kept. `deleted_now`: the
    /// current version is a delete. Returns a keep flag per version.
    pub fn select(&self, times: &[i64], deleted_now: bool, now: i64) -> Vec<bool> {
        let n = times.len();
        let mut keep = vec![false; n];
        if n == 0 {
            return keep;
        }
        match self {
            Keep::All => keep.iter_mut().for_each(|k| *k = true),
            Keep::Current => keep[n - 1] = true,
            Keep::Rules(r) => {
                let age = |t: i64| now.saturating_sub(t).max(0) as u64;
                if deleted_now && r.deleted.is_some_and(|limit| age(times[n - 1]) >= limit) {
                    // The whole path is forgotten.
                    return keep;
                }
                keep[n - 1] = true;
                for (i, &t) in times.iter().enumerate() {
                    if age(t) < r.all {
                        keep[i] = true;
                    }
                }
                for &(width, limit) in &r.buckets {
                    // The last version in each bucket: a version is the last of its bucket when the
                    // next one falls in a later bucket.
                    for i in 0..n {
                        if age(times[i]) >= limit {
                            continue;
                        }
                        let bucket = times[i].div_euclid(width as i64);
                        let last = i + 1 == n || times[i + 1].div_euclid(width as i64) != bucket;
                        if last {
                            keep[i] = true;
                        }
                    }
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_refuse_nonsense() {
        assert_eq!("all".parse::<Keep>(), Ok(Keep::All));
        assert_eq!("current".parse::<Keep>(), Ok(Keep::Current));
        let Ok(Keep::Rules(r)) = DEFAULT_POLICY.parse::<Keep>() else { panic!("default") };
        assert_eq!(r.all, 86_400);
        assert_eq!(r.buckets, vec![(86_400, 30 * 86_400), (7 * 86_400, 365 * 86_400)]);
        assert_eq!(r.deleted, Some(90 * 86_400));
        for bad in ["", "forever", "daily", "daily:x", "yearly:1y", "all:1d,"] {
            assert!(bad.parse::<Keep>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_default_keeps_recent_versions_then_one_a_day() {
        let keep = Keep::default();
        let day = 86_400;
        let now = 100 * day;
        // Three versions on day 50 (morning, noon, evening), two within the last day.
        let times = [50 * day + 100, 50 * day + 40_000, 50 * day + 80_000, now - 3600, now - 60];
        assert_eq!(keep.select(&times, false, now), vec![false, false, true, true, true]);
        // Older than 30 days, one a week: day 50 is 50 days ago, so only its week's last survives.
        let times = [20 * day, 21 * day, 60 * day, 61 * day + 5, now - 10];
        let k = keep.select(&times, false, now);
        assert!(k[4] && k[3], "{k:?}");
        assert!(!k[2] || 60 / 7 != 61 / 7, "{k:?}");
        // A path deleted 91 days ago is forgotten; 89 days ago it stays.
        assert_eq!(keep.select(&[0, now - 91 * day], true, now), vec![false, false]);
        // ...and its earlier versions follow the other rules (the last of its week).
        assert_eq!(keep.select(&[now - 95 * day, now - 89 * day], true, now), vec![true, true]);
        assert_eq!(Keep::Current.select(&[1, 2, 3], false, now), vec![false, false, true]);
        assert_eq!(Keep::All.select(&[1, 2], true, now), vec![true, true]);
    }
}
