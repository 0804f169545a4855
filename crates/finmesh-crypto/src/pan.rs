//! Card numbers (PANs): validation for buckets with `key_format = "pan"`,
//! and masking wherever a number must be named.
//!
//! Invariants:
//! - [`validate_pan`] accepts exactly the strings of 12–19 ASCII digits that
//!   pass the Luhn check; its errors ([`PanError`]) say what is wrong by
//!   position and count only and never repeat the number, any digit of it,
//!   or the offending character;
//! - [`mask_pan`] shows at most the first 6 and the last 4 characters and
//!   always hides at least 6: shorter strings show less (12 digits: first 2
//!   and last 4; 10: last 4 only; 6 or fewer: nothing). It works on any
//!   string, valid or not, counting characters;
//! - [`Masked`] and [`Redacted`] wrap a sensitive key for `Display` and
//!   `Debug` in logs and messages, so `tracing::info!(key = %Masked(k))`
//!   cannot print it in clear.

use std::fmt;

/// Fewest digits of a card number (ISO/IEC 7812).
pub const MIN_PAN_DIGITS: usize = 12;
/// Most digits of a card number.
pub const MAX_PAN_DIGITS: usize = 19;

/// Why a string is not a card number. The messages never contain the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PanError {
    /// Nothing was given.
    Empty,
    /// The character at this 1-based position is not an ASCII digit.
    NotDigit {
        /// 1-based position of the first character that is not a digit.
        position: usize,
    },
    /// Too few or too many digits.
    Length {
        /// How many digits there are.
        digits: usize,
    },
    /// The check digit does not match (a mistyped or swapped digit).
    Luhn,
}

impl fmt::Display for PanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PanError::Empty => write!(f, "the card number is empty"),
            PanError::NotDigit { position } => write!(
                f,
                "the card number must be digits only (no spaces or dashes); character {position} is not a digit"
            ),
            PanError::Length { digits } => {
                write!(f, "the card number has {digits} digits; a card number has {MIN_PAN_DIGITS} to {MAX_PAN_DIGITS}")
            }
            PanError::Luhn => write!(f, "the card number fails the Luhn check: a digit is mistyped or two are swapped"),
        }
    }
}

impl std::error::Error for PanError {}

impl From<PanError> for finmesh_core::Error {
    fn from(e: PanError) -> Self {
        finmesh_core::Error::invalid(e.to_string())
    }
}

/// Check that `pan` is a card number: 12–19 ASCII digits passing Luhn.
pub fn validate_pan(pan: &str) -> Result<(), PanError> {
    if pan.is_empty() {
        return Err(PanError::Empty);
    }
    if let Some(i) = pan.chars().position(|c| !c.is_ascii_digit()) {
        return Err(PanError::NotDigit { position: i + 1 });
    }
    let digits = pan.len();
    if !(MIN_PAN_DIGITS..=MAX_PAN_DIGITS).contains(&digits) {
        return Err(PanError::Length { digits });
    }
    if !luhn(pan.as_bytes()) {
        return Err(PanError::Luhn);
    }
    Ok(())
}

/// The Luhn (mod 10) check over ASCII digits.
fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// `pan` with all but at most the first 6 and last 4 characters replaced by
/// `*`, hiding at least 6 (see the module doc).
pub fn mask_pan(pan: &str) -> String {
    let n = pan.chars().count();
    let visible = n.saturating_sub(6).min(10);
    let last = visible.min(4);
    let first = (visible - last).min(6);
    pan.chars().enumerate().map(|(i, c)| if i < first || i >= n - last { c } else { '*' }).collect()
}

/// Shows a sensitive key masked as [`mask_pan`] does, in `Display` and `Debug`.
#[derive(Clone, Copy)]
pub struct Masked<'a>(pub &'a str);

impl fmt::Display for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_pan(self.0))
    }
}

impl fmt::Debug for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Masked({:?})", mask_pan(self.0))
    }
}

/// Shows nothing of a sensitive key but its length, in `Display` and `Debug`.
#[derive(Clone, Copy)]
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, {} characters>", self.0.chars().count())
    }
}

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_card_numbers_are_accepted() {
        for pan in [
            "4111111111111111",
            "5555555555554444",
            "378282246310005",
            "6011111111111117",
            "4222222222222",
            "6759649826438453",
        ] {
            assert_eq!(validate_pan(pan), Ok(()), "{pan}");
        }
        assert_eq!(validate_pan("000000000000"), Ok(()), "12 digits, Luhn sum 0");
        assert_eq!(validate_pan("0000000000000000000"), Ok(()), "19 digits");
    }

    #[test]
    fn errors_are_precise_and_never_echo_the_number() {
        let cases = [
            ("", PanError::Empty, "the card number is empty"),
            (
                "4111 1111 1111 1111",
                PanError::NotDigit { position: 5 },
                "digits only (no spaces or dashes); character 5 is not a digit",
            ),
            ("4111-1111-1111-1111", PanError::NotDigit { position: 5 }, "character 5 is not a digit"),
            ("411111111111111１", PanError::NotDigit { position: 16 }, "character 16"),
            ("41111111111", PanError::Length { digits: 11 }, "has 11 digits; a card number has 12 to 19"),
            ("41111111111111111111", PanError::Length { digits: 20 }, "has 20 digits"),
            ("4111111111111112", PanError::Luhn, "fails the Luhn check"),
            ("4111111111111121", PanError::Luhn, "two are swapped"),
        ];
        for (pan, err, text) in cases {
            let e = validate_pan(pan).unwrap_err();
            assert_eq!(e, err, "{pan}");
            let shown = format!("{e} {e:?} {}", finmesh_core::Error::from(e));
            assert!(shown.contains(text), "{shown}");
            assert!(!shown.contains("1111") && !shown.contains('-'), "{shown}");
        }
        assert_eq!(finmesh_core::Error::from(PanError::Luhn).kind(), finmesh_core::ErrorKind::Invalid);
    }

    #[test]
    fn masking_shows_at_most_first_6_and_last_4() {
        for (pan, masked) in [
            ("4111111111111111", "411111******1111"),
            ("4111111111111111111", "411111*********1111"),
            ("378282246310005", "37828******0005"),
            ("123456789012", "12******9012"),
            ("1234567890", "******7890"),
            ("12345678", "******78"),
            ("123456", "******"),
            ("", ""),
        ] {
            assert_eq!(mask_pan(pan), masked, "{pan}");
        }
        assert_eq!(Masked("4111111111111111").to_string(), "411111******1111");
        assert_eq!(format!("{:?}", Masked("4111111111111111")), "Masked(\"411111******1111\")");
        assert_eq!(Redacted("4111111111111111").to_string(), "<redacted, 16 characters>");
        assert_eq!(format!("{:?}", Redacted("abc")), "<redacted, 3 characters>");
    }

    /// `prefix` followed by the digit that makes it pass Luhn.
    fn with_check_digit(prefix: &str) -> String {
        (b'0'..=b'9').map(|d| format!("{prefix}{}", d as char)).find(|p| luhn(p.as_bytes())).unwrap()
    }

    proptest! {
        #[test]
        fn a_mask_hides_at_least_six_and_shows_at_most_first_6_last_4(s in "[0-9a-z]{0,40}") {
            let m = mask_pan(&s);
            let n = s.len();
            prop_assert_eq!(m.len(), n);
            prop_assert!(m.matches('*').count() >= n.min(6));
            for (i, (m, c)) in m.chars().zip(s.chars()).enumerate() {
                if m != '*' {
                    prop_assert_eq!(m, c);
                    prop_assert!(i < 6 || i >= n - 4, "position {} shown", i);
                }
            }
        }

        #[test]
        fn one_changed_digit_fails_luhn(prefix in "[0-9]{11,18}", pos in any::<prop::sample::Index>(), delta in 1u8..10) {
            let pan = with_check_digit(&prefix);
            prop_assert_eq!(validate_pan(&pan), Ok(()));
            let mut bytes = pan.into_bytes();
            let i = pos.index(bytes.len());
            bytes[i] = b'0' + (bytes[i] - b'0' + delta) % 10;
            prop_assert_eq!(validate_pan(std::str::from_utf8(&bytes).unwrap()), Err(PanError::Luhn));
        }
    }
}
