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

use crate::{Route, Routed};
use async_nats::jetstream::message::PublishMessage;
use herald_protocol::digest::{self, DigestDue, DigestEntry, DigestMail};
use herald_protocol::preferences::Digest;
use herald_protocol::streams::{self, DIGEST_HEADER, INBOX, ROUTE_HEADER};
use herald_protocol::{Channel, ChannelJob, Preferences, Priority, StoredNotification, UserId};
use herald_store::status::{State, Update};
use herald_store::targets::target_id;
use serde_json::{Value, json};
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
    /// period's end is scheduled, and shows `digest` with `rule` in its status.
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
        metrics::counter!("herald_router_digested_total").increment(1);
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
            .header(
                "Nats-Schedule-Target",
                self.subjects.deferred(user).as_str(),
            )
            .header(ROUTE_HEADER, "1")
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
        match self.send_digest(&due, end).await {
            Ok(()) => Routed::Done,
            Err(e) => {
                tracing::warn!(error = %e, "building a digest failed; will retry");
                Routed::Retry
            }
        }
    }

    async fn send_digest(
        &self,
        due: &DigestDue,
        end: jiff::Timestamp,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let user = &due.user_id;
        let prefs = self.preferences.get(user).await?;
        // A digest is email below `high`, like any other: quiet hours hold it back, and it
        // goes when they end, with what is owed then.
        if let Some(until) = prefs.quiet_until(jiff::Timestamp::now()) {
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
        if !unread.is_empty() {
            self.enqueue_digest(due, end, &prefs, &unread).await?;
        }
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

    async fn enqueue_digest(
        &self,
        due: &DigestDue,
        end: jiff::Timestamp,
        prefs: &Preferences,
        unread: &[&DigestEntry],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let user = &due.user_id;
        let tz = prefs.time_zone();
        let items: Vec<Value> = unread
            .iter()
            .map(|e| {
                json!({"id": e.id, "title": e.title, "body": e.body,
                       "category": e.category, "created_at": e.created_at})
            })
            .collect();
        let vars = json!({
            "count": unread.len(),
            "frequency": if due.digest == Digest::Daily { "daily" } else { "hourly" },
            "period_end": end.to_zoned(tz).strftime("%Y-%m-%d %H:%M").to_string(),
            "items": items,
        });
        let Value::Object(vars) = vars else {
            return Ok(());
        };
        let texts = match self
            .routing
            .templates
            .render_digest(prefs.locale.as_deref(), &vars)
        {
            Ok(t) => t,
            Err(e) => {
                // A broken `digest` template must not swallow the digest: the built-in one.
                tracing::warn!(error = %e.message, "the digest template failed; using the built-in one");
                herald_templates::Templates::none().render_digest(prefs.locale.as_deref(), &vars)?
            }
        };
        let mail = DigestMail {
            subject: texts.subject,
            text: texts.text,
            html: texts.html,
            count: unread.len() as u64,
        };
        let targets = self.routing.targets.targets(user, Channel::Email).await?;
        let id = digest::digest_id(user, end.as_second());
        let seq = unread.iter().map(|e| e.seq).max().unwrap_or(0);
        let mut acks = Vec::new();
        for target in targets {
            let job = ChannelJob {
                id: id.clone(),
                seq,
                user_id: user.clone(),
                channel: Channel::Email,
                priority: Priority::Low,
                target: target_id(&target),
                folded: None,
                digest: Some(mail.clone()),
                locale: None,
            };
            let publish = PublishMessage::build()
                .payload(serde_json::to_vec(&job)?.into())
                .message_id(job.msg_id())
                .expected_stream(streams::work_stream_name(Channel::Email));
            acks.push(
                self.nats
                    .js
                    .send_publish(self.subjects.work(Channel::Email, Priority::Low), publish)
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
        metrics::counter!("herald_router_digests_total").increment(1);
        Ok(())
    }
}
