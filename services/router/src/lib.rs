//! The router: consumes the INBOX stream partition by partition and turns each stored
//! notification into channel jobs (push, email, SMS, webhook), one per target, on the
//! channels' work streams.
//!
//! Live delivery needs no router hop — INBOX republishes every stored message to the
//! user's live subject. What the router owns is everything after the inbox, and for that
//! per-user order matters: each partition has one durable consumer whose priority group
//! pins a single client, so exactly one router process owns a partition (and so a user)
//! at a time; a standby takes over when the owner stops pulling.
//!
//! Policy is applied here, per notification, from the user's preferences as they are now:
//! opted-out channels are skipped; below `high`, a notification that arrives during the
//! user's quiet hours keeps its inbox entry (already written) while its channel work is
//! handed to JetStream's scheduler (see [`deferral`]) and comes back to this router when
//! they end; rate caps, counted across instances, suppress the interrupting channels of
//! what goes over them.
//!
//! Aggregation (see [`herald_protocol::group`]): a notification whose `group` says it
//! opened a window holds its channel work until the window ends (a schedule, like quiet
//! hours); one that joined an open window is recorded as `folded` into the first. When
//! the window ends the router closes the group (compare-and-set, so no member is lost to a
//! race with a late joiner) and enqueues the first notification's jobs with the group's
//! final folded text.
//!
//! Digests (see [`digest`]): for a user on an hourly or daily digest, a notification's
//! email is recorded for the digest instead of sent, and one email per period lists what
//! the user missed.

mod deferral;
mod digest;
mod grouping;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt as _;
use herald_protocol::Subjects;
use herald_protocol::preferences::{CapOver, Digest};
use herald_protocol::streams::{self, INBOX};
use herald_protocol::{Channel, ChannelJob, Policy, Preferences, Priority, StoredNotification};
use herald_store::status::{State, Update};
use herald_store::targets::{TargetsError, target_id};
use herald_store::{
    CapDecision, Digests, Groups, Nats, PreferenceStore, RateCaps, ReadPositions, StatusStore,
    Targets,
};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Pull expiry: well under the consumers' pin timeout, so an idle owner keeps its pin.
const PULL_EXPIRY: Duration = Duration::from_secs(2);

/// Why the router stopped.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The preferences bucket could not be opened.
    #[error("opening the preferences bucket")]
    Preferences(#[source] herald_store::PreferencesError),
    /// The rate cap bucket could not be opened.
    #[error("opening the rate cap bucket")]
    Caps(#[source] herald_store::CapsError),
    /// The aggregation group bucket could not be opened.
    #[error("opening the aggregation group bucket")]
    Groups(#[source] herald_store::GroupsError),
    /// A read or seen position bucket could not be opened.
    #[error("opening the read positions")]
    Reads(#[source] herald_store::reads::ReadsError),
    /// A partition consumer could not be opened.
    #[error("opening router consumer for partition {partition}, lane {}", .lane.as_str())]
    Consumer {
        /// The partition.
        partition: u16,
        /// The lane.
        lane: Priority,
        /// The NATS error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the router reads and writes besides streams and preferences.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Where users can be reached (one job per target).
    pub targets: Targets,
    /// Delivery status (`queued`, or `skipped` when a channel has no target or policy
    /// suppresses it).
    pub status: StatusStore,
    /// Templates (the `digest` template renders digest emails).
    pub templates: Arc<herald_templates::Templates>,
}

/// Runs one router over every partition until `shutdown`, then finishes in-flight work.
///
/// # Errors
/// [`RouterError`] when a partition consumer cannot be opened.
pub async fn run(
    nats: Nats,
    subjects: Subjects,
    policy: Arc<Policy>,
    routing: Routing,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RouterError> {
    let route = Route {
        nats: nats.clone(),
        subjects: subjects.clone(),
        preferences: PreferenceStore::open(&nats.js_consume)
            .await
            .map_err(RouterError::Preferences)?,
        caps: RateCaps::open(&nats.js_consume, policy.caps().to_vec())
            .await
            .map_err(RouterError::Caps)?,
        groups: Groups::open(&nats.js_consume)
            .await
            .map_err(RouterError::Groups)?,
        digests: Digests::new(nats.clone(), subjects.clone()),
        reads: ReadPositions::open(&nats.js_consume)
            .await
            .map_err(RouterError::Reads)?,
        seen: ReadPositions::open_seen(&nats.js_consume)
            .await
            .map_err(RouterError::Reads)?,
        policy,
        routing,
    };
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    for partition in 0..subjects.partitions() {
        // A consumer per lane: a backlog of `low` never delays the routing of `high`.
        for lane in Priority::ALL {
            // NATS away while the router starts (a restart of the server, a failover):
            // wait for it, as every other part does, rather than end the router.
            let consumer = loop {
                match open(&nats, &subjects, partition, lane).await {
                    Ok(consumer) => break consumer,
                    Err(e) if nats.is_connected() && !herald_store::is_unavailable(&e) => {
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "NATS unavailable while opening the router; retrying");
                        tokio::select! {
                            _ = &mut shutdown => {
                                stop.cancel();
                                while tasks.join_next().await.is_some() {}
                                return Ok(());
                            }
                            _ = tokio::time::sleep(OPEN_RETRY) => {}
                        }
                    }
                }
            };
            tasks.spawn(partition_loop(
                route.clone(),
                partition,
                lane,
                consumer,
                stop.clone(),
            ));
        }
    }
    tracing::info!(partitions = subjects.partitions(), "router running");
    // A partition-lane whose consumer is gone ends the router with its error, so that
    // supervision (and `herald up`) notices instead of leaving that lane unrouted.
    let failed = tokio::select! {
        () = &mut shutdown => None,
        Some(Ok(Err(e))) = tasks.join_next() => Some(e),
    };
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    failed.map_or(Ok(()), Err)
}

/// Pause between attempts to open a partition consumer while NATS is away.
const OPEN_RETRY: Duration = Duration::from_secs(1);

/// Opens the router consumer of one lane of one partition, first bringing its filters up
/// to date when an earlier version provisioned it: this router defers work onto each
/// lane's own deferred subject, which an older consumer does not read.
async fn open(
    nats: &Nats,
    subjects: &Subjects,
    partition: u16,
    lane: Priority,
) -> Result<PullConsumer, RouterError> {
    let err = |source| RouterError::Consumer {
        partition,
        lane,
        source,
    };
    let stream = nats
        .js_consume
        .get_stream_no_info(INBOX)
        .await
        .map_err(|e| err(Box::new(e)))?;
    let consumer: PullConsumer = stream
        .get_consumer(&streams::router_consumer(partition, lane))
        .await
        .map_err(err)?;
    let wanted = herald_store::provision::router_consumer_config(subjects, partition, lane);
    let mut have = consumer.cached_info().config.filter_subjects.clone();
    if !wanted.filter_subjects.iter().all(|f| have.contains(f)) {
        // Only the filters change; the rest stays as provisioned (replicas, pin timeout).
        let mut config = consumer.cached_info().config.clone();
        have.clone_from(&wanted.filter_subjects);
        config.filter_subjects = have;
        config.filter_subject = String::new();
        stream
            .update_consumer(config)
            .await
            .map_err(|e| err(Box::new(e)))?;
        tracing::info!(
            partition,
            lane = lane.as_str(),
            "router consumer now reads its lane's deferred work (run `herald provision` after an upgrade)"
        );
        return stream
            .get_consumer(&streams::router_consumer(partition, lane))
            .await
            .map_err(err);
    }
    Ok(consumer)
}

/// At shutdown, stop once no message arrived for this long...
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// ...or after this long in all.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// Back-off between attempts to enqueue one notification's jobs.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// What routing one message needs.
#[derive(Clone)]
struct Route {
    nats: Nats,
    subjects: Subjects,
    preferences: PreferenceStore,
    caps: RateCaps,
    groups: Groups,
    digests: Digests,
    reads: ReadPositions,
    seen: ReadPositions,
    policy: Arc<Policy>,
    routing: Routing,
}

/// Consecutive consumer errors after which the router opens its consumer again (as at
/// start), to tell a consumer that is gone from trouble that passes.
const REOPEN_AFTER: u32 = 2;
/// At most one warning per partition-lane this often while its consumer keeps failing.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Consecutive errors of one partition-lane's consumer, and when they were last logged.
struct Trouble {
    partition: u16,
    lane: Priority,
    errors: u32,
    unlogged: u64,
    warned: Option<tokio::time::Instant>,
}

impl Trouble {
    fn new(partition: u16, lane: Priority) -> Self {
        Self {
            partition,
            lane,
            errors: 0,
            unlogged: 0,
            warned: None,
        }
    }

    /// Counts an error and warns, at most once per [`WARN_EVERY`] (with how many were
    /// not logged since); true once [`REOPEN_AFTER`] came in a row.
    fn error(&mut self, error: &dyn std::fmt::Display) -> bool {
        self.errors += 1;
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self
            .warned
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            tracing::warn!(
                partition = self.partition,
                lane = self.lane.as_str(),
                errors = self.unlogged,
                error = %error,
                "router consumer error: this partition-lane is not being routed"
            );
            self.warned = Some(now);
            self.unlogged = 0;
        }
        self.errors >= REOPEN_AFTER
    }

    fn ok(&mut self) {
        self.errors = 0;
    }
}

/// Opens the consumer again, as [`run`] does: the same one back (the errors passed), or
/// the error that ends the router when it is gone. NATS away is waited for.
async fn reopen(
    route: &Route,
    partition: u16,
    lane: Priority,
    stop: &CancellationToken,
) -> Result<Option<PullConsumer>, RouterError> {
    loop {
        match open(&route.nats, &route.subjects, partition, lane).await {
            Ok(consumer) => return Ok(Some(consumer)),
            Err(e) if route.nats.is_connected() && !herald_store::is_unavailable(&e) => {
                tracing::error!(partition, lane = lane.as_str(), error = %e,
                    "router consumer gone: stopping the router (run `herald provision`)");
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(partition, lane = lane.as_str(), error = %e,
                    "NATS unavailable while opening the router consumer again; retrying");
                tokio::select! {
                    () = stop.cancelled() => return Ok(None),
                    () = tokio::time::sleep(OPEN_RETRY) => {}
                }
            }
        }
    }
}

async fn partition_loop(
    route: Route,
    partition: u16,
    lane: Priority,
    mut consumer: PullConsumer,
    stop: CancellationToken,
) -> Result<(), RouterError> {
    let mut trouble = Trouble::new(partition, lane);
    while !stop.is_cancelled() {
        let messages = consumer
            .stream()
            .group(streams::ROUTER_GROUP)
            .expires(PULL_EXPIRY)
            .max_messages_per_batch(256)
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                if trouble.error(&e) {
                    match reopen(&route, partition, lane, &stop).await? {
                        Some(c) => consumer = c,
                        None => return Ok(()),
                    }
                    trouble.ok();
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => {
                    // Route what is already on its way to this process before letting go:
                    // the server keeps delivering on our open pull until it goes quiet, and
                    // anything left unacked would reach the next owner only after its ack
                    // wait, behind newer messages.
                    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
                    while let Ok(Some(Ok(msg))) =
                        tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + DRAIN_QUIET), messages.next()).await
                    {
                        if let Routed::Done = route.message(&msg, &mut Tries::default()).await {
                            let _ = msg.ack().await;
                        }
                    }
                    return Ok(());
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    trouble.ok();
                    // Retry in place: moving on would break per-user order. The rate caps
                    // and the metrics count the notification once, however many tries it
                    // takes, and the message is kept in progress so it is not redelivered
                    // meanwhile.
                    let mut tries = Tries::default();
                    while let Routed::Retry = route.message(&msg, &mut tries).await {
                        let _ = msg.ack_with(AckKind::Progress).await;
                        tokio::select! {
                            // Unacked: redelivered to whichever router owns the partition next.
                            _ = stop.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(RETRY_BACKOFF) => {}
                        }
                    }
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(partition, error = %e, "router ack failed; message will be redelivered");
                    }
                }
                // A consumer deleted under the router (an operator, INBOX recreated, a
                // lost replica) fails every pull from then on: open it again, and end
                // the router if it is gone rather than leave the lane silently unrouted.
                Some(Err(e)) => {
                    if trouble.error(&e) {
                        match reopen(&route, partition, lane, &stop).await? {
                            Some(c) => consumer = c,
                            None => return Ok(()),
                        }
                        trouble.ok();
                        break;
                    }
                }
                None => break,
            }
        }
    }
    Ok(())
}

/// Whether JetStream refused a publish for its size: for good, whatever the retries.
pub(crate) fn too_big(e: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    e.kind() == PublishErrorKind::MaxPayloadExceeded
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|js| {
                js.error_code() == async_nats::jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
            })
}

/// What routing one message settled so far, kept across its in-place retries.
#[derive(Default)]
struct Tries {
    /// What the rate caps decided: each decision counts against the caps, so it is
    /// taken once.
    cap: Option<CapDecision>,
    /// Whether the channels policy suppressed were counted in the metrics.
    counted_suppressed: bool,
    /// Whether going over a rate cap was counted in the metrics.
    counted_capped: bool,
    /// Whether holding the email for a digest was counted in the metrics.
    counted_digested: bool,
}

impl Tries {
    /// Counts a notification's email held for a digest, once however many tries.
    fn count_digested(&mut self) {
        if !std::mem::replace(&mut self.counted_digested, true) {
            metrics::counter!("herald_router_digested_total").increment(1);
        }
    }
}

enum Routed {
    /// Nothing left to do for this message.
    Done,
    /// Enqueueing failed; try again.
    Retry,
}

impl Route {
    /// Routes one stored notification: one job per (channel beyond the inbox that the
    /// user's preferences allow, target). `Nats-Msg-Id` per (id, channel, target) makes a
    /// retry or a replayed router harmless for the jobs that did land. A full work queue
    /// refuses the publish (discard-new) and the notification is retried in place:
    /// backpressure, never loss.
    /// `tries` keeps what was settled for `msg` across in-place retries.
    async fn message(&self, msg: &async_nats::jetstream::Message, tries: &mut Tries) -> Routed {
        let Route { nats, subjects, .. } = self;
        let needs_routing = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(streams::ROUTE_HEADER))
            .is_some();
        if !needs_routing {
            metrics::counter!("herald_router_skipped_total").increment(1);
            return Routed::Done;
        }
        // A notification back from quiet hours carries its inbox position in a header.
        let deferred = deferral::is_deferred(subjects, &msg.subject);
        if deferred && digest::is_due(msg) {
            return self.digest_due(msg).await;
        }
        let seq = match (deferred, msg.info()) {
            (true, _) => match deferral::inbox_seq(msg) {
                Some(seq) => seq,
                None => {
                    tracing::warn!(subject = %msg.subject, "deferred notification without its inbox seq; skipping it");
                    return Routed::Done;
                }
            },
            (false, Ok(info)) => info.stream_sequence,
            (false, Err(e)) => {
                tracing::warn!(error = %e, "router message without metadata; skipping it");
                return Routed::Done;
            }
        };
        let stored: StoredNotification = match serde_json::from_slice(&msg.payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(seq, error = %e, "undecodable inbox message; skipping");
                return Routed::Done;
            }
        };
        let Some((mut channels, mut suppressed, prefs)) =
            self.allowed_channels(&stored, seq, tries).await
        else {
            return Routed::Retry;
        };
        // A big topic's copy comes on the routing subject too, but fresh: digests and
        // quiet hours apply to it as to a notification of its own.
        let fresh = !deferred
            || msg
                .headers
                .as_ref()
                .is_some_and(|h| h.get(streams::FANOUT_HEADER).is_some());
        // A digest user's email waits for their digest. It was recorded when the
        // notification first came through; back from quiet hours or a group's window it
        // is only kept out of the channels.
        if channels.contains(&Channel::Email) && self.digest_applies(&stored, &prefs) {
            channels.retain(|c| *c != Channel::Email);
            if fresh
                && let Err(e) = self
                    .hold_for_digest(&stored, seq, &prefs, prefs.digest, "preferences.digest")
                    .await
            {
                tracing::warn!(seq, error = %e, "recording for the digest failed; will retry");
                return Routed::Retry;
            }
            if fresh {
                tries.count_digested();
            }
        }
        let now = jiff::Timestamp::now();
        let mut folded = None;
        if !channels.is_empty() {
            match self
                .aggregate(msg, deferred, &stored, seq, &channels, &prefs, now)
                .await
            {
                grouping::Step::Route(f) => folded = f,
                grouping::Step::Done => return Routed::Done,
                grouping::Step::Retry => return Routed::Retry,
            }
        }
        // Quiet hours: below `high`, the channel work waits; the inbox entry is already there.
        if fresh
            && folded.is_none()
            && !channels.is_empty()
            && stored.priority != Priority::High
            && let Some(until) = prefs.quiet_until(now)
        {
            if let Err(e) = deferral::defer(nats, subjects, &stored, seq, &until.to_string()).await
            {
                tracing::warn!(seq, error = %e, "deferring for quiet hours failed; will retry");
                return Routed::Retry;
            }
            metrics::counter!("herald_router_deferred_total").increment(1);
            let waiting: Vec<(Channel, String)> =
                channels.iter().map(|c| (*c, "none".to_string())).collect();
            self.record(
                &stored,
                seq,
                waiting,
                Update::state(State::Deferred).because(format!("quiet_hours: until {until}")),
            )
            .await;
            return Routed::Done;
        }
        // The cap's count and the targets are independent reads: one round trip for both.
        let wanted = channels.clone();
        let capped = async {
            if channels.is_empty() || self.caps.is_empty() {
                return Ok(channels);
            }
            let decision = match tries.cap.clone() {
                Some(decided) => Ok(decided),
                None => {
                    let unix = u64::try_from(now.as_second()).unwrap_or(0);
                    let decision = self
                        .caps
                        .admit(
                            stored.producer.as_deref(),
                            &stored.user_id,
                            stored.category.as_deref(),
                            unix,
                        )
                        .await;
                    if let Ok(decided) = &decision {
                        tries.cap = Some(decided.clone());
                    }
                    decision
                }
            };
            match decision {
                Ok(CapDecision::Within) => Ok(channels),
                Ok(CapDecision::Over(cap)) => {
                    if !std::mem::replace(&mut tries.counted_capped, true) {
                        metrics::counter!("herald_rate_capped_total").increment(1);
                    }
                    let rule = format!("rate_cap: {} per {} s", cap.limit, cap.window_s);
                    let mut channels = channels;
                    if cap.over == CapOver::Digest && channels.contains(&Channel::Email) {
                        channels.retain(|c| *c != Channel::Email);
                        let frequency = match prefs.digest {
                            Digest::Off => Digest::Hourly,
                            chosen => chosen,
                        };
                        if let Err(e) = self
                            .hold_for_digest(&stored, seq, &prefs, frequency, &rule)
                            .await
                        {
                            tracing::warn!(seq, error = %e, "folding into a digest failed; will retry");
                            return Err(());
                        }
                        tries.count_digested();
                    }
                    suppressed.extend(channels.into_iter().map(|c| (c, rule.clone())));
                    Ok(Vec::new())
                }
                Err(e) => {
                    tracing::warn!(seq, error = %e, "rate caps unavailable; will retry");
                    Err(())
                }
            }
        };
        let ahead = futures::future::join_all(wanted.iter().map(|channel| {
            let targets = &self.routing.targets;
            let user = &stored.user_id;
            async move { (*channel, targets.targets(user, *channel).await) }
        }));
        let (capped, ahead) = tokio::join!(capped, ahead);
        let Ok(channels) = capped else {
            return Routed::Retry;
        };
        let mut targets_of = Vec::with_capacity(ahead.len());
        // Channels whose targets cannot be read until an operator acts (a contact record
        // sealed with a key this process lacks, or corrupt): failed, never retried —
        // retrying in place would hold up every user of the partition's lane behind it.
        let mut unreadable = Vec::new();
        for (channel, found) in ahead {
            match found {
                Ok(found) => targets_of.push((channel, found)),
                Err(e @ TargetsError::Nats(_)) => {
                    tracing::warn!(seq, error = %e, "reading targets failed; will retry");
                    return Routed::Retry;
                }
                Err(e) => unreadable.push((channel, e.to_string())),
            }
        }
        let mut acks = Vec::new();
        let mut queued = Vec::new();
        let mut untargeted = Vec::new();
        let mut failed = Vec::new();
        for channel in channels {
            if let Some((_, why)) = unreadable.iter().find(|(c, _)| *c == channel) {
                tracing::error!(seq, id = %stored.id, user = %stored.user_id.as_str(), channel = channel.as_str(),
                    "{why}: the notification is not sent on this channel (add the key to contact_old_keys, or have the producer PUT the user's contact again)");
                failed.push((channel, why.clone()));
                continue;
            }
            let targets = targets_of
                .iter_mut()
                .find(|(c, _)| *c == channel)
                .map(|(_, t)| std::mem::take(t))
                .unwrap_or_default();
            if targets.is_empty() {
                untargeted.push((channel, "none".to_string()));
            }
            for target in targets {
                let job = ChannelJob {
                    id: stored.id.clone(),
                    seq,
                    user_id: stored.user_id.clone(),
                    channel,
                    priority: stored.priority,
                    target: target_id(&target),
                    folded: folded.clone(),
                    digest: None,
                    locale: stored
                        .topic
                        .as_ref()
                        .and(stored.rendered_locale())
                        .map(str::to_owned),
                };
                let Ok(payload) = serde_json::to_vec(&job) else {
                    continue;
                };
                let publish = PublishMessage::build()
                    .payload(payload.into())
                    .message_id(job.msg_id())
                    .expected_stream(streams::work_stream_name(channel));
                match nats
                    .js
                    .send_publish(subjects.work(channel, stored.priority), publish)
                    .await
                {
                    Ok(ack) => acks.push(ack),
                    Err(e) => {
                        tracing::warn!(seq, error = %e, "enqueue failed; will retry");
                        return Routed::Retry;
                    }
                }
                queued.push((channel, job.target));
            }
        }
        let mut unsendable = Vec::new();
        for (ack, (channel, target)) in acks.into_iter().zip(&queued) {
            match ack.await {
                Ok(_) => {}
                // Retrying a job JetStream will never take would hold the lane forever.
                Err(e) if too_big(&e) => {
                    tracing::error!(seq, id = %stored.id, channel = channel.as_str(), error = %e,
                        "channel job over its work queue's maximum message size; dropped (raise max_msg_size of {})",
                        streams::work_stream_name(*channel));
                    unsendable.push((*channel, target.clone()));
                }
                Err(e) => {
                    tracing::warn!(seq, error = %e, "enqueue not acked (queue full?); will retry");
                    metrics::counter!("herald_router_enqueue_refused_total").increment(1);
                    return Routed::Retry;
                }
            }
        }
        queued.retain(|q| !unsendable.contains(q));
        // Status is for people; a failure to record it never holds delivery back.
        let queued_update = match &folded {
            Some(f) => Update::state(State::Queued).because(format!(
                "group {}: {} notifications folded into this one",
                f.key, f.count
            )),
            None => Update::state(State::Queued),
        };
        let mut records = vec![
            (queued, queued_update),
            (
                unsendable,
                Update::state(State::Failed)
                    .because("job over the work queue's maximum message size"),
            ),
            (
                untargeted,
                Update::state(State::Skipped)
                    .because("no target: the user has none on this channel"),
            ),
        ];
        for (channel, why) in failed {
            records.push((
                vec![(channel, "none".to_string())],
                Update::state(State::Failed).because(format!("target unreadable: {why}")),
            ));
        }
        for (channel, rule) in suppressed {
            let reason = if rule.starts_with("rate_cap") {
                rule
            } else {
                format!("opted out: {rule}")
            };
            records.push((
                vec![(channel, "none".to_string())],
                Update::state(State::Skipped).because(reason),
            ));
        }
        for (targets, update) in records {
            self.record(&stored, seq, targets, update).await;
        }
        metrics::counter!("herald_router_routed_total").increment(1);
        Routed::Done
    }

    /// Records delivery status. Status is for people; a failure to record it never holds
    /// delivery back.
    async fn record(
        &self,
        stored: &StoredNotification,
        seq: u64,
        targets: Vec<(Channel, String)>,
        update: Update,
    ) {
        if targets.is_empty() {
            return;
        }
        if let Err(e) = self
            .routing
            .status
            .record_many(&stored.id, &stored.user_id, seq, &targets, update)
            .await
        {
            tracing::warn!(seq, error = %e, "recording delivery status failed");
        }
    }

    /// The channels beyond the inbox that policy lets this notification use, read from the
    /// user's preferences as they are now, those it suppresses with the rule that did, and
    /// the preferences; `None` when the preferences cannot be read.
    async fn allowed_channels(
        &self,
        stored: &StoredNotification,
        seq: u64,
        tries: &mut Tries,
    ) -> Option<(Vec<Channel>, Vec<(Channel, String)>, Preferences)> {
        let wanted: Vec<Channel> = stored
            .channels
            .iter()
            .copied()
            .filter(|c| *c != Channel::Inbox)
            .collect();
        if wanted.is_empty() {
            return Some((wanted, Vec::new(), Preferences::default()));
        }
        let prefs = match self.preferences.get(&stored.user_id).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(seq, error = %e, "preferences unavailable; will retry");
                return None;
            }
        };
        let category = stored.category.as_deref();
        let mut allowed = Vec::new();
        let mut suppressed_by = Vec::new();
        for channel in wanted {
            match self.policy.decide(&prefs, category, channel) {
                Ok(()) => allowed.push(channel),
                Err(suppressed) => {
                    if !tries.counted_suppressed {
                        metrics::counter!("herald_policy_suppressed_total", "channel" => channel.as_str())
                            .increment(1);
                    }
                    tracing::debug!(seq, id = %stored.id, channel = channel.as_str(), rule = %suppressed.rule, "suppressed by policy");
                    suppressed_by.push((channel, suppressed.rule.to_string()));
                }
            }
        }
        tries.counted_suppressed = true;
        Some((allowed, suppressed_by, prefs))
    }
}
