//! Points and spans of time as people write them: RFC 3339 (`2026-11-30T10:00:00Z`, an offset
//! such as `+01:00`, optional fractions) and ages (`90m`, `2h`, `3d`, `2w`, `1y`). No date crate
//! for three conversions; the calendar arithmetic is Howard Hinnant's.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// An age like `90s`, `90m`, `2h`, `3d`, `2w`, `1y` (365 days) in seconds; a bare number is
/// seconds.
pub fn parse_age(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mul = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// A point in time: RFC 3339 or an age before `now`; Unix seconds.
pub fn parse_point(s: &str, now: i64) -> Result<i64, String> {
    if let Some(age) = parse_age(s) {
        return Ok(now.saturating_sub(age.min(i64::MAX as u64) as i64));
    }
    parse_rfc3339(s).ok_or_else(|| {
        format!(
            "`{s}` is not a time: give RFC 3339 (like 2026-11-30T14:05:00Z or 2026-11-30T15:05:00+01:00) or an age (like 90m, 2h, 3d)"
        )
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (also with a space or `t` for the `T`, `z` for `Z`);
/// fractions are dropped.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.iter().all(u8::is_ascii_digit) { std::str::from_utf8(part).ok()?.parse().ok() } else { None }
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::sync::conflict::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days from 1970-01-01 of a proleptic Gregorian date (Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("90m"), Some(5400));
        assert_eq!(parse_age("3d"), Some(259_200));
        assert_eq!(parse_age("15"), Some(15));
        assert_eq!(parse_age("1y"), Some(365 * 86_400));
        assert_eq!(parse_age("2x"), None);
        assert_eq!(parse_age("h"), None);
        assert_eq!(parse_age(""), None);
    }

    #[test]
    fn rfc3339_round_trips_and_offsets_count() {
        for t in [0i64, 1, 951_782_400, 1_796_040_000, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t), "{t}");
        }
        assert_eq!(parse_rfc3339("2026-11-30T10:00:00Z"), parse_rfc3339("2026-11-30T11:00:00+01:00"));
        assert_eq!(parse_rfc3339("2026-11-30T10:00:00.123Z"), parse_rfc3339("2026-11-30 10:00:00Z"));
        for bad in ["2026-11-30", "2026-13-01T00:00:00Z", "2026-11-30T10:00:00", "2026-11-30T10:00:00+1:00"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(parse_point("2h", 10_000), Ok(2800));
        assert!(parse_point("yesterday", 0).is_err());
    }
}
