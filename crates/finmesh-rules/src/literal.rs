//! Literal values: calendar arithmetic for date and timestamp literals, and exact
//! conversion of number literals to the representation of the field they meet.
//!
//! Invariants: dates are days since 1970-01-01 (proleptic Gregorian, as Avro's
//! `date`); timestamps are nanoseconds since 1970-01-01T00:00:00Z held in `i128`
//! until they are converted, exactly or not at all, to the unit of one field.

/// Days since 1970-01-01 of a civil date, or `None` if the date does not exist.
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    // Howard Hinnant's `days_from_civil`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses `YYYY-MM-DD` into days since the epoch.
pub(crate) fn parse_date(text: &str) -> Result<i32, String> {
    let b = text.as_bytes();
    let well_formed = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !well_formed {
        return Err(format!("`{text}` is not a date; write dates as YYYY-MM-DD"));
    }
    let year: i64 = text[0..4].parse().map_err(|_| "bad year".to_string())?;
    let month: u32 = text[5..7].parse().map_err(|_| "bad month".to_string())?;
    let day: u32 = text[8..10].parse().map_err(|_| "bad day".to_string())?;
    days_from_civil(year, month, day)
        .and_then(|d| i32::try_from(d).ok())
        .ok_or_else(|| format!("{text} is not a calendar date"))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` into nanoseconds since the epoch.
pub(crate) fn parse_timestamp(text: &str) -> Result<i128, String> {
    let bad = || format!("`{text}` is not a timestamp; write YYYY-MM-DDTHH:MM:SS[.fff](Z|+HH:MM)");
    if text.len() < 20 || !text.is_char_boundary(10) || text.as_bytes()[10] != b'T' {
        return Err(bad());
    }
    let days = parse_date(&text[..10])?;
    let rest = &text[11..];
    let two = |s: &str| -> Option<i128> {
        (s.len() == 2 && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    let (hh, mm, ss) = match (rest.get(0..2), rest.get(2..3), rest.get(3..5), rest.get(5..6), rest.get(6..8)) {
        (Some(h), Some(":"), Some(m), Some(":"), Some(s)) => {
            (two(h).ok_or_else(bad)?, two(m).ok_or_else(bad)?, two(s).ok_or_else(bad)?)
        }
        _ => return Err(bad()),
    };
    if hh > 23 || mm > 59 || ss > 59 {
        return Err(format!("{text} is not a time of day"));
    }
    let mut rest = &rest[8..];
    let mut nanos: i128 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return Err(format!("`{text}`: a fraction of a second has 1 to 9 digits"));
        }
        let value: i128 = frac[..digits].parse().map_err(|_| bad())?;
        nanos = value * 10i128.pow(9 - digits as u32);
        rest = &frac[digits..];
    }
    let offset_secs: i128 = match rest {
        "Z" => 0,
        _ => {
            let sign = match rest.get(0..1) {
                Some("+") => 1,
                Some("-") => -1,
                _ => return Err(bad()),
            };
            match (rest.get(1..3), rest.get(3..4), rest.get(4..), rest.len()) {
                (Some(h), Some(":"), Some(m), 6) => {
                    let (h, m) = (two(h).ok_or_else(bad)?, two(m).ok_or_else(bad)?);
                    if h > 23 || m > 59 {
                        return Err(bad());
                    }
                    sign * (h * 3600 + m * 60)
                }
                _ => return Err(bad()),
            }
        }
    };
    let secs = i128::from(days) * 86_400 + hh * 3600 + mm * 60 + ss - offset_secs;
    Ok(secs * 1_000_000_000 + nanos)
}

/// A number literal as written: sign, integer digits and fraction digits.
pub(crate) struct Number<'a> {
    pub negative: bool,
    pub int: &'a str,
    pub frac: &'a str,
}

impl<'a> Number<'a> {
    /// Splits `[-]digits[.digits]`; the lexer guarantees this shape.
    pub(crate) fn parse(text: &'a str) -> Number<'a> {
        let (negative, body) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        Number { negative, int, frac }
    }

    /// Fraction digits that matter (trailing zeros do not).
    fn frac_significant(&self) -> &'a str {
        self.frac.trim_end_matches('0')
    }

    /// The value as an integer, if it has no fractional part and fits in `i64`.
    pub(crate) fn to_i64(&self) -> Option<i64> {
        if !self.frac_significant().is_empty() {
            return None;
        }
        self.to_scaled(0).and_then(|v| i64::try_from(v).ok())
    }

    /// The value times `10^scale` as an exact integer, if it has at most `scale`
    /// significant fraction digits and fits in 38 decimal digits.
    pub(crate) fn to_scaled(&self, scale: u32) -> Option<i128> {
        let frac = self.frac_significant();
        if frac.len() > scale as usize {
            return None;
        }
        let mut value: i128 = 0;
        let padding = scale as usize - frac.len();
        for c in self.int.bytes().chain(frac.bytes()).chain(std::iter::repeat_n(b'0', padding)) {
            value = value.checked_mul(10)?.checked_add(i128::from(c - b'0'))?;
        }
        if value >= 10i128.pow(38) {
            return None;
        }
        Some(if self.negative { -value } else { value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_known_day_numbers() {
        for (text, days) in [
            ("1970-01-01", 0),
            ("1969-12-31", -1),
            ("2020-01-01", 18262),
            ("2024-02-29", 19782),
            ("2080-12-31", 40542),
            ("1900-01-01", -25567),
            ("2000-03-01", 11017),
        ] {
            assert_eq!(parse_date(text), Ok(days), "{text}");
        }
        for bad in ["2023-02-29", "2020-13-01", "2020-00-10", "2020-04-31", "1900-02-29", "2020-1-01"] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_apply_fraction_and_offset() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:01Z"), Ok(1_000_000_000));
        assert_eq!(parse_timestamp("1970-01-01T00:00:00.25Z"), Ok(250_000_000));
        assert_eq!(parse_timestamp("1970-01-01T01:00:00+01:00"), Ok(0));
        assert_eq!(parse_timestamp("1969-12-31T23:00:00-01:00"), Ok(0));
        for bad in ["2020-01-01T24:00:00Z", "2020-01-01T10:00:00", "2020-01-01T10:00Z", "2020-01-01T10:00:00.Z"] {
            assert!(parse_timestamp(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_convert_exactly_or_not_at_all() {
        assert_eq!(Number::parse("-12.50").to_scaled(2), Some(-1250));
        assert_eq!(Number::parse("12.5").to_scaled(0), None);
        assert_eq!(Number::parse("7.000").to_i64(), Some(7));
        assert_eq!(Number::parse("9223372036854775808").to_i64(), None);
        assert_eq!(Number::parse("-9223372036854775808").to_i64(), Some(i64::MIN));
        assert_eq!(Number::parse("1").to_scaled(38), None);
    }
}
