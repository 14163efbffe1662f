//! One job, from pull to ack: the decisions that make delivery exactly-once as far as a
//! provider allows, and retries follow the error class. [`crate::batch`] reads the sent
//! markers and the per-user state of a pulled batch at once and hands each job here.
//!
//! 1. A sent marker for the job means a provider accepted it before (the worker died
//!    before its ack reached NATS): ack, do not send again.
//! 2. Push waits `escalation_delay` after acceptance (a nak with that delay on the first
//!    delivery, no polling), then skips the push if the user acked it as seen live.
//! 3. Content from the inbox by `seq` (a direct get, confirmed by the stream leader before
//!    the job is dropped as gone; or the folded text of an aggregation group the job
//!    carries), the target from the user's targets by id.
//! 4. The first provider of the channel that accepts the target and whose circuit admits
//!    a call, after a token of its bucket.
//!    While it waits for that token and for the provider's answer, the job tells
//!    JetStream every third of `AckWait` that it is in progress, so it is not
//!    redelivered however long the wait. Once the worker stops, a job that has not begun
//!    its call goes back to the queue instead: the drain finishes calls under way only.
//! 5. Accepted: sent marker, then ack. Throttled: nak with the provider's `Retry-After`
//!    (and the provider is left alone that long by every job, unless the throttle was
//!    about this target only, as APNs `TooManyRequests` is about one device).
//!    Transient: nak with exponential back-off and full jitter. Permanent: dead letter and
//!    term. Invalid target: remove the target and term. The last allowed delivery of a
//!    retryable failure goes to the dead-letter queue instead.
//!
//! Acks are not confirmed (no `double_ack` round trip): the sent marker, written and
//! acknowledged by JetStream before the ack is sent, is what guards against a second
//! send. An ack lost on the way only brings the job back after `AckWait`, and that
//! delivery finds the marker and is acked without sending. A successful send records its
//! status through the marker alone ([`herald_store::StatusStore::get`] merges it), so the
//! send path writes once.

use crate::batch::UserView;
use crate::dlq::{DeadLetter, Dlq, Put};
use crate::providers::SendResult;
use crate::runtime::{WorkerConfig, WorkerDeps};
use async_nats::jetstream::AckKind;
use async_nats::jetstream::Message;
use herald_channels::{Delivery, SendError, Target};
use herald_protocol::notification::format_time;
use herald_protocol::{Channel, ChannelJob, StoredNotification};
use herald_store::InboxEntry as Entry;
use herald_store::status::{SentMarker, State, Update};
use herald_store::targets::target_id;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Everything a job handler shares.
pub struct Context {
    /// Configuration.
    pub config: WorkerConfig,
    /// Dependencies.
    pub deps: WorkerDeps,
    /// The inbox (each job's content by `seq`).
    pub inbox: herald_store::Inbox,
    /// Seen-live positions (`ack` frames), for push escalation.
    pub seen: herald_store::ReadPositions,
    /// Dead letters.
    pub dlq: Dlq,
    /// Keys of the jobs this worker is working on: a copy redelivered while the first is
    /// still here (its ack wait ran out) waits instead of being sent a second time.
    pub in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Cancelled when the worker stops (SIGTERM): a job that has not begun its provider
    /// call by then goes back to the queue instead ([`Step::send`]).
    pub stop: tokio_util::sync::CancellationToken,
}

/// How long a provider that throttled us without a `Retry-After` is left alone.
const DEFAULT_THROTTLE_PAUSE: Duration = Duration::from_secs(1);

/// The default delay before retrying a job whose state could not be read (NATS trouble);
/// see [`WorkerConfig::store_retry`].
pub const STORE_RETRY: Duration = Duration::from_secs(2);

/// A pulled job, decoded.
pub struct Pulled {
    /// The message (to ack, nak or term).
    pub msg: Message,
    /// The job.
    pub job: ChannelJob,
    /// Deliveries so far, this one included.
    pub delivered: i64,
    /// When it was enqueued.
    pub published: OffsetDateTime,
}

/// Decodes a pulled message; an undecodable one is terminated (never poison the queue)
/// and `None` returned.
pub async fn decode(ctx: &Context, msg: Message) -> Option<Pulled> {
    let channel = ctx.config.channel.as_str();
    let (delivered, published) = match msg.info() {
        Ok(info) => (info.delivered, info.published),
        Err(_) => (1, OffsetDateTime::now_utc()),
    };
    match serde_json::from_slice::<ChannelJob>(&msg.payload) {
        // Only a digest carries its content; any other job names its inbox entry, and
        // no entry is stored at 0.
        Ok(job) if job.digest.is_none() && job.seq == 0 => {
            tracing::error!(channel, id = %job.id, "job names no inbox entry (seq 0); terminating it");
            outcome(channel, "undecodable");
            settle(&msg, AckKind::Term).await;
            None
        }
        Ok(job) => Some(Pulled {
            msg,
            job,
            delivered,
            published,
        }),
        Err(e) => {
            tracing::error!(channel, error = %e, "undecodable job; terminating it");
            outcome(channel, "undecodable");
            settle(&msg, AckKind::Term).await;
            None
        }
    }
}

/// A job whose batch could not read what every job needs (its sent marker, NATS
/// trouble): nak it to come back after `store_retry` — or, on its last allowed
/// delivery, dead-letter it (a nak then would leave it in the work queue, never delivered
/// again).
pub async fn store_trouble(ctx: &Context, p: &Pulled, reason: &str) {
    retry_or_dead_letter(ctx, &p.msg, &p.job, p.delivered, reason).await;
}

/// Naks a job whose state could not be read to come back after `store_retry`; on its
/// last allowed delivery, dead-letters it instead.
async fn retry_or_dead_letter(
    ctx: &Context,
    msg: &Message,
    job: &ChannelJob,
    delivered: i64,
    reason: &str,
) {
    // NATS trouble sends nothing, so it spends no attempt: the job comes back until the
    // consumer's last delivery (a job deferred through a long provider outage has used
    // many deliveries already, and one failed read must not dead-letter it).
    if delivered < last_delivery(ctx) {
        return settle(msg, AckKind::Nak(Some(ctx.config.store_retry))).await;
    }
    tracing::warn!(id = %job.id, reason, "last delivery; dead-lettering");
    let letter = Letter {
        reason,
        last_response: None,
        provider: None,
    };
    dead_letter(ctx, msg, job, delivered, letter).await;
}

/// The consumer's `MaxDeliver`: on this delivery a job must be settled for good, or it
/// stays in the work queue, never delivered again.
fn last_delivery(ctx: &Context) -> i64 {
    ctx.config
        .queue
        .max_deliver
        .saturating_add(herald_store::provision::SPARE_DELIVERIES)
}

/// Why a job is dead-lettered.
struct Letter<'a> {
    reason: &'a str,
    last_response: Option<String>,
    provider: Option<&'a str>,
}

/// Puts a job in the dead-letter queue with its reason, records it, and terminates it;
/// when the dead-letter queue cannot take it, naks it to try again later.
async fn dead_letter(
    ctx: &Context,
    msg: &Message,
    job: &ChannelJob,
    delivered: i64,
    why: Letter<'_>,
) {
    let letter = DeadLetter {
        job: job.clone(),
        reason: why.reason.to_string(),
        last_response: why.last_response.clone(),
        provider: why.provider.map(str::to_string),
        attempts: delivered,
        failed_at: format_time(OffsetDateTime::now_utc()),
    };
    // The letter's identity is this work-queue message (its stream sequence), not the
    // job: a job retried from the DLQ and dead-lettered again is stored again.
    let work_seq = msg.info().ok().map(|info| info.stream_sequence);
    match ctx.dlq.put(&letter, work_seq).await {
        Ok(Put::Stored(_)) => {}
        Ok(Put::Before) => {
            // This very message was dead-lettered by an earlier delivery whose term was
            // lost: its letter is stored (or was retried as a new message). Terminate it
            // without counting or recording it a second time.
            tracing::info!(id = %job.id, "already dead-lettered by an earlier delivery; terminating it");
            return settle(msg, AckKind::Term).await;
        }
        Err(e) => {
            tracing::error!(id = %job.id, error = %e, "dead-lettering failed; retrying the job");
            return settle(msg, AckKind::Nak(Some(ctx.config.store_retry))).await;
        }
    }
    let mut update = Update::state(State::DeadLettered).because(match &why.last_response {
        Some(r) => format!("{}: {r}", why.reason),
        None => why.reason.to_string(),
    });
    update.provider = why.provider.map(str::to_string);
    record_status(ctx, job, update).await;
    outcome(ctx.config.channel.as_str(), "dead_lettered");
    settle(msg, AckKind::Term).await;
}

/// Records a delivery-status step of `job` (none for a digest: its listed notifications
/// show `digest`, and a status document for it would outlive a GDPR erase of its user).
async fn record_status(ctx: &Context, job: &ChannelJob, update: Update) {
    if job.digest.is_some() {
        return;
    }
    if let Err(e) = ctx.deps.status.record(job, update).await {
        tracing::warn!(id = %job.id, error = %e, "recording delivery status failed");
    }
}

/// How long a push job on its first delivery must still wait for a live `ack` before
/// it may be pushed; `None` when it may go now.
pub fn escalation_wait(ctx: &Context, p: &Pulled) -> Option<Duration> {
    if p.job.channel != Channel::Push || ctx.config.escalation_delay.is_zero() || p.delivered != 1 {
        return None;
    }
    let age: Duration = (OffsetDateTime::now_utc() - p.published)
        .try_into()
        .unwrap_or(Duration::ZERO);
    ctx.config
        .escalation_delay
        .checked_sub(age)
        .filter(|wait| !wait.is_zero())
}

/// A job whose sent marker exists: a provider accepted it before, and the worker that
/// sent it died before its ack landed. Acked without a second send.
pub async fn already_sent(ctx: &Context, p: &Pulled, marker: SentMarker) {
    tracing::info!(id = %p.job.id, provider = %marker.provider, "already sent before a redelivery; acking without sending");
    outcome(ctx.config.channel.as_str(), "duplicate_suppressed");
    settle(&p.msg, AckKind::Ack).await;
}

/// Handles one job with no sent marker to its ack, nak or term, with what its batch read
/// about its user.
pub async fn handle(ctx: &Context, p: &Pulled, user: &UserView) {
    let step = Step {
        ctx,
        msg: &p.msg,
        job: &p.job,
        delivered: p.delivered,
        user,
    };
    step.run().await;
}

fn outcome(channel: &'static str, outcome: &'static str) {
    metrics::counter!("herald_worker_jobs_total", "channel" => channel, "outcome" => outcome)
        .increment(1);
}

/// Acks, naks or terms `msg`, without waiting for the server (see the module doc).
pub async fn settle(msg: &Message, kind: AckKind) {
    let result = msg.ack_with(kind).await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "settling a job failed; it will be redelivered");
    }
}

struct Step<'a> {
    ctx: &'a Context,
    msg: &'a Message,
    job: &'a ChannelJob,
    delivered: i64,
    user: &'a UserView,
}

impl Step<'_> {
    fn channel(&self) -> &'static str {
        self.ctx.config.channel.as_str()
    }

    /// The consumer's last delivery of this job.
    fn last_delivery(&self) -> bool {
        self.delivered >= last_delivery(self.ctx)
    }

    /// Whether a failed send now is the job's last allowed attempt: `max_deliver` failed
    /// sends, counted in its status, since deliveries that sent nothing (deferrals, the
    /// escalation wait) do not count. Read only past `max_deliver` deliveries, so only
    /// jobs that were deferred or failed before pay for it.
    async fn last_attempt(&self) -> bool {
        let attempts = self.ctx.config.queue.max_deliver;
        if self.last_delivery() {
            return true;
        }
        if self.delivered < attempts {
            return false;
        }
        let failed = match self.ctx.deps.status.get(&self.job.id).await {
            Ok(Some(status)) => status
                .channels
                .get(self.job.channel.as_str())
                .and_then(|targets| targets.iter().find(|t| t.target == self.job.target))
                .map(|t| i64::from(t.retries)),
            _ => None,
        };
        // Unreadable: count every delivery as an attempt, as the consumer does.
        failed.is_none_or(|failed| failed + 1 >= attempts)
    }

    async fn status(&self, update: Update) {
        record_status(self.ctx, self.job, update).await;
    }

    async fn skip(&self, reason: &str) {
        self.status(Update::state(State::Skipped).because(reason))
            .await;
        outcome(self.channel(), "skipped");
        settle(self.msg, AckKind::Ack).await;
    }

    /// State the job needs could not be read (NATS trouble): it comes back after
    /// `store_retry` — unless this is its last allowed delivery, when a nak would leave
    /// it in the work queue never to be delivered again: then it is dead-lettered.
    async fn unavailable(&self, what: &str, error: impl std::fmt::Display) {
        let reason = format!("{what}: {error}");
        if !self.last_delivery() {
            tracing::warn!(id = %self.job.id, %reason, "retrying later");
        }
        retry_or_dead_letter(self.ctx, self.msg, self.job, self.delivered, &reason).await;
    }

    /// The notification is no longer in the inbox (expired, or its user was erased):
    /// drop the job, and note it only where a status document still exists, so an erased
    /// user's status is not written back.
    async fn gone(&self) {
        let update = Update::state(State::Skipped).because("expired: no longer in the inbox");
        if let Err(e) = self
            .ctx
            .deps
            .status
            .record_if_present(self.job, update)
            .await
        {
            tracing::warn!(id = %self.job.id, error = %e, "recording delivery status failed");
        }
        outcome(self.channel(), "skipped");
        settle(self.msg, AckKind::Ack).await;
    }

    async fn later(&self, delay: Duration) {
        settle(self.msg, AckKind::Nak(Some(delay))).await;
    }

    async fn run(&self) {
        let ctx = self.ctx;
        let job = self.job;
        let user = self.user;
        if let Some(seen) = &user.seen {
            match seen {
                Ok(seen) if *seen >= job.seq => {
                    return self.skip("seen: the user acked it live").await;
                }
                Ok(_) => {}
                Err(e) => {
                    return self.unavailable("seen positions unavailable", e).await;
                }
            }
        }
        if let Some(mail) = &job.digest {
            return self.digest(mail).await;
        }
        // Read in the job's own task, not with its batch: reading a batch's entries
        // together saved no measurable CPU (BENCHMARKS.md, session 10). The breaker-test
        // stall blamed on it then was a status read hiding a fast send (session 15).
        let bytes = match ctx.inbox.entry_at(job.seq).await {
            Entry::Stored(bytes) => bytes,
            Entry::Gone => return self.gone().await,
            Entry::Unavailable(e) => return self.unavailable("inbox unavailable", e).await,
        };
        let stored = match serde_json::from_slice::<StoredNotification>(&bytes) {
            Ok(n) if n.id == job.id => n,
            // A big topic's publish, stored once: this job is for one subscriber's copy.
            Ok(n)
                if n.topic.is_some()
                    && herald_protocol::topic::copy_id(&n.id, &job.user_id) == job.id =>
            {
                herald_protocol::topic::for_subscriber(n, &job.user_id)
                    .localize(job.locale.as_deref())
            }
            _ => return self.gone().await,
        };
        let target = match &user.targets {
            Ok(targets) => match targets.iter().find(|t| target_id(t) == job.target) {
                Some(t) => t.clone(),
                // The batch read any replica; the leader says whether it is really gone.
                None => match ctx
                    .deps
                    .targets
                    .find_at_leader(&job.user_id, job.channel, &job.target)
                    .await
                {
                    Ok(Some(t)) => t,
                    Ok(None) => return self.skip("target removed").await,
                    Err(e) => {
                        return self.unavailable("target store unavailable", e).await;
                    }
                },
            },
            Err(e) => {
                return self.unavailable("target store unavailable", e).await;
            }
        };
        if let (Some(optout), Some(prefs)) = (&ctx.deps.optout, &user.prefs) {
            match prefs {
                Ok(prefs) => {
                    if !optout.decide(prefs, job.channel, stored.category.as_deref()) {
                        return self.skip("opted out").await;
                    }
                }
                Err(e) => {
                    return self.unavailable("preferences unavailable", e).await;
                }
            }
        }
        let delivery = self.delivery(stored, target);
        self.send(&delivery).await;
    }

    /// An email digest: its content is in the job (rendered when its period ended), so
    /// there is no inbox entry to read; the user's email switch still applies.
    async fn digest(&self, mail: &herald_protocol::digest::DigestMail) {
        let ctx = self.ctx;
        let job = self.job;
        let targets = &ctx.deps.targets;
        let found = match targets.find(&job.user_id, job.channel, &job.target).await {
            // Any replica answered; the leader says whether it is really gone.
            Ok(None) => {
                targets
                    .find_at_leader(&job.user_id, job.channel, &job.target)
                    .await
            }
            found => found,
        };
        let target = match found {
            Ok(Some(t)) => t,
            Ok(None) => return self.skip("target removed").await,
            Err(e) => {
                return self.unavailable("target store unavailable", e).await;
            }
        };
        if let Some(optout) = &ctx.deps.optout {
            match optout.allows(&job.user_id, job.channel, None).await {
                Ok(true) => {}
                Ok(false) => return self.skip("opted out").await,
                Err(e) => {
                    return self.unavailable("preferences unavailable", e).await;
                }
            }
        }
        let unsubscribe_url = ctx
            .deps
            .links
            .as_ref()
            .map(|links| links.url(&job.user_id, None));
        let delivery = Delivery {
            id: job.id.clone(),
            seq: job.seq,
            user_id: job.user_id.clone(),
            channel: job.channel,
            priority: job.priority,
            category: None,
            title: Some(mail.subject.clone()),
            body: Some(mail.text.clone()),
            data: Default::default(),
            collapse_key: None,
            expires_at: None,
            target,
            unsubscribe_url,
            html: Some(mail.html.clone()),
        };
        self.send(&delivery).await;
    }

    fn delivery(&self, stored: StoredNotification, target: Target) -> Delivery {
        let expires_at = stored.expires_at.as_deref().and_then(|t| {
            OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        });
        // No `List-Unsubscribe` on a critical category's email: its opt-out would be
        // answered "unsubscribed" and then ignored, as critical categories ignore opt-outs.
        let critical = (self.ctx.deps.optout.as_ref())
            .is_some_and(|optout| optout.is_critical(stored.category.as_deref()));
        let unsubscribe_url = match (&self.ctx.deps.links, self.job.channel) {
            (Some(links), Channel::Email) if !critical => {
                Some(links.url(&self.job.user_id, stored.category.as_deref()))
            }
            _ => None,
        };
        // A group's one send says what the whole group says, and replaces (collapse key =
        // group key unless the producer gave one) anything sent for it before.
        let (title, body, collapse_key) = match &self.job.folded {
            Some(f) => (
                f.title.clone().or(stored.title),
                f.body.clone().or(stored.body),
                stored.collapse_key.or_else(|| Some(f.key.clone())),
            ),
            None => (stored.title, stored.body, stored.collapse_key),
        };
        // A template's text for this channel, when it has one, over the inbox's.
        let (title, body, html) = channel_texts(self.job.channel, stored.rendered, title, body);
        Delivery {
            id: stored.id,
            seq: self.job.seq,
            user_id: stored.user_id,
            channel: self.job.channel,
            priority: stored.priority,
            category: stored.category,
            title,
            body,
            data: stored.data,
            collapse_key,
            expires_at,
            target,
            unsubscribe_url,
            html,
        }
    }

    async fn send(&self, delivery: &Delivery) {
        let ctx = self.ctx;
        if ctx.stop.is_cancelled() {
            return self.stopping().await;
        }
        let pick = ctx.deps.providers.pick(self.job.channel, &delivery.target);
        let (provider, probe) = match pick {
            crate::providers::Pick::Use(p, probe) => (p, probe),
            crate::providers::Pick::AllOpen(wait) => {
                let reason = "every provider's circuit is open, or it throttled us";
                if self.last_delivery() {
                    return self.dead_letter(reason, None, None).await;
                }
                // Deferred, not retried: nothing was sent, so no attempt is spent.
                self.status(Update::state(State::Deferred).because(reason))
                    .await;
                outcome(self.channel(), "deferred");
                // Only a job pulled as the circuits opened, or one whose target only open
                // providers accept, gets here: the lanes stop pulling while every circuit of
                // the channel is open or paused by a throttle (`runtime`'s gate).
                // Each deferral is a delivery of the job, from the consumer's spare ones
                // (`SPARE_DELIVERIES`), not from its attempts: past the breaker's own wait,
                // back off further with every one (with jitter, so a backlog does not
                // return all at once to find a probe in flight), so the spare deliveries
                // last through hours of an outage.
                let attempt = u32::try_from(self.delivered).unwrap_or(u32::MAX);
                let delay =
                    wait.max(Duration::from_millis(100)) + self.ctx.config.backoff.delay(attempt);
                return self.later(delay).await;
            }
            crate::providers::Pick::NoneAccepts => {
                return self
                    .dead_letter("no provider of the channel accepts this target", None, None)
                    .await;
            }
        };
        // A stopping worker starts no provider call: its drain waits for calls under way
        // (their answer, sent marker and ack), and a call begun during it, behind a slow
        // bucket, could be cut off by the end of the drain after the provider accepted
        // it, and be sent again on redelivery. So a job that has not begun its call by
        // then — before its bucket's token, or after — goes back to the queue.
        let called = self
            .in_progress(async {
                tokio::select! {
                    biased;
                    _ = ctx.stop.cancelled() => return None,
                    _ = provider.ready() => {}
                }
                if ctx.stop.is_cancelled() {
                    return None;
                }
                let started = Instant::now();
                let result = match tokio::time::timeout(
                    ctx.config.send_timeout,
                    provider.provider.send(delivery),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(SendError::transient(format!(
                        "no answer within {:?}",
                        ctx.config.send_timeout
                    ))),
                };
                Some((result, started.elapsed()))
            })
            .await;
        let Some((result, took)) = called else {
            if probe {
                // Not sent, so no verdict: the next job may probe the circuit.
                provider.breaker.release_probe();
            }
            return self.stopping().await;
        };
        provider.metrics.send_seconds.record(took.as_secs_f64());
        // A provider standing for many endpoints (webhooks: every producer's receiver):
        // one receiver's 429 or 503 holds back that job (its `Retry-After`), and its
        // failures never open the circuit everyone else's go through.
        let shared = provider.provider.health_is_shared();
        match &result {
            // A throttle about this target only (too many pushes to one device): that
            // job waits, and the provider keeps serving every other target.
            Err(e @ SendError::Throttled { .. }) if e.throttles_one_target() => {}
            Err(SendError::Throttled { retry_after, .. }) if shared => {
                provider.pause(retry_after.unwrap_or(DEFAULT_THROTTLE_PAUSE));
            }
            // A 5xx that says when to come back (a 503 with `Retry-After`) is about the
            // provider, not this job: nobody calls it before then.
            Err(SendError::Transient {
                retry_after: Some(wait),
                ..
            }) if shared => provider.pause(*wait),
            _ => {}
        }
        match &result {
            Err(e) if e.counts_against_provider() && shared => {
                provider.breaker.on_failure(Instant::now());
            }
            Err(e) if e.counts_against_provider() => {}
            _ => provider.breaker.on_success(),
        }
        // The breaker may have opened, closed, or (after a probe) changed state.
        provider.report();
        match result {
            Ok(sent) => {
                provider.metrics.count(SendResult::Sent);
                self.sent(provider.name(), sent.provider_message_id).await;
            }
            Err(e) => {
                provider.metrics.count(SendResult::from(&e));
                self.failed(provider.name(), e).await;
            }
        }
    }

    /// The worker stops before this job began its provider call: back to the queue at
    /// once, for the next worker (no attempt was spent). On its last allowed delivery a
    /// nak would leave it in the work queue, never delivered again: dead-lettered
    /// instead, to be retried from the DLQ.
    async fn stopping(&self) {
        outcome(self.channel(), "returned");
        if !self.last_delivery() {
            return settle(self.msg, AckKind::Nak(None)).await;
        }
        self.dead_letter(
            "the worker stopped before its last allowed delivery was sent",
            None,
            None,
        )
        .await;
    }

    /// Runs `work` (the wait for the provider's token bucket, then the send) while
    /// telling JetStream every third of `AckWait` that the job is in progress. A job that
    /// waits behind a slow bucket or a slow provider for longer than `AckWait` would
    /// otherwise be redelivered meanwhile: each such delivery counts towards
    /// `MaxDeliver`, and another worker would send it a second time.
    async fn in_progress<T>(&self, work: impl Future<Output = T>) -> T {
        let every = (self.ctx.config.queue.ack_wait / 3).max(Duration::from_millis(100));
        tokio::pin!(work);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick() => settle(self.msg, AckKind::Progress).await,
            }
        }
    }

    async fn sent(&self, provider: &str, provider_message_id: Option<String>) {
        // The marker goes first: if this process dies before the ack lands, the
        // redelivered job finds it and is acked without a second send.
        let mut marked = false;
        for _ in 0..3 {
            match self
                .ctx
                .deps
                .status
                .mark_sent(self.job, provider, provider_message_id.clone())
                .await
            {
                Ok(()) => {
                    marked = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(id = %self.job.id, error = %e, "writing the sent marker failed")
                }
            }
        }
        if !marked {
            tracing::error!(id = %self.job.id, "sent without a marker; a redelivery before the ack would send again");
        }
        self.ctx.deps.hooks.after_marked(self.job).await;
        settle(self.msg, AckKind::Ack).await;
        // No status write: the marker is the record of the send (see the module doc).
        outcome(self.channel(), "sent");
    }

    async fn failed(&self, provider: &str, error: SendError) {
        // A provider's answer may quote the address or number (an SMTP `550 <ann@x.y>:
        // ...`): masked before it is logged, stored as status or dead-lettered.
        let detail = herald_channels::redact_contacts(&error.to_string());
        tracing::info!(id = %self.job.id, provider, attempt = self.delivered, %detail, "send failed");
        let retryable = matches!(
            error,
            SendError::Throttled { .. } | SendError::Transient { .. }
        );
        let last = retryable && self.last_attempt().await;
        match error {
            SendError::Throttled { .. } | SendError::Transient { .. } if last => {
                self.dead_letter(
                    &format!(
                        "gave up after {} failed attempts",
                        self.ctx.config.queue.max_deliver
                    ),
                    Some(detail),
                    Some(provider),
                )
                .await;
            }
            SendError::Throttled { retry_after, .. } => {
                let attempt = u32::try_from(self.delivered).unwrap_or(u32::MAX);
                let delay = self.ctx.config.backoff.throttled(attempt, retry_after);
                self.status(Update::state(State::Retrying).because(detail).by(provider))
                    .await;
                outcome(self.channel(), "throttled");
                self.later(delay).await;
            }
            SendError::Transient { retry_after, .. } => {
                let attempt = u32::try_from(self.delivered).unwrap_or(u32::MAX);
                let delay = self.ctx.config.backoff.transient(attempt, retry_after);
                self.status(Update::state(State::Retrying).because(detail).by(provider))
                    .await;
                outcome(self.channel(), "retried");
                self.later(delay).await;
            }
            SendError::Permanent { .. } => {
                self.dead_letter("permanent provider error", Some(detail), Some(provider))
                    .await;
            }
            SendError::InvalidTarget { .. } => {
                let removed = match self
                    .ctx
                    .deps
                    .targets
                    .find(&self.job.user_id, self.job.channel, &self.job.target)
                    .await
                {
                    Ok(Some(target)) => self
                        .ctx
                        .deps
                        .targets
                        .remove(&self.job.user_id, &target)
                        .await
                        .unwrap_or(false),
                    _ => false,
                };
                tracing::info!(id = %self.job.id, removed, "provider rejected the target; removed it");
                self.status(
                    Update::state(State::Failed)
                        .because(format!("invalid target, removed: {detail}"))
                        .by(provider),
                )
                .await;
                outcome(self.channel(), "invalid_target");
                settle(self.msg, AckKind::Term).await;
            }
        }
    }

    async fn dead_letter(
        &self,
        reason: &str,
        last_response: Option<String>,
        provider: Option<&str>,
    ) {
        let letter = Letter {
            reason,
            last_response,
            provider,
        };
        dead_letter(self.ctx, self.msg, self.job, self.delivered, letter).await;
    }
}

/// The title, body and HTML a `channel` sends: the template's texts for that channel
/// (`push.title`, `email.subject`, `sms.text`, ...) when it rendered them, else the
/// notification's own title and body.
fn channel_texts(
    channel: Channel,
    rendered: Option<herald_protocol::Rendered>,
    title: Option<String>,
    body: Option<String>,
) -> (Option<String>, Option<String>, Option<String>) {
    let Some(r) = rendered else {
        return (title, body, None);
    };
    match channel {
        Channel::Push => (r.push_title.or(title), r.push_body.or(body), None),
        Channel::Email => (
            r.email_subject.or(title),
            r.email_text.or(body),
            r.email_html,
        ),
        Channel::Sms => match r.sms_text {
            Some(text) => (None, Some(text), None),
            None => (title, body, None),
        },
        Channel::Inbox | Channel::Webhook => (title, body, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::Rendered;

    fn texts(channel: Channel, rendered: Option<Rendered>) -> [Option<String>; 3] {
        let (t, b, h) = channel_texts(channel, rendered, Some("T".into()), Some("B".into()));
        [t, b, h]
    }

    #[test]
    fn each_channel_sends_its_template_text_or_the_notifications() {
        let some = |s: &str| Some(s.to_owned());
        let rendered = Rendered {
            template: "t".into(),
            locale: "de".into(),
            push_title: some("PT"),
            email_subject: some("ES"),
            email_html: some("<p>EH</p>"),
            sms_text: some("S"),
            ..Rendered::default()
        };
        let r = || Some(rendered.clone());
        assert_eq!(texts(Channel::Push, r()), [some("PT"), some("B"), None]);
        assert_eq!(
            texts(Channel::Email, r()),
            [some("ES"), some("B"), some("<p>EH</p>")]
        );
        assert_eq!(texts(Channel::Sms, r()), [None, some("S"), None]);
        assert_eq!(texts(Channel::Webhook, r()), [some("T"), some("B"), None]);
        assert_eq!(texts(Channel::Push, None), [some("T"), some("B"), None]);
    }
}
