//! Records (issue 19): a town's public-records obligations. A per-user export writes one zip
//! archive with the user's profile, the events they may see in every room they are or were in
//! (as JSON and as readable HTML) and the media they uploaded (`export.rs`), streamed to a file
//! by a writer thread (`archive.rs`). `parvis export-user` runs it directly; the admin API runs
//! it as a background job recorded in `user_exports` (`jobs.rs`).

pub mod archive;
pub mod export;
pub mod html;
pub mod jobs;

pub use export::{ExportError, ExportOptions, Progress, Summary, export_user};

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the epoch of the EU's summer-time switch in `year` and month (3 or 10): 01:00
/// UTC on the month's last Sunday.
fn eu_switch(year: i64, month: u32) -> i64 {
    let last = days_from_civil(year, month, 31);
    // 1970-01-01 was a Thursday: (days + 4) mod 7 is 0 on Sundays.
    let sunday = last - (last + 4).rem_euclid(7);
    sunday * 86_400 + 3600
}

/// The offset of Europe/Paris from UTC at a time, in seconds: +1 h, +2 h in summer (the EU rule,
/// in force since 1996).
pub fn paris_offset(secs: i64) -> i64 {
    let (year, _, _) = civil_from_days(secs.div_euclid(86_400));
    if (eu_switch(year, 3)..eu_switch(year, 10)).contains(&secs) { 7200 } else { 3600 }
}

/// Broken-down time: (year, month, day, hour, minute, second).
fn broken_down(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400) as u32;
    (y, mo, d, s / 3600, s / 60 % 60, s % 60)
}

/// `2025-03-14T14:02:11Z` for a time in milliseconds.
pub fn utc_iso(ms: i64) -> String {
    let (y, mo, d, h, mi, s) = broken_down(ms.div_euclid(1000));
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `2025-03-14 15:02:11 (UTC+1)`: Paris time, with its offset written out.
pub fn paris_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let offset = paris_offset(secs);
    let (y, mo, d, h, mi, s) = broken_down(secs + offset);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} (UTC+{})", offset / 3600)
}

/// Paris wall-clock time as a zip timestamp (zip times have no zone; readers show them as is).
pub fn zip_time(ms: i64) -> zip::DateTime {
    let secs = ms.div_euclid(1000);
    let (y, mo, d, h, mi, s) = broken_down(secs + paris_offset(secs));
    zip::DateTime::from_date_and_time(y.clamp(1980, 2107) as u16, mo as u8, d as u8, h as u8, mi as u8, s as u8)
        .unwrap_or_default()
}

/// An ASCII file-name component from user-controlled text: accents dropped, anything but
/// letters and digits turned into single dashes, at most `max` characters. May be empty.
pub fn slug(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.nfd().filter(|c| !is_combining_mark(*c)) {
        if out.len() >= max {
            break;
        }
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        for days in [-1_000_000, -1, 0, 59, 10_957, 19_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(utc_iso(1_741_960_931_000), "2025-03-14T14:02:11Z");
        // Winter: UTC+1. 2025 summer time runs from 30 March 01:00 UTC to 26 October 01:00 UTC.
        assert_eq!(paris_time(1_741_960_931_000), "2025-03-14 15:02:11 (UTC+1)");
        let spring = days_from_civil(2025, 3, 30) * 86_400 + 3600;
        assert_eq!(paris_offset(spring - 1), 3600);
        assert_eq!(paris_offset(spring), 7200);
        let autumn = days_from_civil(2025, 10, 26) * 86_400 + 3600;
        assert_eq!(paris_offset(autumn - 1), 7200);
        assert_eq!(paris_offset(autumn), 3600);
        assert_eq!(paris_time(spring * 1000), "2025-03-30 03:00:00 (UTC+2)");
        assert_eq!(paris_time(-1), "1970-01-01 00:59:59 (UTC+1)");
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("Conseil municipal — Général", 40), "Conseil-municipal-General");
        assert_eq!(slug("../../etc/passwd", 40), "etc-passwd");
        assert_eq!(slug("<script>alert(1)</script>", 40), "script-alert-1-script");
        assert_eq!(slug("市役所", 40), "");
        assert_eq!(slug("a\u{202e}b c", 40), "a-b-c");
        assert!(slug(&"é".repeat(100), 40).len() <= 40);
    }
}
