//! Fan-out on write: a topic publish becomes one inbox entry per subscriber.
//!
//! `POST /v1/topics/{topic}/publish` stores one [`FanoutJob`] in the FANOUT work queue
//! and answers 202 (a big topic's publish is stored too; see [`big`]). A fan-out worker
//! (in every router process) pulls jobs one at a time and runs them side by side, each
//! lane within a budget of its own (see [`lanes`]); for each it reads the topic's
//! subscriptions page by page in stream order and appends a copy to each subscriber's inbox, pipelined. Every copy has an id derived
//! from (publish, user) and is appended with that `Nats-Msg-Id`, so replays are harmless.
//! After each page is acked, the progress — including the stream sequence of the last
//! subscription done — goes to KV, and the job's ack deadline is pushed out. A worker that
//! dies mid-way leaves the job unacked; it comes back to a worker after the ack wait and
//! resumes from the recorded cursor, without starting over and, within the dedup window,
//! without duplicates. Each copy is an ordinary inbox entry: live delivery and replay
//! apply to it unchanged.
//!
//! Policy per recipient: the preferences of a whole page of subscribers are read in one
//! batched direct get, and each copy asks only for the channels that recipient allows
//! (the inbox always records) — no storage round trip per recipient. The same read gives
//! each recipient's locale: a templated publish carries its texts in every locale the
//! template defines, and each copy is stored with its recipient's only
//! ([`herald_protocol::StoredNotification::localize`]).

mod big;
mod lanes;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use herald_protocol::notification::format_time;
use herald_protocol::streams::{FANOUT, FANOUT_CONSUMER};
use herald_protocol::topic::{FanoutJob, FanoutProgress, copy_id};
use herald_protocol::{Channel, Policy, UserId};
use herald_store::topics::{FanoutRun, PATH_HEADER, PATH_TOPIC, QUEUED};
use herald_store::{FanoutLog, Inbox, Nats, PreferenceStore, Subscriptions, TopicsError};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// Why the fan-out worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    /// The FANOUT consumer or the progress bucket is missing.
    #[error("opening the fan-out queue; run `herald provision`")]
    Open(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// How long a stopping worker waits for its running jobs to finish their current page.
const DRAIN: Duration = Duration::from_secs(10);

/// Runs the fan-out worker until `shutdown`, then drains: nothing new is pulled, and each
/// running job finishes the page it is on, records it and goes back to the queue (nak),
/// so the next owner resumes at once from a page boundary. A job dropped mid-page would
/// leave copies written beyond its recorded cursor, and a resume after the inbox's dedup
/// window would write them again: the same notification twice in those users' inboxes.
///
/// # Errors
/// [`FanoutError`] when the queue cannot be opened.
pub async fn run(
    nats: Nats,
    inbox: Inbox,
    subscriptions: Subscriptions,
    policy: Arc<Policy>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), FanoutError> {
    tokio::pin!(shutdown);
    // NATS away while the fan-out starts (a server restart): wait for it.
    let (consumer, log, preferences) = loop {
        match open_all(&nats).await {
            Ok(opened) => break opened,
            Err(FanoutError::Open(e)) if herald_store::is_unavailable(e.as_ref()) => {
                tracing::warn!(error = %e, "NATS unavailable while opening the fan-out; retrying");
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!("fan-out running");
    let stop = CancellationToken::new();
    let worker = Worker {
        inbox,
        subscriptions,
        log,
        preferences,
        policy,
        stop: stop.clone(),
    };
    let serve = Arc::new(worker).serve(nats, consumer);
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => return Ok(()),
        () = shutdown => {}
    }
    stop.cancel();
    if tokio::time::timeout(DRAIN, serve).await.is_err() {
        tracing::warn!(
            "fan-out jobs did not finish their page within {DRAIN:?}; they resume from their last recorded page"
        );
    }
    Ok(())
}

/// The fan-out queue's consumer, the progress log and the preferences bucket.
async fn open_all(nats: &Nats) -> Result<(PullConsumer, FanoutLog, PreferenceStore), FanoutError> {
    let open = |e: Box<dyn std::error::Error + Send + Sync>| FanoutError::Open(e);
    let consumer: PullConsumer = nats
        .js_consume
        .get_stream_no_info(FANOUT)
        .await
        .map_err(|e| open(Box::new(e)))?
        .get_consumer(FANOUT_CONSUMER)
        .await
        .map_err(open)?;
    let log = FanoutLog::open(&nats.js_consume)
        .await
        .map_err(|e| open(Box::new(e)))?;
    let preferences = PreferenceStore::open(&nats.js_consume)
        .await
        .map_err(|e| open(Box::new(e)))?;
    Ok((consumer, log, preferences))
}

pub(crate) struct Worker {
    inbox: Inbox,
    subscriptions: Subscriptions,
    log: FanoutLog,
    preferences: PreferenceStore,
    policy: Arc<Policy>,
    /// Cancelled when the worker stops: jobs end at their next page boundary.
    stop: CancellationToken,
}

/// How a job's run ended without error.
pub(crate) enum Ended {
    /// Every subscriber is done.
    Done,
    /// The worker is stopping: the pages done so far are recorded, the rest is left to
    /// whoever takes the job next.
    Stopped,
}

impl Worker {
    /// Runs one job to its end and acks it, or leaves it to be resumed.
    async fn run_job(&self, job: &FanoutJob, msg: &async_nats::jetstream::Message) {
        match self.fan_out(job, msg).await {
            Ok(Ended::Done) => {
                if let Err(e) = msg.double_ack().await {
                    tracing::warn!(id = %job.id, error = %e, "fan-out ack failed; it will be resumed and find itself done");
                }
            }
            Ok(Ended::Stopped) => {
                tracing::info!(id = %job.id, "stopping: fan-out handed back at a page boundary");
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
            Err(e) => {
                tracing::warn!(id = %job.id, error = %e, "fan-out interrupted; will resume");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                    .await;
            }
        }
    }

    /// Fans out from the recorded cursor to the end.
    async fn fan_out(
        &self,
        job: &FanoutJob,
        msg: &async_nats::jetstream::Message,
    ) -> Result<Ended, TopicsError> {
        let big = job.stored_seq.is_some()
            || msg
                .headers
                .as_ref()
                .and_then(|h| h.get(PATH_HEADER))
                .is_some_and(|v| v.as_str() == PATH_TOPIC);
        // The API records a publish as queued (with its topic) before queueing its job.
        let recorded = self
            .log
            .run(&job.id)
            .await?
            .filter(|r| r.progress.state != QUEUED);
        let mut run = match recorded {
            Some(r) if r.progress.state == "done" => return Ok(Ended::Done),
            Some(r) => r,
            None => FanoutRun {
                progress: FanoutProgress {
                    state: "running".into(),
                    total: self.subscriptions.count(&job.topic).await?,
                    started_at: format_time(OffsetDateTime::now_utc()),
                    path: if big { "topic" } else { "write" }.into(),
                    ..FanoutProgress::default()
                },
                ..FanoutRun::default()
            },
        };
        run.topic = Some(job.topic.clone());
        if big {
            let seq = match job.stored_seq.or(run.stored_seq) {
                Some(seq) => seq,
                None => self.stored_publish(job, msg).await?,
            };
            run.stored_seq = Some(seq);
            return self.channel_work(job, seq, run, msg).await;
        }
        self.log.put_run(&job.id, &run).await?;
        let mut pages = self
            .subscriptions
            .pages(&job.topic, run.progress.cursor + 1)
            .await?;
        while let Some(page) = pages.next_page().await? {
            let Some(last) = page.last().map(|(seq, _)| *seq) else {
                break;
            };
            let users: Vec<UserId> = page.iter().map(|(_, s)| s.user_id.clone()).collect();
            let prefs = if job
                .notification
                .channels
                .iter()
                .any(|c| *c != Channel::Inbox)
                || !job.notification.variants.is_empty()
            {
                self.preferences
                    .get_many(&users)
                    .await
                    .map_err(|e| TopicsError::Unavailable(Box::new(e)))?
            } else {
                HashMap::new()
            };
            let mut acks = Vec::with_capacity(page.len());
            for (_, sub) in &page {
                let p = prefs.get(&sub.user_id);
                let locale = p.and_then(|p| p.locale.as_deref());
                let mut copy = job.notification.clone().localize(locale);
                copy.id = copy_id(&job.id, &sub.user_id);
                copy.user_id = sub.user_id.clone();
                copy.topic = Some(job.topic.as_str().to_owned());
                if let Some(p) = p {
                    let category = copy.category.clone();
                    copy.channels.retain(|c| {
                        *c == Channel::Inbox
                            || self.policy.decide(p, category.as_deref(), *c).is_ok()
                    });
                }
                let bytes =
                    Inbox::encode(&copy).map_err(|e| TopicsError::Unavailable(Box::new(e)))?;
                acks.push(
                    self.inbox
                        .send(&copy, bytes)
                        .await
                        .map_err(|e| TopicsError::Unavailable(Box::new(e)))?,
                );
            }
            for ack in acks {
                ack.await
                    .map_err(|e| TopicsError::Unavailable(Box::new(e)))?;
            }
            run.progress.done += page.len() as u64;
            run.progress.cursor = last;
            run.progress.total = run.progress.total.max(run.progress.done);
            self.log.put_run(&job.id, &run).await?;
            metrics::counter!("herald_fanout_copies_total").increment(page.len() as u64);
            // Still working: push the job's ack deadline out.
            let _ = msg.ack_with(AckKind::Progress).await;
            if self.stop.is_cancelled() {
                return Ok(Ended::Stopped);
            }
        }
        run.progress.state = "done".into();
        run.progress.finished_at = Some(format_time(OffsetDateTime::now_utc()));
        self.log.put_run(&job.id, &run).await?;
        tracing::info!(id = %job.id, topic = %job.topic, copies = run.progress.done, "fan-out done");
        Ok(Ended::Done)
    }
}
