//! What the SMS providers share: the text of a message, and their target.

use crate::{Delivery, SendError, Target, phone};

/// The SMS text: title and body on separate lines (either may be absent).
///
/// # Errors
/// [`SendError::Permanent`] when there is nothing to say.
pub fn text(delivery: &Delivery) -> Result<String, SendError> {
    let parts: Vec<&str> = [delivery.title.as_deref(), delivery.body.as_deref()]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        return Err(SendError::Permanent {
            detail: "sms: the notification has neither title nor body".into(),
        });
    }
    Ok(parts.join("\n"))
}

/// The validated E.164 number of a phone target.
///
/// # Errors
/// [`SendError::InvalidTarget`] for a bad number; [`SendError::Permanent`] for a target
/// that is not a phone.
pub fn number<'a>(provider: &str, target: &'a Target) -> Result<&'a str, SendError> {
    match target {
        Target::Phone { e164 } => phone::validate(e164),
        other => Err(SendError::Permanent {
            detail: format!("{provider}: cannot deliver to {}", other.key()),
        }),
    }
}
