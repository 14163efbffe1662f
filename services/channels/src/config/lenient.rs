//! Strings that survive figment's parsing of environment values.
//!
//! figment's `Env` provider reads `HERALD_VONAGE_API_KEY=12345678` as a number and
//! `HERALD_TWILIO_FROM=+15005550006` as the number 15005550006 (dropping the `+`), then
//! refuses to put either in a `String`. These fields accept numbers too, written back in
//! decimal. That cannot restore leading zeros; [`crate::ENV_KEYS`] documents how to read the
//! variables as raw strings so nothing is lost.

use serde::{Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_text(self) -> (String, bool) {
        match self {
            Self::Text(s) => (s, false),
            Self::Unsigned(n) => (n.to_string(), true),
            Self::Signed(n) => (n.to_string(), true),
            Self::Float(n) => (n.to_string(), true),
            Self::Bool(b) => (b.to_string(), false),
        }
    }
}

/// An optional string that may have been parsed as a number.
pub(super) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Scalar>::deserialize(d)?.map(|s| s.into_text().0))
}

/// A sender: as [`string`], but a number of 8 or more digits lost its `+` on the way (a
/// sender that long is a phone number, and those are E.164); short codes stay as they are.
pub(super) fn sender<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(
        Option::<Scalar>::deserialize(d)?.map(|s| match s.into_text() {
            (digits, true) if digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()) => {
                format!("+{digits}")
            }
            (text, _) => text,
        }),
    )
}

/// An optional number that may arrive as text (a raw environment value).
pub(super) fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<Scalar>::deserialize(d)? {
        None => Ok(None),
        Some(Scalar::Unsigned(n)) => Ok(Some(n)),
        Some(Scalar::Text(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a whole number"))),
        Some(_) => Err(serde::de::Error::custom("expected a whole number")),
    }
}
