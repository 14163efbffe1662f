//! Scheduled notifications (`send_at`), held by JetStream's own message scheduler
//! (nats-server 2.12+, ADR-51) rather than by any Herald process.
//!
//! A scheduled notification is stored once, in the INBOX stream, on a subject of its own
//! (`herald.sched.<part>.<user-token>.<id>`) with `Nats-Schedule: @at <send_at>` and
//! `Nats-Schedule-Target: <the user's inbox subject>`. At that time the server writes it
//! into the user's inbox — where it gets its `seq`, is republished live and reaches the
//! router like any other — and removes the schedule. Nothing polls, and a restart of any
//! Herald process or of nats-server loses nothing: the schedule is a stored message.
//! Cancelling purges the schedule's subject.

use crate::direct;
use crate::inbox::{Append, Inbox, InboxError};
use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use herald_protocol::StoredNotification;
use herald_protocol::streams::{INBOX, PRODUCER_HEADER};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What cancelling a scheduled notification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// It was pending and will not be sent.
    Cancelled,
    /// No pending schedule with that id for this producer: sent already, cancelled
    /// already, or never scheduled.
    NotPending,
}

impl Inbox {
    /// Sends a schedule for `n` (of [`Inbox::encode`]d bytes) to fire at `at`, on behalf
    /// of `producer` (the only one who may cancel it), and returns the pending ack.
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] when the publish cannot be sent.
    pub async fn send_scheduled(
        &self,
        n: &StoredNotification,
        payload: Bytes,
        at: OffsetDateTime,
        producer: &str,
    ) -> Result<PublishAckFuture, InboxError> {
        self.send_append(self.scheduled_append_of(n, payload, at, producer)?)
            .await
    }

    /// How a schedule for `n` is appended: on its own subject, with the headers that make
    /// the server fire it into the user's inbox at `at`.
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] when `at` cannot be formatted.
    pub fn scheduled_append_of(
        &self,
        n: &StoredNotification,
        payload: Bytes,
        at: OffsetDateTime,
        producer: &str,
    ) -> Result<Append, InboxError> {
        let at = at
            .to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        let mut append = self.append_of(n, payload);
        // The id dedups a retried schedule; the fired message carries no id of its own.
        append.subject = self.subjects().scheduled(&n.user_id, &n.id);
        let headers = &mut append.headers;
        headers.insert("Nats-Schedule", format!("@at {at}"));
        headers.insert("Nats-Schedule-Target", self.entry_subject(n));
        headers.insert(PRODUCER_HEADER, producer);
        // The route marker (when present) is copied onto the fired message, so the router
        // routes it.
        Ok(append)
    }

    /// Cancels the pending scheduled notification `id` of `producer`.
    ///
    /// # Errors
    /// [`InboxError`] when NATS cannot answer.
    pub async fn cancel_scheduled(
        &self,
        id: &str,
        producer: &str,
    ) -> Result<Cancelled, InboxError> {
        let subject = self.subjects().scheduled_by_id(id);
        let Some(pending) = direct::last(&self.nats().consume, INBOX, &subject, None).await? else {
            return Ok(Cancelled::NotPending);
        };
        // Another producer's notification is "not pending" for this one: ids do not leak.
        if pending.headers.get(PRODUCER_HEADER).map(|v| v.as_str()) != Some(producer) {
            return Ok(Cancelled::NotPending);
        }
        let purged = self
            .inbox_stream()
            .await?
            .purge()
            .filter(subject)
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        // Zero: it fired between the look-up and the purge.
        Ok(if purged.purged > 0 {
            Cancelled::Cancelled
        } else {
            Cancelled::NotPending
        })
    }

    /// Removes everything of `user` in the INBOX stream — stored notifications, pending
    /// schedules, and the copies on the user's deferral subject (back from quiet hours, a
    /// group's window, a big topic's hand-over: whole notifications, kept until the
    /// stream's age limit) — for the GDPR erase. Returns how many notifications and
    /// schedules were removed.
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] when NATS fails.
    pub async fn erase(&self, user: &herald_protocol::UserId) -> Result<(u64, u64), InboxError> {
        let stream = self.inbox_stream().await?;
        let purge = |filter: String| {
            let stream = stream.clone();
            async move {
                stream
                    .purge()
                    .filter(filter)
                    .await
                    .map(|r| r.purged)
                    .map_err(|e| InboxError::Unavailable(Box::new(e)))
            }
        };
        // Schedules first: one firing during the erase must not land after the inbox purge.
        let scheduled = purge(self.subjects().scheduled_of(user)).await?;
        purge(self.subjects().deferred(user)).await?;
        purge(self.subjects().deferred_of(user)).await?;
        let stored = purge(self.subjects().inbox(user)).await?;
        Ok((stored, scheduled))
    }

    async fn inbox_stream(&self) -> Result<async_nats::jetstream::stream::Stream<()>, InboxError> {
        self.nats()
            .js
            .get_stream_no_info(INBOX)
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))
    }
}
