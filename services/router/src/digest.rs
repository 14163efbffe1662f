//! Email digests in the router (see [`herald_protocol::digest`]).
//!
//! A notification whose email goes to a digest — its user chose `hourly` or `daily`, or a
//! rate cap with `over = "digest"` caught it — is recorded in the user's digest and one
//! JetStream schedule per (user, period) is written for the period's end, on the user's
//! schedule subject (`…sched.<part>.<user>.d-<unix>`, so a GDPR erase removes it with the
//! rest). It fires into the partition's deferred subject with the `Herald-Digest` header,
//! so the router that owns the user builds the one email: what was recorded up to that
//! period and is still unread (not read, not acked live), rendered with the `digest`
//! template in the user's locale, enqueued on the email work queue with a `Nats-Msg-Id`
//! per (user, period, target) — and only then is the period cleared. A replay finds
//! either the same entries (the same job id: dropped as a duplicate, or acked by the
//! worker's sent marker) or none.
//!
//! `high` notifications and critical categories are never held for a digest.

mod mail;

use crate::{Route, Routed};
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt as _;
use herald_protocol::digest::{self, DigestDue, DigestEntry, DigestMail};
use herald_protocol::preferences::Digest;
use herald_protocol::streams::{self, DIGEST_HEADER, INBOX, ROUTE_HEADER};
use herald_protocol::{Channel, ChannelJob, Preferences, Priority, StoredNotification, UserId};
use herald_store::status::{State, Update};
use herald_store::targets::{TargetsError, target_id};
use std::collections::HashSet;

/// Whether a message is the end of a digest period.
pub(crate) fn is_due(msg: &async_nats::jetstream::Message) -> bool {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(DIGEST_HEADER))
        .is_some()
}

impl Route {
    /// Whether `stored`'s email waits for `prefs`' digest rather than going out now.
    pub(crate) fn digest_applies(&self, stored: &StoredNotification, prefs: &Preferences) -> bool {
        prefs.digest != Digest::Off
            && stored.priority != Priority::High
            && !stored
                .category
                .as_deref()
                .and_then(|c| self.policy.category(c))
                .is_some_and(|r| r.critical)
    }

    /// Records `stored`'s email into the user's `frequency` digest, makes sure the
    /// period's end is scheduled, and shows `digest` with `rule` in its status. Idempotent,
    /// so a routing retry runs it again; the caller counts it once.
    ///
    /// # Errors
    /// When NATS fails (the caller retries in place).
    pub(crate) async fn hold_for_digest(
        &self,
        stored: &StoredNotification,
        seq: u64,
        prefs: &Preferences,
        frequency: Digest,
        rule: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let now = jiff::Timestamp::now();
        let Some(end) = digest::period_end(
            frequency,
            &prefs.time_zone(),
            now,
            self.policy.digest().for_user(prefs.digest_hour),
        ) else {
            return Ok(());
        };
        let entry = DigestEntry {
            id: stored.id.clone(),
            seq,
            period_end: end.to_string(),
            title: stored.title.clone(),
            body: stored.body.clone(),
            category: stored.category.clone(),
            created_at: stored.created_at.clone(),
        };
        self.digests.record(&stored.user_id, &entry).await?;
        self.schedule_due(&stored.user_id, frequency, end, end)
            .await?;
        let when = match frequency {
            Digest::Daily => "daily",
            _ => "hourly",
        };
        self.record(
            stored,
            seq,
            vec![(Channel::Email, "none".to_string())],
            Update::state(State::Digest).because(format!("{rule}: {when} email digest at {end}")),
        )
        .await;
        Ok(())
    }

    /// One schedule per (user, period): the subject names the period, and JetStream keeps
    /// one schedule per subject, so writing it again for each entry replaces it with the
    /// same one. It fires `at` the period's `end`, or later when quiet hours held it back.
    async fn schedule_due(
        &self,
        user: &UserId,
        frequency: Digest,
        end: jiff::Timestamp,
        at: jiff::Timestamp,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let due = DigestDue {
            user_id: user.clone(),
            digest: frequency,
            period_end: end.to_string(),
        };
        let id = if at == end {
            format!("d-{}", end.as_second())
        } else {
            format!("d-{}-{}", end.as_second(), at.as_second())
        };
        let publish = PublishMessage::build()
            .payload(serde_json::to_vec(&due)?.into())
            .message_id(format!("digest-due:{}:{id}", user.token()))
            .expected_stream(INBOX)
            .header("Nats-Schedule", format!("@at {at}").as_str())
            // The digest email goes on the `low` lane; so does the work of building it.
            .header(
                "Nats-Schedule-Target",
                self.subjects.deferred_in(user, Priority::Low).as_str(),
            )
            .header(ROUTE_HEADER, "1")
            .header(crate::deferral::UNTIL_HEADER, at.to_string().as_str())
            .header(DIGEST_HEADER, end.to_string().as_str());
        self.nats
            .js
            .send_publish(self.subjects.scheduled(user, &id), publish)
            .await?
            .await?;
        Ok(())
    }

    /// A digest period ended: one email of what the user missed, then clear the period.
    pub(crate) async fn digest_due(&self, msg: &async_nats::jetstream::Message) -> Routed {
        let due: DigestDue = match serde_json::from_slice(&msg.payload) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable digest schedule; skipping");
                return Routed::Done;
            }
        };
        let Ok(end) = due.period_end.parse::<jiff::Timestamp>() else {
            tracing::warn!(period_end = %due.period_end, "digest schedule without a valid period end; skipping");
            return Routed::Done;
        };
        match self
            .send_digest(&due, end, crate::deferral::scheduled_for(msg))
            .await
        {
            Ok(()) => Routed::Done,
            Err(e) => {
                tracing::warn!(error = %e, "building a digest failed; will retry");
                Routed::Retry
            }
        }
    }

    /// Sends the digest of the period ending at `end` and clears the period. Only NATS
    /// trouble is an error (the period is tried again); an email that can never be
    /// sent ([`DigestFailure::Unsendable`]) is logged, recorded as `failed` on what it listed, and
    /// cleared like a sent one — retrying it would hold up the partition's lane for
    /// every user behind it, forever.
    async fn send_digest(
        &self,
        due: &DigestDue,
        end: jiff::Timestamp,
        back_from: Option<jiff::Timestamp>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let user = &due.user_id;
        let prefs = self.preferences.get(user).await?;
        // A digest is email below `high`, like any other: quiet hours hold it back, and it
        // goes when they end, with what is owed then.
        if let Some(until) = crate::deferral::still_quiet(&prefs, jiff::Timestamp::now(), back_from)
        {
            self.schedule_due(user, due.digest, end, until).await?;
            tracing::debug!(user = %user.as_str(), %until, "digest held for quiet hours");
            return Ok(());
        }
        let entries = self.digests.pending(user).await?;
        // This period's and any earlier one's (a period whose schedule was lost); a later
        // period's entries wait for their own schedule.
        let owed: Vec<&(u64, DigestEntry)> = entries
            .iter()
            .filter(|(_, e)| {
                e.period_end
                    .parse::<jiff::Timestamp>()
                    .map_or(true, |p| p <= end)
            })
            .collect();
        let Some(up_to) = owed.iter().map(|(s, _)| *s).max() else {
            return Ok(());
        };
        let read = self.reads.get(user).await?.max(self.seen.get(user).await?);
        let mut ids = HashSet::new();
        let unread: Vec<&DigestEntry> = owed
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.seq > read && ids.insert(e.id.as_str()))
            .collect();
        // Preferences as they are now: a category's email switched off during the
        // period (an unsubscribe link, a settings page) leaves its entries out.
        let mut wanted = Vec::new();
        let mut refused = Vec::new();
        for e in unread {
            match self
                .policy
                .decide(&prefs, e.category.as_deref(), Channel::Email)
            {
                Ok(()) => wanted.push(e),
                Err(why) => refused.push((
                    e,
                    Update::state(State::Skipped).because(format!("opted out: {}", why.rule)),
                )),
            }
        }
        let unread = wanted;
        // The run's id: the period, and the entries it found (a replay finds the same).
        let first = owed.iter().map(|(s, _)| *s).min().unwrap_or(up_to);
        let run = run_id(user, end.as_second(), first, up_to);
        if !unread.is_empty() {
            match self.enqueue_digest(due, end, &run, &prefs, &unread).await {
                Ok(()) => {}
                Err(DigestFailure::Nats(e)) => return Err(e),
                Err(DigestFailure::Unsendable(why)) => {
                    metrics::counter!("herald_router_digests_failed_total").increment(1);
                    tracing::error!(
                        user = %user.as_str(),
                        period_end = %due.period_end,
                        listed = unread.len(),
                        "digest email dropped: {why}"
                    );
                    let failed =
                        Update::state(State::Failed).because(format!("digest email: {why}"));
                    let listed = unread.iter().map(|e| (*e, failed.clone())).collect();
                    self.record_entries(user, listed).await;
                }
            }
        }
        self.record_entries(user, refused).await;
        // One purge up to the last listed entry, unless an entry of a later period lies
        // below it (the user changed frequency, hour or zone): then only the listed go.
        let later_below = entries
            .iter()
            .any(|(seq, _)| *seq < up_to && !owed.iter().any(|(listed, _)| listed == seq));
        let cleared = if later_below {
            let listed: Vec<u64> = owed.iter().map(|(seq, _)| *seq).collect();
            self.digests.remove(&listed).await?
        } else {
            self.digests.clear(user, up_to).await?
        };
        tracing::debug!(user = %user.as_str(), listed = unread.len(), cleared, "digest period closed");
        Ok(())
    }

    /// Records each update on the email status of its entry (a few at a time: a digest
    /// may hold thousands). Status is for people; a failure is only logged.
    async fn record_entries(&self, user: &UserId, updates: Vec<(&DigestEntry, Update)>) {
        let status = &self.routing.status;
        futures::stream::iter(updates)
            .for_each_concurrent(16, |(e, update)| async move {
                let none = [(Channel::Email, "none".to_string())];
                if let Err(err) = status.record_many(&e.id, user, e.seq, &none, update).await {
                    tracing::warn!(seq = e.seq, error = %err, "recording delivery status failed");
                }
            })
            .await;
    }

    async fn enqueue_digest(
        &self,
        due: &DigestDue,
        end: jiff::Timestamp,
        run: &str,
        prefs: &Preferences,
        unread: &[&DigestEntry],
    ) -> Result<(), DigestFailure> {
        let user = &due.user_id;
        let targets = match self.routing.targets.targets(user, Channel::Email).await {
            Ok(t) => t,
            Err(TargetsError::Nats(e)) => return Err(DigestFailure::Nats(e.into())),
            // A contact record this process cannot open stays so until an operator acts.
            Err(e) => return Err(DigestFailure::Unsendable(e.to_string())),
        };
        if targets.is_empty() {
            return Ok(());
        }
        let id = run.to_owned();
        let seq = unread.iter().map(|e| e.seq).max().unwrap_or(0);
        let job = |target: String, mail: DigestMail| ChannelJob {
            id: id.clone(),
            seq,
            user_id: user.clone(),
            channel: Channel::Email,
            priority: Priority::Low,
            target,
            folded: None,
            digest: Some(mail),
            locale: None,
        };
        let limit = job_limit();
        let input = mail::DigestInput {
            locale: prefs.locale.as_deref(),
            frequency: if due.digest == Digest::Daily {
                "daily"
            } else {
                "hourly"
            },
            period_end: end
                .to_zoned(prefs.time_zone())
                .strftime("%Y-%m-%d %H:%M")
                .to_string(),
            unread,
        };
        let mail = mail::build(&self.routing.templates, &input, |mail| {
            // Every target id has the same length.
            serde_json::to_vec(&job("0".repeat(32), mail.clone())).is_ok_and(|j| j.len() <= limit)
        })
        .map_err(|e| {
            DigestFailure::Unsendable(format!(
                "the built-in digest failed to render: {}",
                e.message
            ))
        })?;
        let mut acks = Vec::new();
        for target in targets {
            let job = job(target_id(&target), mail.clone());
            let payload =
                serde_json::to_vec(&job).map_err(|e| DigestFailure::Unsendable(e.to_string()))?;
            let size = payload.len();
            let publish = PublishMessage::build()
                .payload(payload.into())
                .message_id(job.msg_id())
                .expected_stream(streams::work_stream_name(Channel::Email));
            let ack = self
                .nats
                .js
                .send_publish(self.subjects.work(Channel::Email, Priority::Low), publish)
                .await
                .map_err(|e| DigestFailure::from_publish(e, size))?;
            acks.push((ack, size));
        }
        for (ack, size) in acks {
            ack.await
                .map_err(|e| DigestFailure::from_publish(e, size))?;
        }
        metrics::counter!("herald_router_digests_total").increment(1);
        Ok(())
    }
}

/// The job id of one digest run: `digest-<period end>-<first listed DIGEST seq>-<up_to>-<user
/// token>`. A replay of the run finds the same entries, so the same id (deduplicated, or
/// acked by the worker's sent marker); a second run for the same period — entries that
/// landed after the first run cleared its own — gets a new id, so its email is sent
/// rather than taken for the first's and cleared unsent.
fn run_id(user: &UserId, period_end: i64, first: u64, up_to: u64) -> String {
    let token = user.token();
    format!("digest-{period_end}-{first}-{up_to}-{token}")
}

/// Most bytes a digest job may take: the email work stream's maximum message size
/// ([`streams::work_stream`]), less room for the publish's headers.
fn job_limit() -> usize {
    let spec = streams::work_stream(
        &herald_protocol::Subjects::default(),
        &streams::StreamSettings::default(),
        Channel::Email,
    );
    usize::try_from(spec.max_msg_size)
        .unwrap_or(64 * 1024)
        .saturating_sub(HEADER_ROOM)
}

/// Bytes kept for a job's headers (`Nats-Msg-Id` names the user's token: up to ~200).
const HEADER_ROOM: usize = 1024;

/// Why a digest email was not enqueued.
#[derive(Debug)]
enum DigestFailure {
    /// NATS trouble: the period is tried again.
    Nats(Box<dyn std::error::Error + Send + Sync>),
    /// It can never be enqueued as it is (what an operator must do is in the text).
    Unsendable(String),
}

impl DigestFailure {
    /// A refused publish: too big for the queue is for good, anything else is not.
    fn from_publish(e: PublishError, size: usize) -> Self {
        if crate::too_big(&e) {
            Self::Unsendable(format!(
                "its job of {size} bytes is over the email work queue's maximum message size; \
                 raise max_msg_size of the {} stream or shorten the digest template",
                streams::work_stream_name(Channel::Email)
            ))
        } else {
            Self::Nats(Box::new(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_for_a_period_gets_its_own_id_a_replay_the_same() {
        let ann = UserId::new("ann").expect("an id");
        let first = run_id(&ann, 3600, 10, 14);
        assert_eq!(first, run_id(&ann, 3600, 10, 14), "a replay");
        assert_ne!(first, run_id(&ann, 3600, 15, 15), "a second run");
        assert_ne!(first, run_id(&ann, 7200, 10, 14), "another period");
        let bob = UserId::new("bob").expect("an id");
        assert_ne!(first, run_id(&bob, 3600, 10, 14), "another user");
        assert!(first.starts_with("digest-3600-"), "{first}");
    }
}
