//! Firing a pending JetStream message schedule early, as the server's scheduler would at
//! its time: the test seam for schedules hours away (an email digest's period end).
//!
//! The schedule stays stored, so the real one would still fire at its time; what this
//! publishes is what the scheduler publishes — the schedule's payload and Herald headers
//! on its `Nats-Schedule-Target` — so the router handles it exactly as it would then.

use crate::Herald;
use anyhow::{Context as _, ensure};
use herald_protocol::UserId;
use herald_protocol::streams::INBOX;

/// The newest pending schedule of `user` whose id (last subject token) starts with
/// `kind` (`d-` for a digest), as `(subject, headers, payload)`; `None` when there is
/// none.
///
/// # Errors
/// When NATS cannot answer.
pub async fn pending(
    herald: &Herald,
    user: &str,
    kind: &str,
) -> anyhow::Result<Option<(String, async_nats::HeaderMap, bytes::Bytes)>> {
    let user = UserId::new(user)?;
    let client = herald.nats_client().await?;
    let filter = herald.subjects().scheduled_of(&user);
    let last = herald_store::direct::last(&client, INBOX, &filter, None).await?;
    Ok(last.and_then(|m| {
        let subject = m.headers.get("Nats-Subject")?.as_str().to_owned();
        let id = subject.rsplit('.').next()?;
        id.starts_with(kind)
            .then_some((subject, m.headers, m.payload))
    }))
}

/// Publishes `user`'s newest pending schedule of `kind` to its target now. Returns the
/// schedule's subject.
///
/// # Errors
/// When there is no such schedule or JetStream does not ack.
pub async fn fire_early(herald: &Herald, user: &str, kind: &str) -> anyhow::Result<String> {
    let (subject, stored, payload) = pending(herald, user, kind)
        .await?
        .with_context(|| format!("no pending {kind} schedule of {user}"))?;
    let target = stored
        .get("Nats-Schedule-Target")
        .context("schedule without a target")?
        .as_str()
        .to_owned();
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in stored.iter() {
        // Nats-* headers are the server's (schedule, dedup id, stored subject); a copy
        // carrying the schedule's Nats-Msg-Id would be dropped as a duplicate.
        if AsRef::<str>::as_ref(name).starts_with("Nats-") {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    let client = herald.nats_client().await?;
    let js = async_nats::jetstream::new(client);
    let ack = js
        .publish_with_headers(target, headers, payload)
        .await?
        .await?;
    ensure!(ack.stream == INBOX, "fired into {}", ack.stream);
    Ok(subject)
}
