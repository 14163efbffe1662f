//! Priority lanes: a `high` publish (a security alert to a small topic) never waits
//! behind a `low` one (a marketing blast to a million subscribers, 70–90 s of work).
//!
//! Two layers. Each process runs the jobs of each lane with a budget of its own
//! ([`LANE_JOBS`]), so a running `low` fan-out never holds up a `high` one in the same
//! process. And provisioning gives the FANOUT stream one subject per lane
//! ([`herald_store::topics::fanout_lane`]) and each lane a consumer of its own
//! ([`herald_store::topics::fanout_lane_consumer`]), so a `high` job never waits in the
//! queue behind `low` jobs either. The first consumer keeps the lane-less subject, where
//! jobs queued by earlier versions wait. On a queue an earlier version provisioned (until
//! `herald provision` runs again) every job comes through the one consumer, in order: a job
//! whose lane is busy is held (its ack deadline pushed out) and the consumer is not read
//! past it, so a `high` job can still wait behind a *queued* `low` one, though never behind
//! a running one that came before it. The worker looks for the lanes every [`LANE_CHECK`]
//! and starts their consumers when they appear.

use crate::Worker;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::Config;
use futures::StreamExt as _;
use herald_protocol::Priority;
use herald_protocol::streams::FANOUT;
use herald_protocol::topic::FanoutJob;
use herald_store::Nats;
use herald_store::topics::{fanout_lane_consumer, fanout_lane_consumer_config, fanout_lanes};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Jobs of one lane a process runs at once: `high`, `normal`, `low`.
pub(crate) const LANE_JOBS: [usize; 3] = [4, 1, 1];

/// How often a worker without lane consumers looks for the stream's lane subjects.
const LANE_CHECK: Duration = Duration::from_secs(5);

/// How often a held job's ack deadline (30 s) is pushed out while it waits for its lane.
const HOLD_PROGRESS: Duration = Duration::from_secs(10);

/// The job budget of each lane in this process.
pub(crate) struct Lanes {
    budgets: [Arc<Semaphore>; 3],
}

impl Lanes {
    pub(crate) fn new() -> Self {
        Self {
            budgets: LANE_JOBS.map(|n| Arc::new(Semaphore::new(n))),
        }
    }

    fn budget(&self, lane: Priority) -> Arc<Semaphore> {
        let i = Priority::ALL.iter().position(|p| *p == lane).unwrap_or(1);
        self.budgets[i].clone()
    }
}

impl Worker {
    /// Serves the fan-out queue: `legacy` (the consumer of every job, or of the jobs on
    /// the one subject once there are lanes), and each lane's consumer once the stream
    /// has lane subjects.
    pub(crate) async fn serve(self: Arc<Self>, nats: Nats, legacy: PullConsumer) {
        let lanes = Arc::new(Lanes::new());
        let mut sources = JoinSet::new();
        sources.spawn(self.clone().source(legacy, lanes.clone()));
        let mut warned = false;
        while !self.stop.is_cancelled() {
            match open_lanes(&nats, self.inbox.subjects()).await {
                Ok(Some(consumers)) => {
                    for consumer in consumers {
                        sources.spawn(self.clone().source(consumer, lanes.clone()));
                    }
                    tracing::info!("fan-out lanes open: a consumer per priority");
                    break;
                }
                Ok(None) => {}
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "the FANOUT stream has lane subjects but their consumers cannot be opened (is `herald-fanout` still unfiltered? run `herald provision`); every job goes through the one consumer meanwhile");
                }
                Err(e) => tracing::debug!(error = %e, "fan-out lane consumers still unavailable"),
            }
            tokio::select! {
                () = self.stop.cancelled() => {}
                () = tokio::time::sleep(LANE_CHECK) => {}
            }
        }
        while let Some(ended) = sources.join_next().await {
            if let Err(e) = ended {
                tracing::error!(error = %e, "a fan-out consumer loop failed");
            }
        }
    }

    /// Pulls jobs from `consumer` one at a time and runs each within its lane's budget,
    /// side by side with the jobs of other lanes. A job whose lane has no room is held
    /// until it has; meanwhile nothing more is pulled from this consumer. Once the worker
    /// stops, nothing more is pulled, and this returns when the running jobs have ended.
    async fn source(self: Arc<Self>, consumer: PullConsumer, lanes: Arc<Lanes>) {
        let mut running = JoinSet::new();
        'pulling: while !self.stop.is_cancelled() {
            while let Some(ended) = running.try_join_next() {
                if let Err(e) = ended {
                    tracing::error!(error = %e, "a fan-out job failed");
                }
            }
            let batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(5))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "fan-out pull failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    () = self.stop.cancelled() => break 'pulling,
                    next = batch.next() => next,
                };
                let Some(msg) = next else { break };
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) => {
                        tracing::debug!(error = %e, "fan-out stream error");
                        continue;
                    }
                };
                let job: FanoutJob = match serde_json::from_slice(&msg.payload) {
                    Ok(j) => j,
                    Err(e) => {
                        tracing::error!(error = %e, "undecodable fan-out job; dropping it");
                        let _ = msg.ack_with(AckKind::Term).await;
                        continue;
                    }
                };
                let budget = lanes.budget(job.notification.priority);
                let Some(permit) = hold(&msg, budget, &self.stop).await else {
                    // Stopping: the job goes back to the queue for the next owner.
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                    break 'pulling;
                };
                let worker = self.clone();
                running.spawn(async move {
                    worker.run_job(&job, &msg).await;
                    drop(permit);
                });
            }
        }
        while let Some(ended) = running.join_next().await {
            if let Err(e) = ended {
                tracing::error!(error = %e, "a fan-out job failed");
            }
        }
    }
}

/// Waits for room in a lane's `budget`, pushing `msg`'s ack deadline out meanwhile so it
/// is not delivered again elsewhere. `None` when the worker stops first (or the budget
/// was closed, which it never is).
async fn hold(
    msg: &async_nats::jetstream::Message,
    budget: Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    let acquire = budget.acquire_owned();
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            permit = &mut acquire => return permit.ok(),
            () = tokio::time::sleep(HOLD_PROGRESS) => {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// The consumers of the lanes, created if missing, when the FANOUT stream has a subject
/// per lane; `None` while it has not.
async fn open_lanes(
    nats: &Nats,
    subjects: &herald_protocol::Subjects,
) -> Result<Option<Vec<PullConsumer>>, Box<dyn std::error::Error + Send + Sync>> {
    if !fanout_lanes(&nats.js_consume, subjects).await? {
        return Ok(None);
    }
    let stream = nats.js_consume.get_stream_no_info(FANOUT).await?;
    let mut consumers = Vec::with_capacity(Priority::ALL.len());
    for lane in Priority::ALL {
        let name = fanout_lane_consumer(lane);
        consumers.push(
            stream
                .get_or_create_consumer::<Config>(
                    &name,
                    fanout_lane_consumer_config(subjects, lane),
                )
                .await?,
        );
    }
    Ok(Some(consumers))
}
