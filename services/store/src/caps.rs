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
//! remembered count at the limit is final for its window, since counts only grow (a
//! process takes back only a count of its own, from an attempt that another writer
//! interrupted; see [`RateCaps::admit`]).

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
    /// (unix seconds) — or, when any of them is full, against none: a notification the
    /// caps suppress uses up no other cap's allowance. Two phases: every counter is read
    /// (or remembered) and the first full cap decides `Over`; only then is each counter
    /// written with compare-and-set against what was read. A write refused because
    /// another process counted meanwhile takes back this attempt's writes and decides
    /// again on fresh reads.
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
        let counters: Vec<(&RateCap, String)> = self
            .caps
            .iter()
            .enumerate()
            .filter(|(_, cap)| cap.applies(producer, category) && cap.window_s > 0)
            .map(|(index, cap)| {
                let window = now / cap.window_s;
                (cap, key(index, window, producer, user, category))
            })
            .collect();
        'attempt: for _ in 0..CAS_ATTEMPTS {
            let mut read = Vec::with_capacity(counters.len());
            for (cap, key) in &counters {
                let (count, revision) = match self.remembered(key) {
                    Some(last) => last,
                    None => self.read(key).await?,
                };
                if count >= cap.limit {
                    return Ok(CapDecision::Over((*cap).clone()));
                }
                read.push((count, revision));
            }
            let mut written = Vec::with_capacity(counters.len());
            for ((_, key), (count, revision)) in counters.iter().zip(read) {
                match self.put(key, count + 1, revision).await? {
                    Some(revision) => {
                        self.remember(key, count + 1, revision);
                        written.push(key);
                    }
                    None => {
                        self.forget(key);
                        for key in written {
                            self.take_back(key).await?;
                        }
                        continue 'attempt;
                    }
                }
            }
            return Ok(CapDecision::Within);
        }
        Err(CapsError(
            "too many concurrent updates of one rate cap".into(),
        ))
    }

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

    fn forget(&self, key: &str) {
        if let Ok(mut last) = self.last.lock() {
            last.remove(key);
        }
    }

    /// A counter's stored count and revision (0 and 0 when it was never written).
    async fn read(&self, key: &str) -> Result<(u32, u64), CapsError> {
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|e| CapsError(Box::new(e)))?;
        Ok(match &entry {
            Some(e) if e.operation == kv::Operation::Put => (
                std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .unwrap_or(0),
                e.revision,
            ),
            Some(e) => (0, e.revision),
            None => (0, 0),
        })
    }

    /// Writes `count` to `key` if its revision is still `revision`; the new revision, or
    /// `None` when another writer came first.
    async fn put(&self, key: &str, count: u32, revision: u64) -> Result<Option<u64>, CapsError> {
        let err = |e: Box<dyn std::error::Error + Send + Sync>| CapsError(e);
        let value: bytes::Bytes = count.to_string().into_bytes().into();
        if revision == 0 {
            match self.store.create(key, value).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(err(Box::new(e))),
            }
        } else {
            match self.store.update(key, value, revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(err(Box::new(e))),
            }
        }
    }

    /// Takes back one count this process wrote to `key` a moment ago.
    async fn take_back(&self, key: &str) -> Result<(), CapsError> {
        for _ in 0..CAS_ATTEMPTS {
            let (count, revision) = self.read(key).await?;
            if count == 0 {
                return Ok(());
            }
            if let Some(revision) = self.put(key, count - 1, revision).await? {
                self.remember(key, count - 1, revision);
                return Ok(());
            }
        }
        Err(CapsError(
            "too many concurrent updates of one rate cap".into(),
        ))
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
