//! RFC 3339 timestamps, exactly as SPEC §1 wants them.
//!
//! Parsing is lexical and strict (our own grammar, because the fractional digits must
//! be kept byte for byte, trailing zeros included, which no date library promises);
//! calendar checks and offset arithmetic go through the `time` crate.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// A timestamp normalised to UTC: `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp {
    /// The canonical UTC text.
    pub text: String,
    /// Milliseconds since the Unix epoch, rounded up to the next whole millisecond
    /// (so that "at or after t" can be expressed on millisecond ULID times).
    pub unix_ms_ceil: i64,
}

/// Parses an RFC 3339 date-time. The error says what is wrong, for the user.
pub fn parse(s: &str) -> Result<Timestamp, &'static str> {
    const SHAPE: &str = "must be an RFC 3339 date-time such as 2026-03-19T10:00:00.000Z";
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(SHAPE);
    }
    let num = |range: std::ops::Range<usize>| -> Result<u32, &'static str> {
        let digits = &b[range];
        if digits.iter().all(u8::is_ascii_digit) {
            Ok(digits
                .iter()
                .fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
        } else {
            Err(SHAPE)
        }
    };
    let year = num(0..4)?;
    let month = num(5..7)?;
    let day = num(8..10)?;
    let hour = num(11..13)?;
    let minute = num(14..16)?;
    let second = num(17..19)?;
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(SHAPE);
    }
    let mut i = 19;
    let mut fraction = "";
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        let mut end = start;
        while end < b.len() && b[end].is_ascii_digit() {
            end += 1;
        }
        if end == start {
            return Err(SHAPE);
        }
        if end - start > 9 {
            return Err("has more than 9 fractional digits");
        }
        fraction = &s[start..end];
        i = end;
    }
    let offset_seconds: i64 = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return Err(SHAPE);
            }
            let oh = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let om = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if oh > 23 || om > 59 {
                return Err("has an invalid UTC offset");
            }
            let magnitude = oh * 3600 + om * 60;
            if *sign == b'-' { -magnitude } else { magnitude }
        }
        _ => return Err(SHAPE),
    };
    if second == 60 {
        return Err("is a leap second, which is not accepted");
    }
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or("has an invalid month")?;
    let date = i32::try_from(year)
        .ok()
        .and_then(|y| Date::from_calendar_date(y, month, day as u8).ok())
        .ok_or("has an invalid date")?;
    let time = Time::from_hms(hour as u8, minute as u8, second as u8)
        .map_err(|_| "has an invalid time")?;
    let local = PrimitiveDateTime::new(date, time)
        .assume_utc()
        .unix_timestamp();
    let utc = OffsetDateTime::from_unix_timestamp(local - offset_seconds)
        .map_err(|_| "is out of range")?;
    if !(0..=9999).contains(&utc.year()) {
        return Err("falls outside the years 0000–9999 in UTC");
    }

    let canonical_input = offset_seconds == 0 && b[10] == b'T' && b[b.len() - 1] == b'Z';
    let nanos = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(9)
        .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
    let sub_ms_rest = nanos % 1_000_000;
    let unix_ms_ceil = utc.unix_timestamp() * 1000 + nanos / 1_000_000 + i64::from(sub_ms_rest > 0);
    if canonical_input {
        return Ok(Timestamp {
            text: s.to_string(),
            unix_ms_ceil,
        });
    }

    let mut text = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    );
    if !fraction.is_empty() {
        text.push('.');
        text.push_str(fraction);
    }
    text.push('Z');
    Ok(Timestamp { text, unix_ms_ceil })
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (the ingest-time default).
pub fn format_unix_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let millis = ms % 1000;
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        // ULID times are 48-bit milliseconds: beyond year 9999 only with a broken clock.
        Err(_) => "9999-12-31T23:59:59.999Z".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_to_utc_and_keeps_fraction_digits() {
        assert_eq!(
            parse("2026-03-19T10:00:00.000Z").unwrap().text,
            "2026-03-19T10:00:00.000Z"
        );
        assert_eq!(
            parse("2026-03-19t10:00:00.100z").unwrap().text,
            "2026-03-19T10:00:00.100Z"
        );
        assert_eq!(
            parse("2026-03-19T12:30:00.5+02:30").unwrap().text,
            "2026-03-19T10:00:00.5Z"
        );
        assert_eq!(
            parse("2026-03-19T10:00:00-00:00").unwrap().text,
            "2026-03-19T10:00:00Z"
        );
        assert_eq!(
            parse("2026-01-01T00:30:00+01:00").unwrap().text,
            "2025-12-31T23:30:00Z"
        );
        assert_eq!(
            parse("2026-03-19T10:00:00.123456789Z").unwrap().text,
            "2026-03-19T10:00:00.123456789Z"
        );
    }

    #[test]
    fn rejects_what_spec_forbids() {
        for bad in [
            "2026-03-19 10:00:00Z",
            "2026-03-19T10:00:00",
            "2026-03-19T10:00:60Z",
            "2026-02-30T10:00:00Z",
            "2026-03-19T10:00:00.1234567890Z",
            "2026-03-19T10:00:00.Z",
            "0000-01-01T00:30:00+01:00",
            "9999-12-31T23:30:00-01:00",
            "2026-03-19T24:00:00Z",
            "2026-03-19T10:00:00+24:00",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn ms_ceiling_and_formatting() {
        assert_eq!(
            parse("1970-01-01T00:00:01.0001Z").unwrap().unix_ms_ceil,
            1001
        );
        assert_eq!(
            parse("1970-01-01T00:00:01.001Z").unwrap().unix_ms_ceil,
            1001
        );
        assert_eq!(format_unix_ms(1_001), "1970-01-01T00:00:01.001Z");
    }
}
