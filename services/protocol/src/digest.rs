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

/// The local hour at which a `daily` period ends unless configured otherwise: midnight.
pub const DEFAULT_DAILY_HOUR: u8 = 0;

/// How digests are timed, configured once for every user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestSettings {
    /// Length of an `hourly` period, seconds; divides an hour, and periods are aligned to
    /// the user's local clock (with 3600, one ends at every full local hour). Shorter
    /// periods are for tests and demos.
    pub hourly_s: u64,
    /// The local hour (0–23) at which a `daily` period ends: 0 is midnight, 8 sends the
    /// daily digest at 08:00 in each user's time zone. A user's `digest_hour`
    /// preference overrides it ([`DigestSettings::for_user`]).
    pub daily_hour: u8,
}

impl Default for DigestSettings {
    fn default() -> Self {
        Self {
            hourly_s: DEFAULT_HOURLY_S,
            daily_hour: DEFAULT_DAILY_HOUR,
        }
    }
}

impl DigestSettings {
    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming `digest_hourly_s` when it does not divide an hour, or
    /// `digest_daily_hour` when it is not an hour of the day.
    pub fn check(&self) -> Result<(), String> {
        if self.hourly_s == 0 || 3600 % self.hourly_s != 0 {
            return Err(format!(
                "digest_hourly_s must divide 3600 (e.g. 3600, 900, 60), not {}",
                self.hourly_s
            ));
        }
        if self.daily_hour > 23 {
            return Err(format!(
                "digest_daily_hour must be an hour of the day, 0 to 23, not {}",
                self.daily_hour
            ));
        }
        Ok(())
    }

    /// These settings for a user whose `digest_hour` preference is `hour` (the
    /// operator's `daily_hour` when they set none).
    #[must_use]
    pub fn for_user(mut self, hour: Option<u8>) -> Self {
        if let Some(hour) = hour.filter(|h| *h <= 23) {
            self.daily_hour = hour;
        }
        self
    }
}

/// When the digest period that contains `now` ends for a user in `tz`: the next full
/// local hour (or `hourly_s` step) for `hourly`, the next local `daily_hour:00` (midnight
/// by default) for `daily`; `None` for `off`.
///
/// Daylight saving time: a daily period ends at the same local hour every day, so the
/// day it changes is 23 or 25 hours long; an hourly period is always `hourly_s` of real
/// time, aligned to the local clock (in a repeated hour the offset in force is kept, so
/// the hour is not skipped or counted twice). A daily end that does not exist (a gap,
/// e.g. 02:00 when clocks jump to 03:00) resolves to the first instant after it; one
/// that exists twice (clocks going back) is its first occurrence.
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
            let hour = i8::try_from(settings.daily_hour.min(23)).ok()?;
            let at = jiff::civil::Time::new(hour, 0, 0, 0).ok()?;
            // `to_zoned` resolves a gap to its end and a fold to its first occurrence.
            let on = |date: jiff::civil::Date| {
                date.to_datetime(at)
                    .to_zoned(tz.clone())
                    .ok()
                    .map(|z| z.timestamp())
            };
            match on(local.date())? {
                today if today > now => Some(today),
                _ => on(local.date().tomorrow().ok()?),
            }
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

    const HOUR: DigestSettings = DigestSettings {
        hourly_s: 3600,
        daily_hour: 0,
    };

    fn daily_at(hour: u8) -> DigestSettings {
        DigestSettings {
            daily_hour: hour,
            ..HOUR
        }
    }

    #[test]
    fn daily_ends_at_the_configured_local_hour() {
        let tz = berlin();
        let end = |now, hour| period_end(Digest::Daily, &tz, at(now), daily_at(hour));
        // 08:00 in Berlin in summer (UTC+2) is 06:00 UTC: before it, today's; after, tomorrow's.
        assert_eq!(
            end("2026-06-10T05:59:59Z", 8),
            Some(at("2026-06-10T06:00:00Z"))
        );
        assert_eq!(
            end("2026-06-10T06:00:00Z", 8),
            Some(at("2026-06-11T06:00:00Z"))
        );
        assert_eq!(
            end("2026-06-10T21:30:00Z", 23),
            Some(at("2026-06-11T21:00:00Z"))
        );
        // A late-evening user east of UTC: 23:00 local on the UTC date before.
        let tokyo = jiff::tz::TimeZone::get("Asia/Tokyo").expect("tz");
        assert_eq!(
            period_end(
                Digest::Daily,
                &tokyo,
                at("2026-06-10T13:00:00Z"),
                daily_at(23)
            ),
            Some(at("2026-06-10T14:00:00Z"))
        );
        // The user's own hour wins over the operator's.
        assert_eq!(daily_at(8).for_user(Some(18)).daily_hour, 18);
        assert_eq!(daily_at(8).for_user(None).daily_hour, 8);
        assert!(daily_at(24).check().is_err());
        assert!(daily_at(23).check().is_ok());
    }

    #[test]
    fn a_daily_hour_across_dst_keeps_the_local_hour_and_resolves_gaps_forward() {
        let tz = berlin();
        let end = |now, hour| period_end(Digest::Daily, &tz, at(now), daily_at(hour));
        // 08:00 on 28 March (CET, 07:00 UTC), then 08:00 on 29 March is CEST (06:00 UTC):
        // the day of the change is 23 hours long.
        assert_eq!(
            end("2026-03-28T07:00:00Z", 8),
            Some(at("2026-03-29T06:00:00Z"))
        );
        // 02:00 on 29 March does not exist (01:59:59 CET → 03:00 CEST): the first
        // instant after the gap, 03:00 CEST = 01:00 UTC.
        assert_eq!(
            end("2026-03-28T23:30:00Z", 2),
            Some(at("2026-03-29T01:00:00Z"))
        );
        // And the next day it is 02:00 CEST again (00:00 UTC).
        assert_eq!(
            end("2026-03-29T01:00:00Z", 2),
            Some(at("2026-03-30T00:00:00Z"))
        );
        // 25 October: 02:00 happens twice (CEST then CET); the first one ends the period.
        assert_eq!(
            end("2026-10-24T23:00:00Z", 2),
            Some(at("2026-10-25T00:00:00Z"))
        );
        // 08:00 the day after the change is CET (07:00 UTC): a 25-hour day.
        assert_eq!(
            end("2026-10-24T06:00:00Z", 8),
            Some(at("2026-10-25T07:00:00Z"))
        );
    }

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
        let fifteen = DigestSettings {
            hourly_s: 900,
            ..HOUR
        };
        assert_eq!(
            period_end(Digest::Hourly, &tz, at("2026-05-01T10:16:40.5Z"), fifteen),
            Some(at("2026-05-01T10:30:00Z"))
        );
        assert_eq!(
            period_end(Digest::Off, &tz, at("2026-05-01T10:00:00Z"), HOUR),
            None
        );
        assert!(
            DigestSettings {
                hourly_s: 7,
                ..HOUR
            }
            .check()
            .is_err()
        );
        assert!(
            DigestSettings {
                hourly_s: 0,
                ..HOUR
            }
            .check()
            .is_err()
        );
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
