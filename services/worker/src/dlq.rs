//! The dead-letter queue: jobs that failed permanently or ran out of deliveries, kept in
//! the `HERALD_DLQ` stream with the reason and the provider's last answer. An operator
//! lists them (`GET /v1/dlq`) and sends one again (`POST /v1/dlq/{id}/retry`, where the id
//! is the dead letter's stream sequence): the job goes back on its work queue and the
//! dead letter is removed.

use async_nats::jetstream::message::PublishMessage;
use herald_protocol::streams::{self, DLQ};
use herald_protocol::{ChannelJob, Subjects};
use herald_store::Nats;
use serde::{Deserialize, Serialize};

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The job.
    pub job: ChannelJob,
    /// Why it was given up.
    pub reason: String,
    /// The provider's last answer.
    #[serde(default)]
    pub last_response: Option<String>,
    /// The provider last tried.
    #[serde(default)]
    pub provider: Option<String>,
    /// Deliveries made.
    pub attempts: i64,
    /// When (RFC 3339).
    pub failed_at: String,
}

/// A dead letter with its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// Its id (stream sequence).
    pub dlq_id: u64,
    /// The letter.
    #[serde(flatten)]
    pub letter: DeadLetter,
}

/// The DLQ could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// NATS failed.
    #[error("dead-letter queue unavailable: {0}")]
    Nats(String),
    /// No such dead letter.
    #[error("no dead letter {0}")]
    NotFound(u64),
}

fn nats(e: impl std::fmt::Display) -> DlqError {
    DlqError::Nats(e.to_string())
}

/// What [`Dlq::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Stored as the letter with this id.
    Stored(u64),
    /// An earlier delivery of the same work-queue message stored its letter already
    /// (JetStream answered `duplicate`): nothing new was stored. That letter is still
    /// listed, or was retried, which queued a new message for the job.
    Before,
}

/// The `Nats-Msg-Id` of the dead letter of the work-queue message at `work_seq`.
fn letter_id(letter: &DeadLetter, work_seq: u64) -> String {
    format!("dlq:{}:{work_seq}", letter.job.msg_id())
}

/// The dead-letter queue.
#[derive(Debug, Clone)]
pub struct Dlq {
    nats: Nats,
    subjects: Subjects,
}

impl Dlq {
    /// The DLQ on `nats`.
    pub fn new(nats: Nats, subjects: Subjects) -> Self {
        Self { nats, subjects }
    }

    /// Stores the dead letter of the work-queue message at stream sequence `work_seq`
    /// (`None` when the delivery did not say: then stored without deduplication).
    ///
    /// Its identity is that message's: a redelivery of the same message (its term was
    /// lost) finds its letter already stored, and is answered [`Put::Before`]. A job put
    /// back by `POST /v1/dlq/{id}/retry` is a new message, so when it is dead-lettered
    /// again, within the stream's duplicate window too, its letter is stored again. (An
    /// identity by job and delivery count made that second letter a duplicate JetStream
    /// acked without storing it, and the job was terminated: lost.)
    ///
    /// # Errors
    /// [`DlqError`] when JetStream does not ack it.
    pub async fn put(&self, letter: &DeadLetter, work_seq: Option<u64>) -> Result<Put, DlqError> {
        let payload = serde_json::to_vec(letter).map_err(nats)?;
        let mut publish = PublishMessage::build()
            .payload(payload.into())
            .expected_stream(DLQ);
        if let Some(seq) = work_seq {
            publish = publish.message_id(letter_id(letter, seq));
        }
        let ack = self
            .nats
            .js
            .send_publish(
                self.subjects.dlq(letter.job.channel, &letter.job.user_id),
                publish,
            )
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        if ack.duplicate {
            return Ok(Put::Before);
        }
        metrics::counter!("herald_worker_dead_letters_total", "channel" => letter.job.channel.as_str())
            .increment(1);
        Ok(Put::Stored(ack.sequence))
    }

    /// Up to `limit` dead letters, oldest first, after id `after`.
    ///
    /// # Errors
    /// [`DlqError`] when NATS fails.
    pub async fn list(&self, after: u64, limit: usize) -> Result<Vec<Listed>, DlqError> {
        let mut stream = self.nats.js_consume.get_stream(DLQ).await.map_err(nats)?;
        let state = stream.info().await.map_err(nats)?.state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        let mut seq = state.first_sequence.max(after + 1);
        while seq <= state.last_sequence && out.len() < limit {
            match stream.get_raw_message(seq).await {
                Ok(msg) => {
                    if let Ok(letter) = serde_json::from_slice::<DeadLetter>(&msg.payload) {
                        out.push(Listed {
                            dlq_id: seq,
                            letter,
                        });
                    }
                }
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(nats(e)),
            }
            seq += 1;
        }
        Ok(out)
    }

    /// Dead letter `id`.
    ///
    /// # Errors
    /// [`DlqError::NotFound`] when there is no such letter; [`DlqError::Nats`] otherwise.
    pub async fn get(&self, id: u64) -> Result<DeadLetter, DlqError> {
        let stream = self
            .nats
            .js_consume
            .get_stream_no_info(DLQ)
            .await
            .map_err(nats)?;
        let msg = match stream.get_raw_message(id).await {
            Ok(m) => m,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                return Err(DlqError::NotFound(id));
            }
            Err(e) => return Err(nats(e)),
        };
        serde_json::from_slice(&msg.payload).map_err(|_| DlqError::NotFound(id))
    }

    /// Puts dead letter `id`'s job back on its work queue and removes the letter.
    ///
    /// # Errors
    /// [`DlqError::Nats`] when NATS fails.
    pub async fn requeue(&self, id: u64, job: &ChannelJob) -> Result<(), DlqError> {
        let payload = serde_json::to_vec(job).map_err(nats)?;
        let publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("{}:retry:{id}", job.msg_id()))
            .expected_stream(streams::work_stream_name(job.channel));
        self.nats
            .js
            .send_publish(self.subjects.work(job.channel, job.priority), publish)
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        let stream = self
            .nats
            .js_consume
            .get_stream_no_info(DLQ)
            .await
            .map_err(nats)?;
        stream.delete_message(id).await.map_err(nats)?;
        Ok(())
    }
}
