//! The worker runtime of one channel: one durable pull consumer per lane, each with its
//! own concurrency budget, so a backlog of `low` jobs never holds up a `high` one; each
//! job handled by [`crate::job`]. On shutdown no new job is pulled, and no new provider
//! call is begun: a job that has not begun its call (still being prepared, or waiting for
//! its provider's token bucket) goes back to the queue at once, and calls under way end
//! (answer or send timeout), are marked and acked within a grace period longer than the
//! send timeout. A call begun during the drain could be cut off when the grace ends, after
//! the provider accepted it, and be sent again on redelivery.
//!
//! While every provider of the channel has its circuit open or is paused by a throttle,
//! the lanes pull nothing, and then one job at a time for the half-open probe ([`Gate`]):
//! a pulled job that nothing can send could only be deferred, at the cost of one of its
//! `MaxDeliver` deliveries.

use crate::backoff::Backoff;
use crate::batch;
use crate::dlq::Dlq;
use crate::job::Context;
use crate::providers::{Gate, Providers};
use crate::unsubscribe::Links;
use async_nats::jetstream::consumer::PullConsumer;
use futures::{FutureExt as _, StreamExt as _};
use herald_protocol::streams;
use herald_protocol::{Channel, Priority, Subjects};
use herald_store::provision::{WorkerQueue, worker_consumer_config};
use herald_store::{Nats, StatusStore, Targets};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Jobs handled at once, per lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneBudget {
    /// `high` lane.
    pub high: usize,
    /// `normal` lane.
    pub normal: usize,
    /// `low` lane.
    pub low: usize,
}

impl LaneBudget {
    /// `n` for normal, and as much again for high (which is rarely busy but must never
    /// wait), a quarter for low.
    pub fn from_concurrency(n: usize) -> Self {
        let n = n.max(1);
        Self {
            high: n,
            normal: n,
            low: (n / 4).max(1),
        }
    }

    fn of(&self, lane: Priority) -> usize {
        match lane {
            Priority::High => self.high,
            Priority::Normal => self.normal,
            Priority::Low => self.low,
        }
        .max(1)
    }
}

/// How one channel's workers behave.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The channel.
    pub channel: Channel,
    /// Concurrency per lane.
    pub budget: LaneBudget,
    /// Consumer settings (ack wait, max deliver, max ack pending).
    pub queue: WorkerQueue,
    /// Push only: wait this long after acceptance for a live `ack` before pushing.
    pub escalation_delay: Duration,
    /// Longest a provider call may take before it counts as a transient failure.
    pub send_timeout: Duration,
    /// Back-off of transient failures.
    pub backoff: Backoff,
    /// How long in-flight jobs get at shutdown.
    pub drain_grace: Duration,
    /// How long a job whose state could not be read (NATS trouble) waits before it comes
    /// back.
    pub store_retry: Duration,
}

impl WorkerConfig {
    /// Defaults for `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            budget: LaneBudget::from_concurrency(64),
            queue: WorkerQueue::default(),
            escalation_delay: Duration::from_secs(5),
            send_timeout: Duration::from_secs(15),
            backoff: Backoff::default(),
            // Past the send timeout, so a provider call under way at SIGTERM ends (answer
            // or timeout) and its sent marker is written: a call aborted after the
            // provider accepted would be sent again on redelivery. Within the mesh's own
            // 20 s drain, so in-flight jobs settle before it aborts.
            drain_grace: Duration::from_secs(18),
            store_retry: crate::job::STORE_RETRY,
        }
    }

    /// The consumer settings actually applied: ack pending sized for the pool (in-flight
    /// jobs, plus room for jobs naked with a delay, which count until redelivered).
    pub fn queue_for(&self, lane: Priority) -> WorkerQueue {
        let in_flight = i64::try_from(self.budget.of(lane)).unwrap_or(i64::MAX);
        WorkerQueue {
            max_ack_pending: self.queue.max_ack_pending.max(in_flight * 4),
            ..self.queue
        }
    }
}

/// Fault-injection points for tests of crash windows. Production uses [`NoHooks`].
#[async_trait::async_trait]
pub trait Hooks: Send + Sync {
    /// Called after the sent marker is written and before the job is acked.
    async fn after_marked(&self, _job: &herald_protocol::ChannelJob) {}
}

/// No hooks.
#[derive(Debug, Default)]
pub struct NoHooks;

#[async_trait::async_trait]
impl Hooks for NoHooks {}

/// What a worker needs besides its configuration.
#[derive(Clone)]
pub struct WorkerDeps {
    /// NATS connections.
    pub nats: Nats,
    /// Subject scheme.
    pub subjects: Subjects,
    /// Target store.
    pub targets: Targets,
    /// Delivery status and sent markers.
    pub status: StatusStore,
    /// The providers.
    pub providers: Arc<Providers>,
    /// Unsubscribe links for email.
    pub links: Option<Links>,
    /// Preferences (opt-out) checks.
    pub optout: Option<crate::optout::OptOut>,
    /// Fault injection.
    pub hooks: Arc<dyn Hooks>,
}

impl std::fmt::Debug for WorkerDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerDeps")
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A stream, consumer or bucket is missing or NATS failed.
    #[error("opening {what} (run `herald provision`): {source}")]
    Open {
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn open_err(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> WorkerError {
    let what = what.into();
    move |source| WorkerError::Open { what, source }
}

/// Runs the workers of `config.channel` until `shutdown`, then drains.
///
/// # Errors
/// [`WorkerError`] when the channel's stream, consumers or buckets cannot be opened.
pub async fn run(
    config: WorkerConfig,
    deps: WorkerDeps,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let channel = config.channel;
    let js = &deps.nats.js_consume;
    let stream_name = streams::work_stream_name(channel);
    let stream = js
        .get_stream_no_info(stream_name)
        .await
        .map_err(|e| open_err(format!("stream {stream_name}"))(Box::new(e)))?;
    let seen = herald_store::ReadPositions::open_seen(js)
        .await
        .map_err(|e| open_err("the seen-position bucket")(Box::new(e)))?;
    let stop = CancellationToken::new();
    let ctx = Arc::new(Context {
        config: config.clone(),
        inbox: herald_store::Inbox::new(deps.nats.clone(), deps.subjects.clone()),
        seen,
        dlq: Dlq::new(deps.nats.clone(), deps.subjects.clone()),
        deps,
        in_flight: Default::default(),
        stop: stop.clone(),
    });
    let mut lanes = JoinSet::new();
    // High first: its consumer is opened and pulling before the others.
    for lane in Priority::ALL {
        let name = streams::worker_consumer(channel, lane);
        let consumer: PullConsumer = stream
            .create_consumer(worker_consumer_config(
                &ctx.deps.subjects,
                channel,
                lane,
                config.queue_for(lane),
            ))
            .await
            .map_err(|e| open_err(format!("consumer {name}"))(Box::new(e)))?;
        lanes.spawn(report_depth(channel, lane, consumer.clone(), stop.clone()));
        lanes.spawn(lane_loop(ctx.clone(), lane, consumer, stop.clone()));
    }
    tracing::info!(channel = channel.as_str(), budget = ?config.budget, "worker running");
    shutdown.await;
    stop.cancel();
    while lanes.join_next().await.is_some() {}
    Ok(())
}

/// How often queue depth is published as a metric.
const DEPTH_INTERVAL: Duration = Duration::from_secs(10);

/// Publishes the lane's queue depth (jobs waiting, and delivered but not yet acked) as
/// gauges for `/metrics`.
async fn report_depth(
    channel: Channel,
    lane: Priority,
    mut consumer: PullConsumer,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(DEPTH_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(info) = consumer.info().await {
            let labels = [("channel", channel.as_str()), ("lane", lane.as_str())];
            metrics::gauge!("herald_worker_queue_pending", &labels).set(info.num_pending as f64);
            metrics::gauge!("herald_worker_queue_ack_pending", &labels)
                .set(info.num_ack_pending as f64);
        }
    }
}

/// Slots a lane waits for before it takes a batch: an eighth of its budget, at most
/// [`batch::MAX_BATCH`]. Taking jobs as single slots free up made batches of one or two
/// under load, each paying the batch's reads alone.
fn batch_slots(budget: usize) -> usize {
    (budget / 8).clamp(1, batch::MAX_BATCH)
}

/// How long a lane waits for a whole batch's slots before it takes what is free: slots
/// held by a hung provider (up to the send timeout) must not idle the free ones.
const BATCH_WAIT: Duration = Duration::from_millis(10);

/// `chunk` slots, or after [`BATCH_WAIT`] as many as are free (at least one); `None`
/// once the semaphore is closed.
async fn batch_slots_free(
    permits: &Arc<Semaphore>,
    chunk: u32,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let whole = permits.clone().acquire_many_owned(chunk);
    if let Ok(slots) = tokio::time::timeout(BATCH_WAIT, whole).await {
        return slots.ok();
    }
    let mut slots = permits.clone().acquire_owned().await.ok()?;
    let more = u32::try_from(permits.available_permits())
        .unwrap_or(u32::MAX)
        .min(chunk - 1);
    if let Ok(extra) = permits.clone().try_acquire_many_owned(more) {
        slots.merge(extra);
    }
    Some(slots)
}

/// One slot out of `slots`, which holds at least one.
fn split_one(slots: &mut tokio::sync::OwnedSemaphorePermit) -> tokio::sync::OwnedSemaphorePermit {
    slots
        .split(1)
        .expect("a batch takes a job only while it holds a slot for it")
}

/// Pull expiry of one lane's fetch loop.
const PULL_EXPIRY: Duration = Duration::from_secs(5);

/// Longest wait at a shut gate before looking again (a breaker's state changes are also
/// signalled, so this only bounds a missed one).
const GATE_RECHECK: Duration = Duration::from_secs(1);

/// Waits until the channel's gate lets this lane pull ([`Gate::Open`] or
/// [`Gate::Probe`]); `None` once stopped.
async fn at_gate(ctx: &Context, stop: &CancellationToken) -> Option<Gate> {
    let providers = &ctx.deps.providers;
    loop {
        let changed = providers.changed();
        let wait = match providers.gate(ctx.config.channel) {
            Gate::Shut(wait) => wait.clamp(Duration::from_millis(10), GATE_RECHECK),
            open => return Some(open),
        };
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = changed => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Pulls one job for a circuit's half-open probe and waits until it has run, so the
/// next look at the gate sees the probe's verdict. `false` once stopped.
async fn probe(
    ctx: &Arc<Context>,
    lane: Priority,
    consumer: &PullConsumer,
    permits: &Arc<Semaphore>,
    in_flight: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> bool {
    let slot = tokio::select! {
        _ = stop.cancelled() => return false,
        slot = permits.clone().acquire_owned() => match slot {
            Ok(slot) => slot,
            Err(_) => return false,
        },
    };
    let fetched = consumer
        .fetch()
        .max_messages(1)
        .expires(PULL_EXPIRY)
        .messages()
        .await;
    let mut batch = match fetched {
        Ok(batch) => batch,
        Err(e) => {
            tracing::warn!(channel = ctx.config.channel.as_str(), lane = lane.as_str(), error = %e, "worker probe pull failed; retrying");
            return tokio::select! {
                _ = stop.cancelled() => false,
                _ = tokio::time::sleep(Duration::from_secs(1)) => true,
            };
        }
    };
    let msg = tokio::select! {
        _ = stop.cancelled() => return false,
        next = batch.next() => next,
    };
    let Some(Ok(msg)) = msg else {
        // Nothing queued on this lane (or a pull status): look at the gate again.
        return true;
    };
    let (done, ran) = tokio::sync::oneshot::channel();
    let ctx = ctx.clone();
    in_flight.spawn(async move {
        batch::run(ctx, vec![(msg, slot)]).await;
        let _ = done.send(());
    });
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = ran => true,
    }
}

/// Pulls at once per lane: enough to hold every slot of the budget in pulls of
/// [`batch_slots`] each.
fn max_pulls(budget: usize) -> usize {
    budget.div_ceil(batch_slots(budget))
}

async fn lane_loop(
    ctx: Arc<Context>,
    lane: Priority,
    consumer: PullConsumer,
    stop: CancellationToken,
) {
    let budget = ctx.config.budget.of(lane);
    let permits = Arc::new(Semaphore::new(budget));
    let chunk = u32::try_from(batch_slots(budget)).unwrap_or(1);
    let pulls = Arc::new(Semaphore::new(max_pulls(budget)));
    let mut in_flight = JoinSet::new();
    let channel = ctx.config.channel.as_str();
    'pull: while !stop.is_cancelled() {
        match at_gate(&ctx, &stop).await {
            None => break 'pull,
            Some(Gate::Open) => {}
            Some(_) => {
                if !probe(&ctx, lane, &consumer, &permits, &mut in_flight, &stop).await {
                    break 'pull;
                }
                continue 'pull;
            }
        }
        // Slots first, then a pull for exactly that many jobs: a job is never handed to
        // this process without a slot to run it in, where it tells JetStream it is in
        // progress while it waits (`job::in_progress`). A job waiting in a client buffer
        // instead would outlive `AckWait` behind a slow bucket and be delivered to
        // another worker too. Several pulls are outstanding at once, so the next jobs are
        // on their way while a batch runs; under load each takes `chunk` jobs, so a
        // batch's shared reads (sent markers, preferences, targets) serve many.
        let (pull, slots) = tokio::select! {
            _ = stop.cancelled() => break 'pull,
            taken = async {
                let pull = pulls.clone().acquire_owned().await.ok()?;
                let slots = batch_slots_free(&permits, chunk).await?;
                Some((pull, slots))
            } => match taken {
                Some(taken) => taken,
                None => break 'pull,
            },
        };
        let fetched = consumer
            .batch()
            .max_messages(slots.num_permits())
            .expires(PULL_EXPIRY)
            .messages()
            .await;
        let jobs = match fetched {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(channel, lane = lane.as_str(), error = %e, "worker pull failed; retrying");
                drop((pull, slots));
                tokio::select! {
                    _ = stop.cancelled() => break 'pull,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'pull,
                }
            }
        };
        in_flight.spawn(take_pull(
            ctx.clone(),
            lane,
            Pull {
                jobs,
                slots,
                _pull: pull,
            },
            stop.clone(),
        ));
        while in_flight.try_join_next().is_some() {}
    }
    // Drain: finish the provider calls under way (jobs that had not begun theirs went back
    // to the queue, see `job`); unpulled jobs stay in the queue for the next worker.
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(ctx.config.drain_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            channel,
            lane = lane.as_str(),
            "drain grace over; unfinished jobs will be redelivered"
        );
        in_flight.abort_all();
    }
}

/// Longest a batch waits for the next job of its pull while the server says more are
/// queued (they may go to another pull first).
const BATCH_LINGER: Duration = Duration::from_millis(2);

/// Whether the server had more jobs queued when it delivered `msg`.
fn queued_behind(msg: &async_nats::jetstream::Message) -> bool {
    msg.info().is_ok_and(|info| info.pending > 0)
}

/// One outstanding pull: the jobs it brings, a slot for each it may bring, and its place
/// among the lane's pulls.
struct Pull {
    jobs: async_nats::jetstream::consumer::pull::Batch,
    slots: tokio::sync::OwnedSemaphorePermit,
    _pull: tokio::sync::OwnedSemaphorePermit,
}

/// Runs the jobs of one pull as they arrive, those that arrive together as one batch,
/// until the pull is filled or expires, the channel's gate shuts, or the worker stops;
/// then waits for its batches. Slots the pull did not fill return at once.
async fn take_pull(ctx: Arc<Context>, lane: Priority, pull: Pull, stop: CancellationToken) {
    let Pull {
        mut jobs,
        mut slots,
        _pull,
    } = pull;
    let channel = ctx.config.channel.as_str();
    let mut batches = JoinSet::new();
    while slots.num_permits() > 0 {
        let changed = ctx.deps.providers.changed();
        if ctx.deps.providers.gate(ctx.config.channel) != Gate::Open {
            // Every circuit opened: take no more (jobs the server sends this pull after
            // it is dropped come back after `AckWait`, once).
            break;
        }
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            // A circuit changed while the queue was idle: look at the gate again before
            // a job arrives that nothing could send.
            _ = changed => continue,
            next = jobs.next() => next,
        };
        let first = match next {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                tracing::debug!(channel, lane = lane.as_str(), error = %e, "worker pull ended");
                break;
            }
            None => break,
        };
        // The jobs on their way join the batch: while the server says more are queued
        // (each delivery carries the count) and the pull has room, the next is an
        // instant away. An idle queue's single job goes at once.
        let mut more = queued_behind(&first);
        let mut pulled = Vec::with_capacity(slots.num_permits());
        pulled.push((first, split_one(&mut slots)));
        while slots.num_permits() > 0 {
            let next = match jobs.next().now_or_never() {
                Some(next) => next,
                None if more => tokio::time::timeout(BATCH_LINGER, jobs.next())
                    .await
                    .unwrap_or(None),
                None => break,
            };
            match next {
                Some(Ok(msg)) => {
                    more = queued_behind(&msg);
                    pulled.push((msg, split_one(&mut slots)));
                }
                Some(Err(e)) => {
                    tracing::debug!(channel, lane = lane.as_str(), error = %e, "worker pull ended");
                    break;
                }
                None => break,
            }
        }
        metrics::counter!("herald_worker_batches_total", "channel" => channel, "lane" => lane.as_str())
            .increment(1);
        batches.spawn(batch::run(ctx.clone(), pulled));
        while batches.try_join_next().is_some() {}
    }
    // The pull's place and unfilled slots go back before its batches end.
    drop((jobs, slots, _pull));
    while batches.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_under_way_at_shutdown_has_time_to_end_and_be_marked() {
        for channel in [
            Channel::Push,
            Channel::Email,
            Channel::Sms,
            Channel::Webhook,
        ] {
            let config = WorkerConfig::new(channel);
            assert!(
                config.drain_grace > config.send_timeout + Duration::from_secs(1),
                "{config:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_takes_its_slots_or_after_a_while_what_is_free() {
        let permits = Arc::new(Semaphore::new(16));
        let whole = batch_slots_free(&permits, 8).await.expect("open");
        assert_eq!(whole.num_permits(), 8);
        drop(whole);

        // A hung provider holds 13 slots: the lane still gets the 3 that are free.
        let hung = permits.clone().acquire_many_owned(13).await.expect("open");
        let started = tokio::time::Instant::now();
        let some = batch_slots_free(&permits, 8).await.expect("open");
        assert_eq!(some.num_permits(), 3);
        assert_eq!(started.elapsed(), BATCH_WAIT);
        drop((some, hung));

        permits.close();
        assert!(batch_slots_free(&permits, 8).await.is_none());
    }

    #[test]
    fn a_batch_is_an_eighth_of_the_budget_within_bounds() {
        assert_eq!(batch_slots(1), 1);
        assert_eq!(batch_slots(64), 8);
        assert_eq!(batch_slots(1_024), 128);
        assert_eq!(batch_slots(100_000), batch::MAX_BATCH);
    }

    #[test]
    fn the_pulls_of_a_lane_can_hold_its_whole_budget() {
        for budget in [1, 7, 8, 64, 100, 1_024, 100_000] {
            assert!(
                max_pulls(budget) * batch_slots(budget) >= budget,
                "{budget}"
            );
        }
        assert_eq!(max_pulls(1), 1);
        assert_eq!(max_pulls(1_024), 8);
    }
}
