//! Rate caps, counted in the `herald_caps` KV bucket so every router instance sees the
//! same counts: one key per (cap, fixed window, producer, user, category), incremented
//! with compare-and-set. Fixed windows are exact within a window and cheap (one key per
//! active tuple, expiring with the bucket's max age); a burst may straddle two windows.
//!
//! One round trip per increment in the steady state: the router that owns a user is the
//! only writer of that user's counters, so it remembers each counter's last (count,
//! revision) and writes `count + 1` against that revision straight away. Compare-and-set
//! keeps it exact: if anyone else wrote in between (another instance after a partition
//! moved), the write is refused and the counter is read again, as without the memory. A
//! remembered count at the limit is final for its window, since counts only grow.

use async_nats::jetstream::kv;
use herald_protocol::UserId;
use herald_protocol::preferences::RateCap;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most attempts at an increment against concurrent writers.
const CAS_ATTEMPTS: usize = 16;

/// Counters remembered at most; past it the memory starts over (windows roll anyway).
const REMEMBERED: usize = 65_536;

/// The caps and their counters.
#[derive(Clone)]
pub struct RateCaps {
    store: kv::Store,
    caps: Vec<RateCap>,
    /// Counter key → (count, revision) as this process last wrote or read it.
    last: Arc<Mutex<HashMap<String, (u32, u64)>>>,
}

impl std::fmt::Debug for RateCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateCaps")
            .field("caps", &self.caps)
            .finish()
    }
}

/// A counter could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("rate cap counters unavailable")]
pub struct CapsError(#[source] Box<dyn std::error::Error + Send + Sync>);

/// What the caps said about one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapDecision {
    /// Under every cap (and now counted).
    Within,
    /// Over this cap: `limit` per `window_s` seconds.
    Over(RateCap),
}

impl RateCaps {
    /// Opens the bucket (provisioning creates it).
    ///
    /// # Errors
    /// [`CapsError`] when it is missing or NATS is unreachable.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        caps: Vec<RateCap>,
    ) -> Result<Self, CapsError> {
        let store = js
            .get_key_value(herald_protocol::streams::CAPS_BUCKET)
            .await
            .map_err(|e| CapsError(Box::new(e)))?;
        Ok(Self {
            store,
            caps,
            last: Arc::default(),
        })
    }

    /// Whether any cap is configured.
    pub fn is_empty(&self) -> bool {
        self.caps.is_empty()
    }

    /// Counts one interrupting notification against every cap that applies, at `now`
    /// (unix seconds); the first cap already full wins and nothing more is counted.
    ///
    /// # Errors
    /// [`CapsError`] when NATS fails.
    pub async fn admit(
        &self,
        producer: Option<&str>,
        user: &UserId,
        category: Option<&str>,
        now: u64,
    ) -> Result<CapDecision, CapsError> {
        for (index, cap) in self.caps.iter().enumerate() {
            if !cap.applies(producer, category) || cap.window_s == 0 {
                continue;
            }
            let window = now / cap.window_s;
            let key = key(index, window, producer, user, category);
            if !self.increment(&key, cap.limit).await? {
                return Ok(CapDecision::Over(cap.clone()));
            }
        }
        Ok(CapDecision::Within)
    }

    /// Adds one to `key` unless it is at `limit`; false when it was.
    fn remembered(&self, key: &str) -> Option<(u32, u64)> {
        self.last.lock().ok()?.get(key).copied()
    }

    fn remember(&self, key: &str, count: u32, revision: u64) {
        if let Ok(mut last) = self.last.lock() {
            if last.len() >= REMEMBERED {
                last.clear();
            }
            last.insert(key.to_owned(), (count, revision));
        }
    }

    async fn increment(&self, key: &str, limit: u32) -> Result<bool, CapsError> {
        let err = |e: Box<dyn std::error::Error + Send + Sync>| CapsError(e);
        if let Some((count, revision)) = self.remembered(key) {
            if count >= limit {
                return Ok(false);
            }
            let value: bytes::Bytes = (count + 1).to_string().into_bytes().into();
            match self.store.update(key, value, revision).await {
                Ok(revision) => {
                    self.remember(key, count + 1, revision);
                    return Ok(true);
                }
                // Written elsewhere meanwhile: read it, as below.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(err(Box::new(e))),
            }
        }
        for _ in 0..CAS_ATTEMPTS {
            let entry = self.store.entry(key).await.map_err(|e| err(Box::new(e)))?;
            let (count, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok())
                        .unwrap_or(0),
                    e.revision,
                ),
                Some(e) => (0, e.revision),
                None => (0, 0),
            };
            if count >= limit {
                self.remember(key, count, revision);
                return Ok(false);
            }
            let value: bytes::Bytes = (count + 1).to_string().into_bytes().into();
            let written = if revision == 0 {
                match self.store.create(key, value).await {
                    Ok(revision) => Some(revision),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                    Err(e) => return Err(err(Box::new(e))),
                }
            } else {
                match self.store.update(key, value, revision).await {
                    Ok(revision) => Some(revision),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => None,
                    Err(e) => return Err(err(Box::new(e))),
                }
            };
            if let Some(revision) = written {
                self.remember(key, count + 1, revision);
                return Ok(true);
            }
        }
        Err(err("too many concurrent updates of one rate cap".into()))
    }
}

/// `c<cap>.<window>.<hash>`: valid as a KV key whatever the ids contain.
fn key(
    index: usize,
    window: u64,
    producer: Option<&str>,
    user: &UserId,
    category: Option<&str>,
) -> String {
    let mut hash = Sha256::new();
    for part in [
        producer.unwrap_or(""),
        user.as_str(),
        category.unwrap_or(""),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    format!("c{index}.{window}.{}", hex::encode(&hash.finalize()[..16]))
}
