//! Idempotency keys of HTTP notifies: one record per (producer, key) in the
//! [`KEYS_BUCKET`] KV bucket, holding the notification's id, a hash of the request's body
//! and the shape of the first answer.
//!
//! A record lives for INBOX's dedup window (the bucket's `max_age`, provisioned from the
//! same setting) and is taken as absent once older than the window INBOX has now, so a
//! record never outlives JetStream's memory of its append's `Nats-Msg-Id`: while a record
//! holds, sending the append again with its id is deduplicated; once it is gone the key
//! names a new notification with a new id.
//!
//! Records are written with KV `create`: of two concurrent requests with one key, one
//! writes and the other reads what it wrote.

use async_nats::jetstream::{self, kv};
use herald_protocol::streams::INBOX;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::time::{Duration, Instant};

/// The bucket of idempotency-key records of HTTP notifies.
pub const KEYS_BUCKET: &str = "herald_notify_keys";

/// How long the INBOX dedup window read from the stream is used before it is read again.
const WINDOW_REFRESH: Duration = Duration::from_secs(10);

/// What a request with an idempotency key was first answered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The notification's id.
    pub id: String,
    /// [`body_hash`] of the first request's body.
    pub hash: String,
    /// The first answer was `scheduled` for this time (RFC 3339); `None`: `accepted`,
    /// with the inbox position the append's dedup ack reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<String>,
    /// When it was recorded, Unix milliseconds.
    pub at_ms: i64,
}

/// Who holds a key after [`KeyRecords::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The record passed in, written now at this revision: the key is new (or its
    /// earlier record was older than the window).
    New(u64),
    /// The record an earlier request wrote within the window.
    Held(KeyRecord),
}

/// Why a key could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// NATS did not answer or confirm.
    #[error("idempotency key records unavailable: {0}")]
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// Concurrent requests kept replacing the record; ask again.
    #[error("concurrent requests with this idempotency key")]
    Contended,
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> KeysError {
    KeysError::Unavailable(Box::new(e))
}

/// SHA-256, hex, of a request body's raw bytes: the same request sent again has the same
/// hash; the same JSON spelled differently (other key order, spacing) does not.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The records, and INBOX's dedup window as last read.
pub struct KeyRecords {
    store: kv::Store,
    js: jetstream::Context,
    window: std::sync::Mutex<Option<(Instant, Duration)>>,
}

impl std::fmt::Debug for KeyRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRecords")
    }
}

impl KeyRecords {
    /// Opens the bucket (provisioning creates it).
    ///
    /// # Errors
    /// [`KeysError::Unavailable`] when it is missing or NATS is unreachable.
    pub async fn open(js: &jetstream::Context) -> Result<Self, KeysError> {
        Ok(Self {
            store: js.get_key_value(KEYS_BUCKET).await.map_err(unavailable)?,
            js: js.clone(),
            window: std::sync::Mutex::new(None),
        })
    }

    /// INBOX's dedup window: how long a key names the same notification. Read from the
    /// stream at most every few seconds.
    ///
    /// # Errors
    /// [`KeysError::Unavailable`] when NATS cannot answer.
    pub async fn window(&self) -> Result<Duration, KeysError> {
        if let Some((read, window)) = *self.window.lock().unwrap_or_else(|p| p.into_inner())
            && read.elapsed() < WINDOW_REFRESH
        {
            return Ok(window);
        }
        let mut stream = self.js.get_stream(INBOX).await.map_err(unavailable)?;
        let window = stream
            .info()
            .await
            .map_err(unavailable)?
            .config
            .duplicate_window;
        *self.window.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), window));
        Ok(window)
    }

    /// Records `record` under `key` unless a record younger than the window holds it,
    /// and says which holds.
    ///
    /// # Errors
    /// [`KeysError::Unavailable`] when NATS fails; [`KeysError::Contended`] when
    /// concurrent requests kept replacing an expired record.
    pub async fn claim(&self, key: &str, record: &KeyRecord) -> Result<Claim, KeysError> {
        let bytes: bytes::Bytes = serde_json::to_vec(record).map_err(unavailable)?.into();
        for _ in 0..3 {
            match self.store.create(key, bytes.clone()).await {
                Ok(revision) => return Ok(Claim::New(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(unavailable(e)),
            }
            let Some(entry) = self
                .store
                .entry(key)
                .await
                .map_err(unavailable)?
                .filter(|e| e.operation == kv::Operation::Put)
            else {
                // Expired or removed in between: create again.
                continue;
            };
            if let Ok(held) = serde_json::from_slice::<KeyRecord>(&entry.value) {
                let window = self.window().await?;
                let age_ms = record.at_ms.saturating_sub(held.at_ms);
                if u128::try_from(age_ms).unwrap_or(0) < window.as_millis() {
                    return Ok(Claim::Held(held));
                }
            }
            // Older than the window (the bucket keeps records longer than INBOX now
            // remembers ids), or unreadable: this request's record replaces it.
            match self.store.update(key, bytes.clone(), entry.revision).await {
                Ok(revision) => return Ok(Claim::New(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(KeysError::Contended)
    }

    /// Removes the record this request wrote at `revision` (its request turned out
    /// invalid, so the key stays free for a corrected one); left as it is when another
    /// request replaced it.
    ///
    /// # Errors
    /// [`KeysError::Unavailable`] when NATS fails.
    pub async fn release(&self, key: &str, revision: u64) -> Result<(), KeysError> {
        match self.store.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_record_reads_back_and_the_hash_is_of_the_exact_bytes() {
        let record = super::KeyRecord {
            id: "0190-…".into(),
            hash: super::body_hash(b"{\"a\":1}"),
            send_at: Some("2030-01-01T00:00:00Z".into()),
            at_ms: 7,
        };
        let json = serde_json::to_vec(&record).expect("encodes");
        assert_eq!(
            serde_json::from_slice::<super::KeyRecord>(&json).expect("decodes"),
            record
        );
        assert_eq!(record.hash.len(), 64);
        assert_ne!(
            super::body_hash(b"{\"a\":1}"),
            super::body_hash(b"{\"a\": 1}")
        );
    }
}
