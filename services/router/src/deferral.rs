//! Quiet hours without a polling loop: the channel work of a notification that arrives
//! during the user's quiet hours is handed to JetStream's message scheduler.
//!
//! The router writes a schedule into the INBOX stream, on the user's schedule subject
//! (`herald.sched.<part>.<user>.q-<id>`, so a GDPR erase removes it with the rest), firing
//! at the end of the quiet hours into `herald.defer.<part>.<user>`. That subject is not
//! republished live and not part of the inbox pages, but the partition's router consumes
//! it — so the notification comes back to the router that owns the user, in order, after
//! a restart of anything, and is routed then (preferences and caps applied afresh). The
//! inbox entry itself was written at once; the `Herald-Seq` header carries its position
//! so the jobs point at it.

use async_nats::jetstream::message::PublishMessage;
use herald_protocol::streams::{INBOX, ROUTE_HEADER, SEQ_HEADER};
use herald_protocol::{StoredNotification, Subjects};
use herald_store::Nats;

/// Whether `subject` is a deferred subject (a notification back from quiet hours).
pub(crate) fn is_deferred(subjects: &Subjects, subject: &str) -> bool {
    subject
        .strip_prefix(subjects.prefix())
        .is_some_and(|rest| rest.starts_with(".defer."))
}

/// The inbox position a deferred copy carries.
pub(crate) fn inbox_seq(msg: &async_nats::jetstream::Message) -> Option<u64> {
    msg.headers.as_ref()?.get(SEQ_HEADER)?.as_str().parse().ok()
}

/// Schedules the channel work of `stored` (at inbox position `seq`) for `until`.
///
/// # Errors
/// The NATS error when the schedule is not stored.
pub(crate) async fn defer(
    nats: &Nats,
    subjects: &Subjects,
    stored: &StoredNotification,
    seq: u64,
    until: jiff::Timestamp,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let payload = serde_json::to_vec(stored)?;
    let schedule_id = format!("q-{}", stored.id);
    let publish = PublishMessage::build()
        .payload(payload.into())
        // A replayed router schedules once.
        .message_id(&schedule_id)
        .expected_stream(INBOX)
        .header("Nats-Schedule", format!("@at {until}").as_str())
        .header(
            "Nats-Schedule-Target",
            subjects.deferred(&stored.user_id).as_str(),
        )
        .header(ROUTE_HEADER, "1")
        .header(SEQ_HEADER, seq.to_string().as_str());
    nats.js
        .send_publish(subjects.scheduled(&stored.user_id, &schedule_id), publish)
        .await?
        .await?;
    Ok(())
}
