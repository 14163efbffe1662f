//! A batch of jobs pulled together is prepared together, then each job runs on its own.
//!
//! Reading state one job at a time cost a worker a NATS round trip per read (sent
//! marker, target, preferences, seen position) for every job, and those round trips, not
//! the providers, bounded its throughput. Here a batch costs one batched direct get
//! (`multi_last`, up to 256 subjects each) per kind of state: its sent markers, and its
//! users' targets, preferences and (for push) seen positions. Jobs go to distinct users
//! far more often than not, so a read per distinct user would still be a read per job.
//! What a job reads is never older than the moment its batch was pulled, as it was when
//! each job read it itself.
//!
//! Push jobs on their first delivery still wait out the escalation delay first (a nak
//! with that delay), before anything is read for them.

use crate::job::{self, Context};
use async_nats::jetstream::Message;
use herald_channels::Target;
use herald_protocol::{Channel, Preferences, UserId};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;

/// Most jobs prepared together (one batched direct get of their sent markers).
pub const MAX_BATCH: usize = 256;

/// What a batch read about one user. An error is kept as text: each job of the user
/// then retries later, as it would have after its own failed read.
#[derive(Debug)]
pub struct UserView {
    /// The user's targets on the batch's channel.
    pub targets: Result<Vec<Target>, String>,
    /// Stored preferences (`None` when this worker does not check opt-outs).
    pub prefs: Option<Result<Preferences, String>>,
    /// Seen-live position (`None` except for push).
    pub seen: Option<Result<u64, String>>,
}

/// Prepares `pulled` (each with the permit of its concurrency slot) and runs every job
/// to its ack, nak or term.
pub async fn run(ctx: Arc<Context>, pulled: Vec<(Message, OwnedSemaphorePermit)>) {
    let mut live = Vec::with_capacity(pulled.len());
    for (msg, permit) in pulled {
        if let Some(p) = job::decode(&ctx, msg).await {
            let Some(claim) = Claim::new(&ctx, p.job.key()) else {
                // Redelivered while this worker still has the first copy: that copy
                // writes the sent marker, which this one finds when it comes back.
                job::settle(
                    &p.msg,
                    async_nats::jetstream::AckKind::Nak(Some(ctx.config.store_retry)),
                )
                .await;
                continue;
            };
            live.push((p, (permit, claim)));
        }
    }
    if live.is_empty() {
        return;
    }
    let jobs: Vec<_> = live.iter().map(|(p, _)| &p.job).collect();
    let markers = match ctx.deps.status.sent_markers(&jobs).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, jobs = live.len(), "sent markers unavailable; retrying the batch later");
            let reason = format!("sent markers unavailable: {e}");
            for (p, _) in &live {
                job::store_trouble(&ctx, p, &reason).await;
            }
            return;
        }
    };
    // Jobs already sent, and push jobs still within their escalation delay, need no reads.
    let mut ready = Vec::with_capacity(live.len());
    let mut tasks = JoinSet::new();
    for (p, (slot, claim)) in live {
        if let Some(marker) = markers.get(&claim.key).cloned() {
            let ctx = ctx.clone();
            tasks.spawn(async move {
                job::already_sent(&ctx, &p, marker).await;
                drop((slot, claim));
            });
        } else if let Some(wait) = job::escalation_wait(&ctx, &p) {
            job::settle(&p.msg, async_nats::jetstream::AckKind::Nak(Some(wait))).await;
        } else {
            ready.push((p, (slot, claim)));
        }
    }
    let users = read_users(&ctx, ready.iter().map(|(p, _)| &p.job.user_id)).await;
    for (p, permit) in ready {
        let Some(view) = users.get(&p.job.user_id).cloned() else {
            // Every user of `ready` was read; never leave a job unsettled all the same.
            job::store_trouble(&ctx, &p, "its user's state was not read").await;
            continue;
        };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            job::handle(&ctx, &p, &view).await;
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// A job key held in [`Context::in_flight`] until dropped, however the job ends.
struct Claim {
    ctx: Arc<Context>,
    key: String,
}

impl Claim {
    /// Claims `key`; `None` when this worker already holds it.
    fn new(ctx: &Arc<Context>, key: String) -> Option<Self> {
        let mut held = ctx.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(key.clone()).then(|| Self {
            ctx: Arc::clone(ctx),
            key,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.ctx.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.key);
    }
}

/// Reads what the jobs of `users` need, in one batched read per kind (targets,
/// preferences, seen positions) for all the batch's distinct users.
async fn read_users<'a>(
    ctx: &Context,
    users: impl Iterator<Item = &'a UserId>,
) -> HashMap<UserId, Arc<UserView>> {
    let mut distinct: Vec<UserId> = Vec::new();
    let mut known = std::collections::HashSet::new();
    for u in users {
        if known.insert(u) {
            distinct.push(u.clone());
        }
    }
    if distinct.is_empty() {
        return HashMap::new();
    }
    let channel = ctx.config.channel;
    let prefs = async {
        match &ctx.deps.optout {
            Some(optout) => Some(
                optout
                    .preferences_of(&distinct)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            None => None,
        }
    };
    let seen = async {
        match channel {
            Channel::Push => Some(
                ctx.seen
                    .get_many(&distinct)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            _ => None,
        }
    };
    let targets = ctx.deps.targets.targets_of_many(&distinct, channel);
    let (prefs, seen, targets) = tokio::join!(prefs, seen, targets);
    let mut targets = targets.map_err(|e| e.to_string());
    distinct
        .into_iter()
        .map(|user| {
            let targets = match &mut targets {
                Ok(all) => all
                    .remove(&user)
                    .unwrap_or_else(|| Ok(Vec::new()))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            let prefs = prefs.as_ref().map(|all| match all {
                Ok(map) => Ok(map.get(&user).cloned().unwrap_or_default()),
                Err(e) => Err(e.clone()),
            });
            let seen = seen.as_ref().map(|all| match all {
                Ok(map) => Ok(map.get(&user).copied().unwrap_or(0)),
                Err(e) => Err(e.clone()),
            });
            let view = UserView {
                targets,
                prefs,
                seen,
            };
            (user, Arc::new(view))
        })
        .collect()
}
