//! The single way a notification enters Herald: validate, assign its id, append it to the
//! user's inbox and wait for JetStream's ack. One durable write; the inbox republishes it
//! live and the router consumes it for the other channels.

use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use herald_protocol::notification::check_idempotency_key;
use herald_protocol::{FieldError, NotifyRequest, Policy, StoredNotification, ValidatedNotify};
use herald_store::{AppendAck, Inbox, InboxError};
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// Namespace of idempotent ids: id = UUIDv5(namespace, producer, key).
const IDEMPOTENT_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3c52_9d0e_4b7a_8e21_55c0_f3a9_0d17);

/// A notification JetStream has made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Its id (the first copy's, for a repeated idempotency key).
    pub id: String,
    /// Its inbox position.
    pub seq: u64,
    /// True when this was a repeat of an earlier request.
    pub duplicate: bool,
}

/// Why a notification was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The request is invalid; nothing was written.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The store did not confirm the write; the caller may retry with the same key.
    #[error(transparent)]
    Store(#[from] InboxError),
}

/// Turns requests into durable inbox entries.
#[derive(Clone, Debug)]
pub struct Acceptor {
    inbox: Inbox,
    policy: Arc<Policy>,
}

/// A validated notification with its id, ready to append.
#[derive(Debug, Clone)]
pub struct Prepared {
    stored: StoredNotification,
    bytes: Bytes,
}

impl Prepared {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.stored.id
    }
}

impl Acceptor {
    /// An acceptor appending to `inbox`, accepting any category.
    pub fn new(inbox: Inbox) -> Self {
        Self::with_policy(inbox, Arc::new(Policy::default()))
    }

    /// An acceptor that also checks categories against the configured `policy`.
    pub fn with_policy(inbox: Inbox, policy: Arc<Policy>) -> Self {
        Self { inbox, policy }
    }

    /// The configured categories.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.clone()
    }

    /// The inbox it appends to.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// Validates a JSON body and assigns its id. `key` (header) wins over the body's
    /// `idempotency_key`; `producer` namespaces the key.
    ///
    /// # Errors
    /// [`FieldError`] naming the bad field.
    pub fn prepare(
        &self,
        body: &[u8],
        producer: &str,
        key: Option<&str>,
    ) -> Result<Prepared, FieldError> {
        let request = NotifyRequest::from_json(body)?;
        if let Some(k) = key {
            check_idempotency_key("Idempotency-Key", k)?;
        }
        let validated: ValidatedNotify = request.validate()?;
        if let Some(category) = &validated.category {
            self.policy.check_category("category", category)?;
        }
        let key = key.or(validated.idempotency_key.as_deref());
        let id = match key {
            Some(k) => idempotent_id(producer, k),
            None => Uuid::now_v7(),
        };
        let stored =
            StoredNotification::from_request(validated, id.to_string(), OffsetDateTime::now_utc());
        let bytes = Inbox::encode(&stored).map_err(|e| FieldError::new("body", e.to_string()))?;
        Ok(Prepared { stored, bytes })
    }

    /// Appends and waits for the ack.
    ///
    /// # Errors
    /// [`AcceptError::Store`] unless JetStream confirmed the write.
    pub async fn commit(&self, prepared: Prepared) -> Result<Accepted, AcceptError> {
        let ack = self
            .inbox
            .append(&prepared.stored, prepared.bytes.clone())
            .await?;
        Ok(accepted(prepared, ack))
    }

    /// Sends the append without waiting, for pipelining; pair with [`Acceptor::finish`].
    ///
    /// # Errors
    /// [`AcceptError::Store`] when the publish cannot be sent.
    pub async fn send(&self, prepared: &Prepared) -> Result<PublishAckFuture, AcceptError> {
        Ok(self
            .inbox
            .send(&prepared.stored, prepared.bytes.clone())
            .await?)
    }

    /// Waits for a pipelined append's ack.
    ///
    /// # Errors
    /// [`AcceptError::Store`] unless JetStream confirmed the write.
    pub async fn finish(
        prepared: Prepared,
        ack: PublishAckFuture,
    ) -> Result<Accepted, AcceptError> {
        let ack = ack
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        Ok(accepted(
            prepared,
            AppendAck {
                seq: ack.sequence,
                duplicate: ack.duplicate,
            },
        ))
    }
}

fn accepted(prepared: Prepared, ack: AppendAck) -> Accepted {
    Accepted {
        id: prepared.stored.id,
        seq: ack.seq,
        duplicate: ack.duplicate,
    }
}

/// The id a (producer, idempotency key) pair always maps to.
pub fn idempotent_id(producer: &str, key: &str) -> Uuid {
    let mut name = Vec::with_capacity(producer.len() + key.len() + 1);
    name.extend_from_slice(producer.as_bytes());
    name.push(0);
    name.extend_from_slice(key.as_bytes());
    Uuid::new_v5(&IDEMPOTENT_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::idempotent_id;

    #[test]
    fn idempotent_ids_are_per_producer() {
        assert_eq!(idempotent_id("a", "k"), idempotent_id("a", "k"));
        assert_ne!(idempotent_id("a", "k"), idempotent_id("b", "k"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(idempotent_id("ab", "c"), idempotent_id("a", "bc"));
    }
}
