//! The big-topic path's fan-out: channel work only.
//!
//! A big topic's publish is stored once (every subscriber's view merges it), so no inbox
//! entry is written per subscriber. The API queues the job first and stores the publish
//! second; a job whose publish is not stored (the API stopped in between, or its append
//! failed) stores it itself ([`Worker::stored_publish`]), so the job, once durable, carries
//! the whole publish through. What remains per recipient is the
//! interrupting channels — push, email, SMS, webhook — for those whose preferences want
//! them. The job reads the topic's subscribers a page at a time, reads the page's
//! preferences and whether each has a device or contact record (batched direct gets, side
//! by side), and hands each subscriber that wants at least one such channel and may be
//! reached on it to the router that owns them (at a million subscribers of whom a tenth
//! have a device, that is 100,000 hand-overs instead of 1,000,000): their copy goes onto
//! their routing subject of the publish's lane ([`herald_protocol::Subjects::deferred_in`],
//! consumed by that lane's router consumer of their partition) with its inbox position in `Herald-Seq` and `Herald-Fanout` set, so the
//! router applies quiet hours, rate caps and targets exactly as for a personal
//! notification, and records its delivery status. Each hand-over has `Nats-Msg-Id`
//! `r-<copy id>`, progress is recorded after every page, and a crashed job resumes from
//! its cursor: every subscriber is handed over once.
//!
//! A templated publish is stored with its texts in every locale the template defines
//! ([`herald_protocol::locale`]); each subscriber's copy is localized from their
//! preferences (the same batched read), and the router puts the chosen locale on each
//! channel job so the worker sends that subscriber's language.

use crate::{Ended, Worker};
use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::PublishMessage;
use herald_protocol::notification::format_time;
use herald_protocol::streams::{FANOUT_HEADER, INBOX, ROUTE_HEADER, SEQ_HEADER};
use herald_protocol::topic::{FanoutJob, for_subscriber};
use herald_protocol::{Channel, UserId};
use herald_store::TopicsError;
use herald_store::topics::FanoutRun;
use time::OffsetDateTime;

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> TopicsError {
    TopicsError::Unavailable(Box::new(e))
}

impl Worker {
    /// Hands the subscribers who want interrupting channels to their routers, from the
    /// recorded cursor to the end. `seq` is the stored publish's inbox position.
    pub(crate) async fn channel_work(
        &self,
        job: &FanoutJob,
        seq: u64,
        mut run: FanoutRun,
        msg: &async_nats::jetstream::Message,
    ) -> Result<Ended, TopicsError> {
        let wants_channels = job
            .notification
            .channels
            .iter()
            .any(|c| *c != Channel::Inbox);
        if !wants_channels {
            // Nothing per recipient: every view already holds it.
            run.progress.done = run.progress.total;
            return self.finish(job, run).await;
        }
        self.log.put_run(&job.id, &run).await?;
        let nats = self.inbox.nats();
        let subjects = self.inbox.subjects();
        let mut pages = self
            .subscriptions
            .pages(&job.topic, run.progress.cursor + 1)
            .await?;
        while let Some(page) = pages.next_page().await? {
            let Some(last) = page.last().map(|(seq, _)| *seq) else {
                break;
            };
            // Those who subscribed after the publish do not see it.
            let users: Vec<UserId> = page
                .iter()
                .filter(|(_, s)| s.since < seq)
                .map(|(_, s)| s.user_id.clone())
                .collect();
            // Preferences and reachability of the whole page, side by side: a hand-over
            // costs a durable write and a router's work, so only those who want an
            // interrupting channel and may be reached on it get one.
            let (prefs, reach) = tokio::try_join!(
                async { self.preferences.get_many(&users).await.map_err(unavailable) },
                async {
                    herald_store::targets::reachable(&nats.consume, &users)
                        .await
                        .map_err(unavailable)
                },
            )?;
            let category = job.notification.category.as_deref();
            let mut acks = Vec::new();
            for user in &users {
                let (Some(p), Some(reach)) = (prefs.get(user), reach.get(user)) else {
                    continue;
                };
                // Localized here, so the router records and defers this subscriber's
                // texts; the job it enqueues names the locale for the worker, which reads
                // the stored publish (see `ChannelJob::locale`).
                let mut copy =
                    for_subscriber(job.notification.clone(), user).localize(p.locale.as_deref());
                copy.channels.retain(|c| {
                    *c == Channel::Inbox
                        || (reach.may_reach(*c) && self.policy.decide(p, category, *c).is_ok())
                });
                if copy.channels.iter().all(|c| *c == Channel::Inbox) {
                    continue;
                }
                let payload = serde_json::to_vec(&copy).map_err(unavailable)?;
                let publish = PublishMessage::build()
                    .payload(payload.into())
                    .message_id(format!("r-{}", copy.id))
                    .expected_stream(INBOX)
                    .header(ROUTE_HEADER, "1")
                    .header(FANOUT_HEADER, "1")
                    .header(SEQ_HEADER, seq.to_string().as_str());
                // On the routing subject of the publish's lane: a `high` publish's channel
                // work is never held up by `normal` or `low` work the router is stuck on.
                let subject = subjects.deferred_in(user, job.notification.priority);
                acks.push(
                    nats.js
                        .send_publish(subject, publish)
                        .await
                        .map_err(unavailable)?,
                );
            }
            let handed = acks.len() as u64;
            for ack in acks {
                ack.await.map_err(unavailable)?;
            }
            run.progress.done += page.len() as u64;
            run.progress.routed += handed;
            run.progress.cursor = last;
            run.progress.total = run.progress.total.max(run.progress.done);
            self.log.put_run(&job.id, &run).await?;
            metrics::counter!("herald_fanout_routed_total").increment(handed);
            let _ = msg.ack_with(AckKind::Progress).await;
            if self.stop.is_cancelled() {
                return Ok(Ended::Stopped);
            }
        }
        self.finish(job, run).await
    }

    async fn finish(&self, job: &FanoutJob, mut run: FanoutRun) -> Result<Ended, TopicsError> {
        run.progress.state = "done".into();
        run.progress.finished_at = Some(format_time(OffsetDateTime::now_utc()));
        self.log.put_run(&job.id, &run).await?;
        tracing::info!(id = %job.id, topic = %job.topic, subscribers = run.progress.done, routed = run.progress.routed, "big-topic fan-out done");
        Ok(Ended::Done)
    }

    /// The INBOX sequence of a big-topic job's publish. The API stores the publish right
    /// after queueing its job; when it stopped in between, the publish is stored here
    /// (deduplicated by id, so an API append racing this one stores nothing more). It is
    /// looked for first, from a while before the job was queued, because this job may
    /// come long after the INBOX dedup window.
    pub(crate) async fn stored_publish(
        &self,
        job: &FanoutJob,
        msg: &async_nats::jetstream::Message,
    ) -> Result<u64, TopicsError> {
        let queued = msg
            .info()
            .map_or_else(|_| OffsetDateTime::now_utc(), |i| i.published);
        let subject = self
            .inbox
            .subjects()
            .topic_inbox_entry(&job.topic, job.notification.priority);
        let found = herald_store::topics::find_publish(
            self.inbox.nats(),
            &subject,
            &job.id,
            queued - STORED_BEFORE_QUEUED,
        )
        .await?;
        if let Some(seq) = found {
            return Ok(seq);
        }
        let mut publish = job.notification.clone();
        publish.topic = Some(job.topic.as_str().to_owned());
        let stored = self
            .inbox
            .append_topic(&job.topic, &publish)
            .await
            .map_err(unavailable)?;
        tracing::info!(id = %job.id, topic = %job.topic, seq = stored.seq, duplicate = stored.duplicate, "big-topic publish stored by its fan-out job");
        Ok(stored.seq)
    }
}

/// How long before its job was queued a big topic's publish may have been stored and
/// still be that job's: the API stores it after the job, so this only covers clocks of
/// the FANOUT and INBOX stream leaders a little apart.
const STORED_BEFORE_QUEUED: time::Duration = time::Duration::seconds(60);
