//! Quiet hours without a polling loop: the channel work of a notification that arrives
//! during the user's quiet hours is handed to JetStream's message scheduler.
//!
//! The router writes a schedule into the INBOX stream, on the user's schedule subject
//! (`herald.sched.<part>.<user>.q-<id>`, so a GDPR erase removes it with the rest), firing
//! at the end of the quiet hours into the user's deferred subject of the notification's
//! lane ([`Subjects::deferred_in`]: `herald.defer.<part>.<user>` for `normal`, with a
//! `.<lane>` token for the others). That subject is not republished live and not part of
//! the inbox pages, but the partition's router consumer of that lane reads it — so the
//! notification comes back to the router that owns the user, in order, after a restart
//! of anything, without waiting behind another lane's work, and is routed then
//! (preferences and caps applied afresh). The inbox entry itself was written at once; the
//! `Herald-Seq` header carries its position so the jobs point at it.
//!
//! The end of an aggregation window travels the same way (`g-<id>`, with the
//! `Herald-Group` header), so it too survives restarts and reaches the partition's owner.

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use herald_protocol::streams::{GROUP_HEADER, INBOX, ROUTE_HEADER, SEQ_HEADER};
use herald_protocol::{StoredNotification, Subjects};
use herald_store::Nats;

/// Header on a scheduled copy: the instant it was scheduled for (RFC 3339).
pub(crate) const UNTIL_HEADER: &str = "Herald-Until";

/// The instant a copy back from a schedule was scheduled for (see [`still_quiet`]).
pub(crate) fn scheduled_for(msg: &async_nats::jetstream::Message) -> Option<jiff::Timestamp> {
    msg.headers
        .as_ref()?
        .get(UNTIL_HEADER)?
        .as_str()
        .parse()
        .ok()
}

/// When the quiet hours of `prefs` hold work at `now`, their end — unless the work is
/// back from a schedule for that end or a later one (`back_from`, [`scheduled_for`]).
/// JetStream fires a schedule by the server's clock; a router whose clock is a little
/// behind still sees the same quiet hours, and deferring again for the same end would
/// be a schedule the dedup window drops, so the work would never come back. Only quiet
/// hours that end later than the schedule (changed meanwhile) hold it again.
pub(crate) fn still_quiet(
    prefs: &herald_protocol::Preferences,
    now: jiff::Timestamp,
    back_from: Option<jiff::Timestamp>,
) -> Option<jiff::Timestamp> {
    let until = prefs.quiet_until(now)?;
    match back_from {
        Some(back) if until <= back => None,
        _ => Some(until),
    }
}

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
    until: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    schedule(
        nats,
        subjects,
        stored,
        seq,
        until,
        &format!("q-{}", stored.id),
        None,
    )
    .await
}

/// Schedules the end of `stored`'s aggregation window (its group `key`) again for
/// `until`, when it ended during quiet hours: the message comes back with the
/// [`GROUP_HEADER`], and the router then closes the group and sends its folded text.
/// The first schedule is [`claim_window_close`]'s.
///
/// # Errors
/// The NATS error when the schedule is not stored.
pub(crate) async fn close_window_after_quiet(
    nats: &Nats,
    subjects: &Subjects,
    stored: &StoredNotification,
    seq: u64,
    key: &str,
    until: jiff::Timestamp,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // One schedule per end: quiet hours changed meanwhile defer it to a new one.
    let id = format!("gq-{}-{}", stored.id, until.as_second());
    schedule(
        nats,
        subjects,
        stored,
        seq,
        &until.to_string(),
        &id,
        Some(key),
    )
    .await
}

/// Whether a member of a group holds its window's close ([`claim_window_close`]).
pub(crate) enum Claim {
    /// This notification carries the close: its channel work waits for it.
    Mine,
    /// Another member carries it (or already did): this one is folded into it.
    Taken,
}

/// Schedules the close of the window of `stored`'s group, `first_id`, at `until` — unless
/// a member already did. The first member to reach the router carries the close, which
/// is usually the group's first notification; but that one may never come (refused after
/// it joined, or with nothing for the router to do), and then a later member must, or
/// every member would be folded into a close that never happens.
pub(crate) async fn claim_window_close(
    nats: &Nats,
    subjects: &Subjects,
    stored: &StoredNotification,
    seq: u64,
    first_id: &str,
    key: &str,
    until: &str,
) -> Result<Claim, Box<dyn std::error::Error + Send + Sync>> {
    let id = format!("g-{first_id}");
    let subject = subjects.scheduled(&stored.user_id, &id);
    let payload = serde_json::to_vec(stored)?;
    let publish = PublishMessage::build()
        .payload(payload.into())
        .message_id(format!("{id}:{}", stored.id))
        .expected_stream(INBOX)
        // Only onto an empty subject: the first claim wins.
        .expected_last_subject_sequence(0)
        .header("Nats-Schedule", format!("@at {until}").as_str())
        .header(
            "Nats-Schedule-Target",
            subjects
                .deferred_in(&stored.user_id, stored.priority)
                .as_str(),
        )
        .header(ROUTE_HEADER, "1")
        .header(SEQ_HEADER, seq.to_string().as_str())
        .header(UNTIL_HEADER, until)
        .header(GROUP_HEADER, key);
    match nats.js.send_publish(subject.clone(), publish).await?.await {
        Ok(_) => Ok(Claim::Mine),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
            // Claimed before: by this notification (a replayed router), or another.
            let carrier = herald_store::direct::last(&nats.consume, INBOX, &subject, None)
                .await?
                .and_then(|m| serde_json::from_slice::<StoredNotification>(&m.payload).ok());
            Ok(match carrier {
                Some(c) if c.id == stored.id => Claim::Mine,
                // Another member's, or fired already: the close counted this member.
                _ => Claim::Taken,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The group key a window-closing message names, if it is one.
pub(crate) fn closes_window(msg: &async_nats::jetstream::Message) -> Option<String> {
    Some(msg.headers.as_ref()?.get(GROUP_HEADER)?.as_str().to_owned())
}

async fn schedule(
    nats: &Nats,
    subjects: &Subjects,
    stored: &StoredNotification,
    seq: u64,
    until: &str,
    schedule_id: &str,
    group: Option<&str>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let payload = serde_json::to_vec(stored)?;
    let mut publish = PublishMessage::build()
        .payload(payload.into())
        // A replayed router schedules once.
        .message_id(schedule_id)
        .expected_stream(INBOX)
        .header("Nats-Schedule", format!("@at {until}").as_str())
        .header(
            "Nats-Schedule-Target",
            subjects
                .deferred_in(&stored.user_id, stored.priority)
                .as_str(),
        )
        .header(ROUTE_HEADER, "1")
        .header(SEQ_HEADER, seq.to_string().as_str())
        .header(UNTIL_HEADER, until);
    if let Some(key) = group {
        publish = publish.header(GROUP_HEADER, key);
    }
    nats.js
        .send_publish(subjects.scheduled(&stored.user_id, schedule_id), publish)
        .await?
        .await?;
    Ok(())
}
