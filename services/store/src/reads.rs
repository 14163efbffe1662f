//! Positions per user in a KV bucket: the highest `seq` marked read (`herald_reads`) or
//! seen live (`herald_seen`, from `ack` frames). Only ever moved forward (compare-and-set),
//! so concurrent devices cannot move one back. Writes are batched by [`crate::receipts`].

use async_nats::jetstream::kv;
use herald_protocol::UserId;

/// Per-user positions in one KV bucket (`herald_reads` or `herald_seen`).
#[derive(Clone)]
pub struct ReadPositions {
    store: kv::Store,
    bucket: &'static str,
    /// For batched direct gets ([`ReadPositions::get_many`]).
    client: async_nats::Client,
}

impl std::fmt::Debug for ReadPositions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadPositions({})", self.bucket)
    }
}

/// A read position could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("read position store unavailable")]
pub struct ReadsError(#[source] Box<dyn std::error::Error + Send + Sync>);

/// A stored position: a `seq` as decimal text.
fn parse_position(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

impl ReadPositions {
    /// Opens the read-position bucket (provisioning creates it).
    ///
    /// # Errors
    /// [`ReadsError`] when the bucket is missing or NATS is unreachable.
    pub async fn open(js: &async_nats::jetstream::Context) -> Result<Self, ReadsError> {
        Self::open_bucket(js, herald_protocol::streams::READS_BUCKET).await
    }

    /// Opens the seen-position bucket (`ack` frames; provisioning creates it).
    ///
    /// # Errors
    /// [`ReadsError`] when the bucket is missing or NATS is unreachable.
    pub async fn open_seen(js: &async_nats::jetstream::Context) -> Result<Self, ReadsError> {
        Self::open_bucket(js, herald_protocol::streams::SEEN_BUCKET).await
    }

    async fn open_bucket(
        js: &async_nats::jetstream::Context,
        bucket: &'static str,
    ) -> Result<Self, ReadsError> {
        let store = js
            .get_key_value(bucket)
            .await
            .map_err(|e| ReadsError(Box::new(e)))?;
        Ok(Self {
            store,
            bucket,
            client: js.client(),
        })
    }

    /// The user's read position, 0 when none.
    ///
    /// # Errors
    /// [`ReadsError`] when NATS cannot answer.
    pub async fn get(&self, user: &UserId) -> Result<u64, ReadsError> {
        let value = self
            .store
            .get(user.token().as_str())
            .await
            .map_err(|e| ReadsError(Box::new(e)))?;
        Ok(value.and_then(|v| parse_position(&v)).unwrap_or(0))
    }

    /// The positions of those of `users` who have one, in batched direct gets (one round
    /// trip per 256 users): what a worker's pulled batch needs at once.
    ///
    /// # Errors
    /// [`ReadsError`] when NATS cannot answer.
    pub async fn get_many(
        &self,
        users: &[UserId],
    ) -> Result<std::collections::HashMap<UserId, u64>, ReadsError> {
        let keys: Vec<String> = users
            .iter()
            .map(|u| u.token().as_str().to_owned())
            .collect();
        let values = crate::direct::kv_live_many(&self.client, self.bucket, &keys)
            .await
            .map_err(|e| ReadsError(Box::new(e)))?;
        Ok(values
            .into_iter()
            .filter_map(|(token, value)| {
                let user = herald_protocol::UserToken::decode(&token).ok()?;
                Some((user, parse_position(&value)?))
            })
            .collect())
    }

    /// Removes the user's read position (GDPR erase). Returns whether there was one.
    ///
    /// # Errors
    /// [`ReadsError`] when NATS cannot answer.
    pub async fn erase(&self, user: &UserId) -> Result<bool, ReadsError> {
        let key = user.token();
        let existed = self
            .store
            .get(key.as_str())
            .await
            .map_err(|e| ReadsError(Box::new(e)))?
            .is_some();
        if existed {
            self.store
                .purge(key.as_str())
                .await
                .map_err(|e| ReadsError(Box::new(e)))?;
        }
        Ok(existed)
    }

    /// Moves the read position forward to `up_to`; a lower value changes nothing.
    /// Returns the position now stored.
    ///
    /// # Errors
    /// [`ReadsError`] when NATS cannot answer.
    pub async fn advance(&self, user: &UserId, up_to: u64) -> Result<u64, ReadsError> {
        let key = user.token();
        loop {
            let entry = self
                .store
                .entry(key.as_str())
                .await
                .map_err(|e| ReadsError(Box::new(e)))?;
            let (current, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                    e.revision,
                ),
                Some(e) => (0, e.revision),
                None => (0, 0),
            };
            if up_to <= current {
                return Ok(current);
            }
            let value: bytes::Bytes = up_to.to_string().into_bytes().into();
            if revision == 0 {
                match self.store.create(key.as_str(), value).await {
                    Ok(_) => return Ok(self.written(up_to)),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(ReadsError(Box::new(e))),
                }
            } else {
                match self.store.update(key.as_str(), value, revision).await {
                    Ok(_) => return Ok(self.written(up_to)),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                    Err(e) => return Err(ReadsError(Box::new(e))),
                }
            }
            // Lost a race with another device: read again and retry.
        }
    }

    fn written(&self, up_to: u64) -> u64 {
        metrics::counter!("herald_positions_kv_writes_total", "bucket" => self.bucket).increment(1);
        up_to
    }
}
