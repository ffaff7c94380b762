//! Conflict copies: `NAME (conflict DEVICE YYYY-MM-DD HHMMSS).EXT`, the Dropbox-style name that
//! sorts beside the original and says where and when it came from. Times are UTC, so two
//! computers in different zones name the same moment the same way.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::path::{PathError, RelPath};

/// The conflict copy's path for `path`, made on `device` at `now`; `n > 1` adds a counter for
/// the rare second conflict within one second.
pub fn conflict_path(path: &RelPath, device: &str, now: SystemTime, n: u32) -> Result<RelPath, PathError> {
    let name = path.file_name();
    // The extension is what follows the last dot, unless the dot starts the name (".bashrc").
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let device: String = device.chars().filter(|c| *c != '/' && *c != '\0').take(40).collect();
    let counter = if n > 1 { format!(" {n}") } else { String::new() };
    let stamp = utc_stamp(now);
    path.with_file_name(&format!("{stem} (conflict {device} {stamp}{counter}){ext}"))
}

/// `YYYY-MM-DD HHMMSS` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Year, month and day (proleptic Gregorian) of a day number counted from 1970-01-01, after
/// Howard Hinnant's `civil_from_days`: no date crate for one conversion.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names() {
        let t = UNIX_EPOCH + Duration::from_secs(1_764_000_000); // 2025-11-24 16:00:00 UTC
        let p = RelPath::new("docs/report.final.txt").unwrap();
        assert_eq!(
            conflict_path(&p, "laptop", t, 1).unwrap().as_str(),
            "docs/report.final (conflict laptop 2025-11-24 160000).txt"
        );
        let p = RelPath::new(".bashrc").unwrap();
        assert_eq!(
            conflict_path(&p, "pc", t, 2).unwrap().as_str(),
            ".bashrc (conflict pc 2025-11-24 160000 2)"
        );
        assert_eq!(utc_stamp(UNIX_EPOCH), "1970-01-01 000000");
    }
}
