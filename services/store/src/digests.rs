//! Email digests in the HERALD_DIGEST stream: one message per notification waiting for its
//! user's digest, on the user's digest subject (`herald.digest.<part>.<user>`).
//!
//! Why a stream and not a KV document: recording is an append (no compare-and-set between
//! the router's lanes), reading a user's digest is a batched direct get of one subject,
//! and clearing a period is one purge of that subject up to the last entry read, so an
//! entry recorded meanwhile (the next period's) stays. A GDPR erase purges the subject.

use crate::Nats;
use crate::direct;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DeleteMessageErrorKind;
use herald_protocol::digest::DigestEntry;
use herald_protocol::streams::DIGEST;
use herald_protocol::{Subjects, UserId};

/// Entries read per direct-get batch.
const BATCH: usize = 256;

/// Most entries one digest reads (a user's period rarely holds more; the rest stay for
/// the next period).
pub const MAX_ENTRIES: usize = 2_000;

/// Digest entries, per user.
#[derive(Debug, Clone)]
pub struct Digests {
    nats: Nats,
    subjects: Subjects,
}

/// The digest stream could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("digests unavailable")]
pub struct DigestsError(#[source] Box<dyn std::error::Error + Send + Sync>);

fn err(e: impl std::error::Error + Send + Sync + 'static) -> DigestsError {
    DigestsError(Box::new(e))
}

impl Digests {
    /// Digests on `nats` under `subjects`.
    pub fn new(nats: Nats, subjects: Subjects) -> Self {
        Self { nats, subjects }
    }

    /// Records `entry` for `user`'s digest. Idempotent per notification id within the
    /// dedup window (a replayed router records once; a later duplicate is dropped when
    /// the digest is built).
    ///
    /// # Errors
    /// [`DigestsError`] when JetStream does not ack.
    pub async fn record(&self, user: &UserId, entry: &DigestEntry) -> Result<(), DigestsError> {
        let payload = serde_json::to_vec(entry).map_err(err)?;
        let publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("digest:{}", entry.id))
            .expected_stream(DIGEST);
        self.nats
            .js
            .send_publish(self.subjects.digest(user), publish)
            .await
            .map_err(err)?
            .await
            .map_err(err)?;
        Ok(())
    }

    /// `user`'s recorded entries, oldest first, with their stream sequences (up to
    /// [`MAX_ENTRIES`]); undecodable ones are skipped.
    ///
    /// # Errors
    /// [`DigestsError`] when NATS cannot answer.
    pub async fn pending(&self, user: &UserId) -> Result<Vec<(u64, DigestEntry)>, DigestsError> {
        let subject = self.subjects.digest(user);
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let batch = direct::next_batch(&self.nats.consume, DIGEST, &subject, from, BATCH)
                .await
                .map_err(err)?;
            let more = batch.last().and_then(|m| m.pending).is_some_and(|p| p > 0);
            for msg in &batch {
                from = msg.seq + 1;
                match serde_json::from_slice::<DigestEntry>(&msg.payload) {
                    Ok(entry) => out.push((msg.seq, entry)),
                    Err(e) => {
                        tracing::warn!(seq = msg.seq, error = %e, "undecodable digest entry; skipping")
                    }
                }
            }
            if !more || batch.is_empty() || out.len() >= MAX_ENTRIES {
                return Ok(out);
            }
        }
    }

    /// Removes `user`'s entries up to and including stream sequence `up_to` (a digest was
    /// sent for them). Returns how many were removed.
    ///
    /// # Errors
    /// [`DigestsError`] when NATS fails.
    pub async fn clear(&self, user: &UserId, up_to: u64) -> Result<u64, DigestsError> {
        let stream = self.nats.js.get_stream_no_info(DIGEST).await.map_err(err)?;
        let purged = stream
            .purge()
            .filter(self.subjects.digest(user))
            .sequence(up_to.saturating_add(1))
            .await
            .map_err(err)?;
        Ok(purged.purged)
    }

    /// Removes the entries at these stream sequences (a digest listed them while others
    /// of the user, for a later period, stay). Returns how many were removed.
    ///
    /// # Errors
    /// [`DigestsError`] when NATS fails.
    pub async fn remove(&self, seqs: &[u64]) -> Result<u64, DigestsError> {
        let stream = self.nats.js.get_stream_no_info(DIGEST).await.map_err(err)?;
        let mut removed = 0;
        for &seq in seqs {
            match stream.delete_message(seq).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => match e.kind() {
                    // Gone already: a retried digest removes what it removed before.
                    DeleteMessageErrorKind::JetStream(js)
                        if js.error_code() == ErrorCode::NO_MESSAGE_FOUND => {}
                    _ => return Err(err(e)),
                },
            }
        }
        Ok(removed)
    }

    /// Removes every entry of `user` (GDPR erase). Returns how many were removed.
    ///
    /// # Errors
    /// [`DigestsError`] when NATS fails.
    pub async fn erase(&self, user: &UserId) -> Result<u64, DigestsError> {
        let stream = self.nats.js.get_stream_no_info(DIGEST).await.map_err(err)?;
        let purged = stream
            .purge()
            .filter(self.subjects.digest(user))
            .await
            .map_err(err)?;
        Ok(purged.purged)
    }
}
