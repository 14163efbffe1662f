//! E.164 validation of phone targets, before any SMS provider is paid to reject them.
//!
//! Two checks: the strict E.164 *form* (`+`, country code, at most 15 digits, nothing else
//! — what Twilio and Vonage expect), then libphonenumber's metadata (through the
//! `phonenumber` crate) that the number is assignable in its country.

use crate::SendError;

/// Checks `e164` and returns it unchanged.
///
/// # Errors
/// [`SendError::InvalidTarget`] naming what is wrong.
pub fn validate(e164: &str) -> Result<&str, SendError> {
    let invalid = |why: &str| SendError::InvalidTarget {
        detail: format!("phone number {e164:?} {why}"),
    };
    let Some(digits) = e164.strip_prefix('+') else {
        return Err(invalid("must start with + and the country code (E.164)"));
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("may only contain digits after the +"));
    }
    if digits.starts_with('0') || !(8..=15).contains(&digits.len()) {
        return Err(invalid(
            "is not E.164 (a country code, then 8 to 15 digits in all)",
        ));
    }
    let parsed =
        phonenumber::parse(None, e164).map_err(|e| invalid(&format!("does not parse: {e}")))?;
    if !phonenumber::is_valid(&parsed) {
        return Err(invalid("is not a valid number in its country"));
    }
    Ok(e164)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_real_numbers() {
        for ok in [
            "+4915112345678",
            "+14155552671",
            "+447911123456",
            "+33612345678",
        ] {
            assert_eq!(validate(ok).ok(), Some(ok), "{ok}");
        }
    }

    #[test]
    fn rejects_non_e164_and_impossible_numbers() {
        for bad in [
            "",
            "4915112345678",
            "+49 151 12345678",
            "+49-151",
            "+0123456789",
            "+1234",
            "+1234567890123456",
            "+999123456789",
            "+1555",
            "+49abc",
        ] {
            assert!(
                matches!(validate(bad), Err(SendError::InvalidTarget { .. })),
                "{bad:?} should be invalid"
            );
        }
    }
}
