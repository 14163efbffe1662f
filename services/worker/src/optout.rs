//! Opt-out as the worker sees it: the user's preferences document (SPEC §3, KV
//! `herald_prefs`, key = user token) read before every send, and the one-click
//! unsubscribe written into it (`categories.<category>.email = false`, or
//! `channels.email = false` for mail without a category).
//!
//! Reads and writes the document as JSON, touching only the fields it owns, with
//! compare-and-set, so it composes with the preferences API writing the same document.

use async_nats::jetstream::kv;
use bytes::Bytes;
use herald_protocol::{Channel, UserId};
use serde_json::{Map, Value, json};

/// The preferences bucket.
pub const PREFS_BUCKET: &str = "herald_prefs";

/// Preferences could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("preference store unavailable: {0}")]
pub struct OptOutError(String);

fn err(e: impl std::fmt::Display) -> OptOutError {
    OptOutError(e.to_string())
}

/// Opt-out checks and one-click unsubscribes.
#[derive(Clone)]
pub struct OptOut {
    kv: kv::Store,
}

impl std::fmt::Debug for OptOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OptOut")
    }
}

impl OptOut {
    /// Opens the preferences bucket, creating it when missing.
    ///
    /// # Errors
    /// [`OptOutError`] when NATS fails.
    pub async fn open(js: &async_nats::jetstream::Context) -> Result<Self, OptOutError> {
        let kv = match js.get_key_value(PREFS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: PREFS_BUCKET.into(),
                    history: 1,
                    ..Default::default()
                })
                .await
                .map_err(err)?,
        };
        Ok(Self { kv })
    }

    /// Whether `user` still wants `channel` for `category`.
    ///
    /// # Errors
    /// [`OptOutError`] when NATS fails.
    pub async fn allows(
        &self,
        user: &UserId,
        channel: Channel,
        category: Option<&str>,
    ) -> Result<bool, OptOutError> {
        let Some(doc) = self.kv.get(user.token().as_str()).await.map_err(err)? else {
            return Ok(true);
        };
        let doc: Value = serde_json::from_slice(&doc).unwrap_or(Value::Null);
        Ok(allows(&doc, channel, category))
    }

    /// Opts `user` out of email for `category` (or of email altogether without one).
    ///
    /// # Errors
    /// [`OptOutError`] when NATS fails.
    pub async fn unsubscribe_email(
        &self,
        user: &UserId,
        category: Option<&str>,
    ) -> Result<(), OptOutError> {
        let key = user.token();
        for _ in 0..16 {
            let entry = self.kv.entry(key.as_str()).await.map_err(err)?;
            let (mut doc, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<Value>(&e.value).unwrap_or_else(|_| json!({})),
                    e.revision,
                ),
                Some(e) => (json!({}), e.revision),
                None => (json!({}), 0),
            };
            if !doc.is_object() {
                doc = json!({});
            }
            let (section, name) = match category {
                Some(c) => ("categories", c),
                None => ("channels", "email"),
            };
            let obj = doc.as_object_mut().ok_or_else(|| err("not an object"))?;
            let section = obj
                .entry(section)
                .or_insert_with(|| Value::Object(Map::new()));
            if !section.is_object() {
                *section = Value::Object(Map::new());
            }
            let section = section
                .as_object_mut()
                .ok_or_else(|| err("not an object"))?;
            if category.is_some() {
                let cat = section
                    .entry(name)
                    .or_insert_with(|| Value::Object(Map::new()));
                if !cat.is_object() {
                    *cat = Value::Object(Map::new());
                }
                if let Some(cat) = cat.as_object_mut() {
                    cat.insert("email".into(), Value::Bool(false));
                }
            } else {
                section.insert(name.into(), Value::Bool(false));
            }
            let value = Bytes::from(serde_json::to_vec(&doc).map_err(err)?);
            if revision == 0 {
                match self.kv.create(key.as_str(), value).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(err(e)),
                }
            }
            match self.kv.update(key.as_str(), value, revision).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(err(e)),
            }
        }
        Err(err("too many concurrent preference updates"))
    }
}

/// The SPEC §3 rules for one channel: global opt-out, the channel switch, then the
/// category's switch for the channel.
pub fn allows(doc: &Value, channel: Channel, category: Option<&str>) -> bool {
    if channel != Channel::Inbox && doc["opt_out"] == Value::Bool(true) {
        return false;
    }
    if doc["channels"][channel.as_str()] == Value::Bool(false) {
        return false;
    }
    if let Some(category) = category
        && doc["categories"][category][channel.as_str()] == Value::Bool(false)
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_the_preferences_document() {
        let doc = json!({"channels": {"sms": false},
            "categories": {"marketing": {"email": false}}});
        assert!(allows(&doc, Channel::Email, Some("like")));
        assert!(!allows(&doc, Channel::Email, Some("marketing")));
        assert!(allows(&doc, Channel::Push, Some("marketing")));
        assert!(!allows(&doc, Channel::Sms, None));
        assert!(!allows(&json!({"opt_out": true}), Channel::Push, None));
        assert!(allows(&Value::Null, Channel::Email, Some("x")));
    }
}
