//! `--since` and `--until` times, as Docker takes them: RFC 3339, Unix seconds, or a
//! duration ago.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid time {0:?}: use RFC 3339 (2026-12-04T19:00:00Z, 2026-12-04T20:00:00+01:00), \
     Unix seconds (1796410800 or 1796410800.5) or a duration ago (10m, 1h30m)"
)]
pub struct TimeError(pub String);

/// Nanoseconds since the Unix epoch (0 before it; saturates in 2262).
pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Parses `s` into Unix nanoseconds; a duration counts back from `now`.
pub fn parse_time(s: &str, now: SystemTime) -> Result<i64, TimeError> {
    let bad = || TimeError(s.to_string());
    let s = s.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if let Some(nanos) = unix_seconds(s) {
        return nanos.ok_or_else(bad);
    }
    if s.contains('T') || s.contains('t') {
        return rfc3339(s).ok_or_else(bad);
    }
    let ago = humantime::parse_duration(s).map_err(|_| bad())?;
    let at = now.checked_sub(ago).unwrap_or(UNIX_EPOCH);
    Ok(unix_nanos(at))
}

/// `SECONDS[.FRACTION]`: `None` when `s` is not of that form, `Some(None)` when it is but
/// is out of range.
fn unix_seconds(s: &str) -> Option<Option<i64>> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) {
        return None;
    }
    let secs: i64 = match whole.parse() {
        Ok(v) => v,
        Err(_) => return Some(None),
    };
    let mut nanos: i64 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(b - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(
        secs.checked_mul(1_000_000_000)
            .and_then(|s| s.checked_add(nanos)),
    )
}

/// RFC 3339 with `Z` or a `±HH:MM` offset (humantime reads only UTC).
fn rfc3339(s: &str) -> Option<i64> {
    let (local, offset_secs) = match s.len().checked_sub(6).and_then(|i| s.get(i..)) {
        Some(tail)
            if (tail.starts_with('+') || tail.starts_with('-'))
                && tail.as_bytes().get(3) == Some(&b':') =>
        {
            let hours: i64 = tail.get(1..3)?.parse().ok()?;
            let minutes: i64 = tail.get(4..6)?.parse().ok()?;
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (
                format!("{}Z", &s[..s.len() - 6]),
                sign * (hours * 3600 + minutes * 60),
            )
        }
        _ => (s.to_string(), 0),
    };
    let t = humantime::parse_rfc3339_weak(local.trim_end_matches(['Z', 'z'])).ok()?;
    let nanos = unix_nanos(t);
    nanos.checked_sub(offset_secs.checked_mul(1_000_000_000)?)
}

/// Unix nanoseconds as the query's `SECONDS.NANOS` (what the CLI sends the daemon).
pub fn nanos_to_query(nanos: i64) -> String {
    let d = Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_410_800; // 2026-12-04T19:00:00Z

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW as u64)
    }

    #[test]
    fn docker_forms_are_read() {
        let p = |s: &str| parse_time(s, now());
        assert_eq!(p("1796410800"), Ok(NOW * 1_000_000_000));
        assert_eq!(p("1796410800.25"), Ok(NOW * 1_000_000_000 + 250_000_000));
        assert_eq!(p("2026-12-04T19:00:00Z"), Ok(NOW * 1_000_000_000));
        assert_eq!(
            p("2026-12-04T19:00:00.5Z"),
            Ok(NOW * 1_000_000_000 + 500_000_000)
        );
        assert_eq!(p("2026-12-04T20:30:00+01:30"), Ok(NOW * 1_000_000_000));
        assert_eq!(p("2026-12-04T18:00:00-01:00"), Ok(NOW * 1_000_000_000));
        assert_eq!(p("10m"), Ok((NOW - 600) * 1_000_000_000));
        assert_eq!(p("1h30m"), Ok((NOW - 5400) * 1_000_000_000));
        let back = nanos_to_query(NOW * 1_000_000_000 + 5);
        assert_eq!(back, "1796410800.000000005");
        assert_eq!(p(&back), Ok(NOW * 1_000_000_000 + 5));
    }

    #[test]
    fn other_text_is_refused_with_the_forms_it_takes() {
        for s in [
            "",
            "yesterday",
            "2026-13-04T19:00:00Z",
            "12.3.4",
            "-5",
            "99999999999999999999",
        ] {
            let e = parse_time(s, now()).unwrap_err();
            assert!(e.to_string().contains("RFC 3339"), "{s}: {e}");
        }
    }
}
