//! Per-user preferences in the `herald_prefs` KV bucket: the sparse document of
//! [`herald_protocol::Preferences`], one key per user token.
//!
//! Reads go to the bucket every time (a direct get, answered by any replica), so a change
//! takes effect for the very next notification on every router and api instance — no
//! cache to invalidate. Updates are compare-and-set, so two writers merging different
//! fields never lose one another's change.

use async_nats::jetstream::kv;
use herald_protocol::preferences::{Preferences, PreferencesPatch};
use herald_protocol::{FieldError, UserId};

/// The preferences bucket.
#[derive(Clone)]
pub struct PreferenceStore {
    store: kv::Store,
    client: async_nats::Client,
}

impl std::fmt::Debug for PreferenceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreferenceStore")
    }
}

/// Why preferences could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PreferencesError {
    /// The patch is invalid once merged (e.g. too many categories).
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// NATS did not answer, or refused.
    #[error("preference store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> PreferencesError {
    PreferencesError::Unavailable(Box::new(e))
}

/// Largest stored preferences document (the bucket's value limit).
pub const MAX_PREFERENCES_BYTES: usize = 64 * 1024;

/// How often a compare-and-set update is retried against concurrent writers.
const CAS_ATTEMPTS: usize = 16;

impl PreferenceStore {
    /// Opens the bucket (provisioning creates it).
    ///
    /// # Errors
    /// [`PreferencesError::Unavailable`] when the bucket is missing or NATS is unreachable.
    pub async fn open(js: &async_nats::jetstream::Context) -> Result<Self, PreferencesError> {
        let store = js
            .get_key_value(herald_protocol::streams::PREFS_BUCKET)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            store,
            client: js.client(),
        })
    }

    /// The preferences of many users in one round trip (a batched direct get of the
    /// bucket's subjects) — what a fan-out uses instead of one read per recipient.
    /// Users without stored preferences map to the empty document.
    ///
    /// # Errors
    /// [`PreferencesError::Unavailable`] when NATS cannot answer.
    pub async fn get_many(
        &self,
        users: &[UserId],
    ) -> Result<std::collections::HashMap<UserId, Preferences>, PreferencesError> {
        read_many(&self.client, users).await
    }

    /// A user's stored preferences; the empty document when they never set any. A
    /// stored document that no longer parses (written by a newer version) reads as
    /// empty rather than blocking delivery, and is logged.
    ///
    /// # Errors
    /// [`PreferencesError::Unavailable`] when NATS cannot answer.
    pub async fn get(&self, user: &UserId) -> Result<Preferences, PreferencesError> {
        let value = self
            .store
            .get(user.token().as_str())
            .await
            .map_err(unavailable)?;
        Ok(value.map(|v| decode(user, &v)).unwrap_or_default())
    }

    /// Merges `patch` into the user's preferences and returns the result.
    ///
    /// # Errors
    /// [`PreferencesError::Invalid`] when the merged document is invalid,
    /// [`PreferencesError::Unavailable`] when NATS fails or writers keep racing.
    pub async fn update(
        &self,
        user: &UserId,
        patch: PreferencesPatch,
    ) -> Result<Preferences, PreferencesError> {
        let key = user.token();
        for _ in 0..CAS_ATTEMPTS {
            let entry = self.store.entry(key.as_str()).await.map_err(unavailable)?;
            let (mut prefs, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    (decode(user, &e.value), e.revision)
                }
                Some(e) => (Preferences::default(), e.revision),
                None => (Preferences::default(), 0),
            };
            patch.clone().apply(&mut prefs)?;
            let bytes: bytes::Bytes = serde_json::to_vec(&prefs).map_err(unavailable)?.into();
            if bytes.len() > MAX_PREFERENCES_BYTES {
                // The store would refuse it; that is the request's doing, not an outage.
                return Err(PreferencesError::Invalid(FieldError::new(
                    "categories",
                    format!(
                        "the preferences would take {} bytes, over {MAX_PREFERENCES_BYTES}; remove category overrides (set them to null)",
                        bytes.len()
                    ),
                )));
            }
            let written = if revision == 0 {
                match self.store.create(key.as_str(), bytes).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(unavailable(e)),
                }
            } else {
                match self.store.update(key.as_str(), bytes, revision).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                    Err(e) => return Err(unavailable(e)),
                }
            };
            if written {
                return Ok(prefs);
            }
            // Another writer got there first: merge again on top of theirs.
        }
        Err(PreferencesError::Unavailable(
            "too many concurrent preference updates; try again".into(),
        ))
    }

    /// Removes a user's preferences (GDPR erase). Returns whether there were any.
    ///
    /// # Errors
    /// [`PreferencesError::Unavailable`] when NATS fails.
    pub async fn erase(&self, user: &UserId) -> Result<bool, PreferencesError> {
        let key = user.token();
        let existed = self
            .store
            .get(key.as_str())
            .await
            .map_err(unavailable)?
            .is_some();
        if existed {
            self.store.purge(key.as_str()).await.map_err(unavailable)?;
        }
        Ok(existed)
    }
}

/// [`PreferenceStore::get_many`] on any connection, without opening the bucket first (for
/// readers that rarely need preferences, e.g. a gateway session localizing a topic).
///
/// # Errors
/// [`PreferencesError::Unavailable`] when NATS cannot answer.
pub async fn read_many(
    client: &async_nats::Client,
    users: &[UserId],
) -> Result<std::collections::HashMap<UserId, Preferences>, PreferencesError> {
    let keys: Vec<String> = users
        .iter()
        .map(|u| u.token().as_str().to_owned())
        .collect();
    let mut found = std::collections::HashMap::new();
    let values = crate::direct::kv_live_many(client, herald_protocol::streams::PREFS_BUCKET, &keys)
        .await
        .map_err(unavailable)?;
    for (token, value) in values {
        if let Ok(user) = herald_protocol::UserToken::decode(&token) {
            let prefs = decode(&user, &value);
            found.insert(user, prefs);
        }
    }
    Ok(users
        .iter()
        .map(|u| (u.clone(), found.remove(u).unwrap_or_default()))
        .collect())
}

fn decode(user: &UserId, raw: &[u8]) -> Preferences {
    serde_json::from_slice(raw).unwrap_or_else(|e| {
        tracing::warn!(user = %user.token().as_str(), error = %e, "unreadable preferences; using defaults");
        Preferences::default()
    })
}
