//! Email digests: users who choose `"digest": "hourly"` or `"daily"` get one email per
//! period listing what they missed, instead of one email per notification.
//!
//! Why this shape: the router owns each user (one per partition), so it records a
//! notification's email into the user's digest ([`DigestEntry`], one JetStream message on
//! the user's digest subject) and makes sure one JetStream schedule exists for the end of
//! the user's period ([`period_end`], computed in their time zone). When the schedule
//! fires, the same router builds one email from what is recorded and still unread
//! ([`DigestMail`], carried by the email job) and clears the period. Nothing polls, and
//! everything lives in NATS, so a restart of anything loses nothing.

use crate::preferences::Digest;
use serde::{Deserialize, Serialize};

/// The length of an `hourly` period unless configured otherwise, seconds.
pub const DEFAULT_HOURLY_S: u64 = 3600;

/// How digests are timed, configured once for every user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestSettings {
    /// Length of an `hourly` period, seconds; divides an hour, and periods are aligned to
    /// the user's local clock (with 3600, one ends at every full local hour). Shorter
    /// periods are for tests and demos.
    pub hourly_s: u64,
}

impl Default for DigestSettings {
    fn default() -> Self {
        Self {
            hourly_s: DEFAULT_HOURLY_S,
        }
    }
}

impl DigestSettings {
    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming `digest_hourly_s` when it does not divide an hour.
    pub fn check(&self) -> Result<(), String> {
        if self.hourly_s == 0 || 3600 % self.hourly_s != 0 {
            return Err(format!(
                "digest_hourly_s must divide 3600 (e.g. 3600, 900, 60), not {}",
                self.hourly_s
            ));
        }
        Ok(())
    }
}

/// When the digest period that contains `now` ends for a user in `tz`: the next full
/// local hour (or `hourly_s` step) for `hourly`, the next local midnight for `daily`;
/// `None` for `off`.
///
/// Daylight saving time: a daily period ends at local midnight, so the day it changes is
/// 23 or 25 hours long; an hourly period is always `hourly_s` of real time, aligned to the
/// local clock (in a repeated hour the offset in force is kept, so the hour is not
/// skipped or counted twice). A midnight that does not exist (a gap at 00:00) resolves
/// to the first instant after it.
pub fn period_end(
    digest: Digest,
    tz: &jiff::tz::TimeZone,
    now: jiff::Timestamp,
    settings: DigestSettings,
) -> Option<jiff::Timestamp> {
    let local = now.to_zoned(tz.clone());
    match digest {
        Digest::Off => None,
        Digest::Hourly => {
            let step = i64::try_from(settings.hourly_s.clamp(1, 3600)).ok()?;
            let since_midnight = i64::from(local.hour()) * 3600
                + i64::from(local.minute()) * 60
                + i64::from(local.second());
            let into_period = since_midnight % step;
            // Back to the period's start on the local clock, then forward in real time.
            let end = local
                .timestamp()
                .checked_sub(jiff::SignedDuration::from_secs(into_period))
                .ok()?
                .checked_sub(jiff::SignedDuration::from_nanos(i64::from(
                    local.subsec_nanosecond(),
                )))
                .ok()?
                .checked_add(jiff::SignedDuration::from_secs(step))
                .ok()?;
            Some(end)
        }
        Digest::Daily => {
            let tomorrow = local.date().tomorrow().ok()?;
            tomorrow
                .to_datetime(jiff::civil::Time::midnight())
                .to_zoned(tz.clone())
                .ok()
                .map(|z| z.timestamp())
        }
    }
}

/// One notification recorded for a user's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestEntry {
    /// Notification id.
    pub id: String,
    /// Its inbox position (left out of the digest once read or seen live).
    pub seq: u64,
    /// The end of the period it belongs to, RFC 3339.
    pub period_end: String,
    /// Its title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Its body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Its category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// When it was accepted, RFC 3339.
    pub created_at: String,
}

/// What fires at the end of a user's digest period (the schedule's payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestDue {
    /// The user.
    pub user_id: crate::UserId,
    /// The period's frequency.
    pub digest: Digest,
    /// The end of the period, RFC 3339.
    pub period_end: String,
}

/// The one email of a digest, rendered when its period ended; carried by the email job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestMail {
    /// Subject.
    pub subject: String,
    /// Plain-text part.
    pub text: String,
    /// HTML part.
    pub html: String,
    /// Notifications listed.
    pub count: u64,
}

/// The id of the digest of `user` for the period ending at `period_end` (unix seconds):
/// stable, so the email job's `Nats-Msg-Id` and sent marker make a replay send nothing
/// twice. Not a notification id: it names no inbox entry.
pub fn digest_id(user: &crate::UserId, period_end: i64) -> String {
    format!("digest-{period_end}-{}", user.token())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().expect("timestamp")
    }

    fn berlin() -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get("Europe/Berlin").expect("tz")
    }

    const HOUR: DigestSettings = DigestSettings { hourly_s: 3600 };

    #[test]
    fn daily_ends_at_local_midnight_and_dst_days_are_23_or_25_hours() {
        let tz = berlin();
        let end = |now| period_end(Digest::Daily, &tz, at(now), HOUR);
        // Winter, UTC+1: midnight is 23:00 UTC the day before.
        assert_eq!(
            end("2026-03-28T11:00:00Z"),
            Some(at("2026-03-28T23:00:00Z"))
        );
        // 29 March 2026: clocks go forward at 02:00 → the day is 23 hours long.
        assert_eq!(
            end("2026-03-29T10:00:00Z"),
            Some(at("2026-03-29T22:00:00Z"))
        );
        // 25 October 2026: clocks go back at 03:00 → 25 hours, ending 23:00 UTC.
        assert_eq!(
            end("2026-10-24T21:59:59Z"),
            Some(at("2026-10-24T22:00:00Z"))
        );
        assert_eq!(
            end("2026-10-25T01:30:00Z"),
            Some(at("2026-10-25T23:00:00Z"))
        );
        // Exactly at midnight: the next one.
        assert_eq!(
            end("2026-03-28T23:00:00Z"),
            Some(at("2026-03-29T22:00:00Z"))
        );
        let utc = jiff::tz::TimeZone::UTC;
        assert_eq!(
            period_end(Digest::Daily, &utc, at("2026-01-01T23:59:59Z"), HOUR),
            Some(at("2026-01-02T00:00:00Z"))
        );
    }

    #[test]
    fn hourly_follows_the_local_clock_across_dst() {
        let tz = berlin();
        let end = |now| period_end(Digest::Hourly, &tz, at(now), HOUR);
        assert_eq!(
            end("2026-03-29T00:30:00Z"),
            Some(at("2026-03-29T01:00:00Z"))
        );
        // Spring forward: 01:59 CET is followed by 03:00 CEST, one hour later in real time.
        assert_eq!(
            end("2026-03-29T00:59:59Z"),
            Some(at("2026-03-29T01:00:00Z"))
        );
        assert_eq!(
            end("2026-03-29T01:10:00Z"),
            Some(at("2026-03-29T02:00:00Z"))
        );
        // Fall back: 02:30 CEST (00:30 UTC) ends at 02:00 CET (01:00 UTC), not at 03:00.
        assert_eq!(
            end("2026-10-25T00:30:00Z"),
            Some(at("2026-10-25T01:00:00Z"))
        );
        // The repeated 02:xx, now CET: ends at 03:00 CET.
        assert_eq!(
            end("2026-10-25T01:30:00Z"),
            Some(at("2026-10-25T02:00:00Z"))
        );
        // A half-hour zone: local full hours are at :30 UTC.
        let kolkata = jiff::tz::TimeZone::get("Asia/Kolkata").expect("tz");
        assert_eq!(
            period_end(Digest::Hourly, &kolkata, at("2026-05-01T10:45:00Z"), HOUR),
            Some(at("2026-05-01T11:30:00Z"))
        );
    }

    #[test]
    fn short_periods_align_to_the_local_clock_and_off_has_none() {
        let tz = berlin();
        let fifteen = DigestSettings { hourly_s: 900 };
        assert_eq!(
            period_end(Digest::Hourly, &tz, at("2026-05-01T10:16:40.5Z"), fifteen),
            Some(at("2026-05-01T10:30:00Z"))
        );
        assert_eq!(
            period_end(Digest::Off, &tz, at("2026-05-01T10:00:00Z"), HOUR),
            None
        );
        assert!(DigestSettings { hourly_s: 7 }.check().is_err());
        assert!(DigestSettings { hourly_s: 0 }.check().is_err());
        assert!(fifteen.check().is_ok());
    }

    #[test]
    fn digest_ids_differ_per_user_and_period() {
        let ann = crate::UserId::new("ann").expect("valid");
        let bob = crate::UserId::new("bob").expect("valid");
        assert_ne!(digest_id(&ann, 3600), digest_id(&bob, 3600));
        assert_ne!(digest_id(&ann, 3600), digest_id(&ann, 7200));
        assert_eq!(digest_id(&ann, 3600), digest_id(&ann, 3600));
    }
}
