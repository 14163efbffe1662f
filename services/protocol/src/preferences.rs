//! Per-user preferences (SPEC §3) and the policy decision they drive.
//!
//! The stored document is sparse: it keeps only what the user (or a producer on their
//! behalf) set, so a change to a configured category default reaches every user who never
//! touched it. [`Preferences::effective`] fills the gaps for `GET`. A `PUT` is a
//! [`PreferencesPatch`]: every field optional, merged into the stored document.
//!
//! [`Policy::decide`] answers, per notification and channel, "deliver or not, and which
//! rule said no" — the rule's name is what the delivery status shows. Most specific wins:
//! the user's per-category switch, then the user's channel switch, then the category's
//! configured default, then "on". Critical categories (security alerts, OTPs) ignore the
//! user's switches and the global opt-out; nothing else does.

use crate::error::FieldError;
use crate::notification::Channel;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Longest locale tag, in bytes (BCP 47 allows 35 for the common forms).
const MAX_LOCALE_BYTES: usize = 35;
/// Most categories one user may override.
pub const MAX_CATEGORY_OVERRIDES: usize = 256;

/// Channel switches, by channel.
pub type ChannelSwitches = BTreeMap<Channel, bool>;

/// How often a user wants missed notifications summarised by email.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Digest {
    /// No digest.
    #[default]
    Off,
    /// One email per hour.
    Hourly,
    /// One email per day.
    Daily,
}

/// A daily window, in the user's time zone, during which interrupting channels wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietHours {
    /// Start, `HH:MM`.
    #[serde(with = "hhmm")]
    pub start: jiff::civil::Time,
    /// End, `HH:MM`; before `start` when the window spans midnight.
    #[serde(with = "hhmm")]
    pub end: jiff::civil::Time,
}

/// A user's stored preferences: only what was set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preferences {
    /// Channel switches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub channels: ChannelSwitches,
    /// Per-category channel switches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub categories: BTreeMap<String, ChannelSwitches>,
    /// Global opt-out of everything not critical.
    #[serde(default)]
    pub opt_out: bool,
    /// Quiet hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
    /// IANA time zone name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// BCP 47 locale tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// Digest frequency.
    #[serde(default)]
    pub digest: Digest,
    /// The local hour (0–23) at which a daily digest is sent; the operator's
    /// `digest_daily_hour` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_hour: Option<u8>,
}

/// A configured category: its defaults and whether it is critical.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryRule {
    /// Critical categories (security alerts, OTPs) ignore user opt-outs.
    #[serde(default)]
    pub critical: bool,
    /// Channel defaults for users who did not choose.
    #[serde(default)]
    pub defaults: ChannelSwitches,
    /// Aggregation window for notifications of this category that carry a `group_key`,
    /// seconds ([`crate::group::DEFAULT_GROUP_WINDOW_S`] when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_window_s: Option<u64>,
}

/// The configured categories. Empty means "any category name is accepted, with no
/// defaults" — convenient on a laptop; production configs list them, and then an
/// unknown category is refused everywhere (notify and preferences alike).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    categories: BTreeMap<String, CategoryRule>,
    caps: Vec<RateCap>,
    digest: crate::digest::DigestSettings,
}

/// What happens to a notification over a rate cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapOver {
    /// Push, email, SMS and webhooks are suppressed.
    #[default]
    Suppress,
    /// Push, SMS and webhooks are suppressed; the email goes into the user's digest
    /// (their own frequency, hourly when they chose none).
    Digest,
}

/// A rate cap: at most `limit` interrupting notifications per `window_s` seconds for each
/// (producer, user, category). Over it the inbox still records; push, email, SMS and
/// webhooks are suppressed with the rule `rate_cap`, or the email is folded into a digest
/// (`over = "digest"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateCap {
    /// The category it applies to; every category when absent.
    #[serde(default)]
    pub category: Option<String>,
    /// The producer it applies to; every producer when absent.
    #[serde(default)]
    pub producer: Option<String>,
    /// Notifications allowed per window.
    pub limit: u32,
    /// Window length, seconds.
    pub window_s: u64,
    /// What happens over the cap.
    #[serde(default)]
    pub over: CapOver,
}

impl RateCap {
    /// Whether this cap counts a notification of `category` from `producer`.
    pub fn applies(&self, producer: Option<&str>, category: Option<&str>) -> bool {
        self.category.as_deref().is_none_or(|c| Some(c) == category)
            && self.producer.as_deref().is_none_or(|p| Some(p) == producer)
    }
}

/// Why a channel was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// The rule, as shown in the delivery status (`preferences.opt_out`,
    /// `preferences.categories.like.email`, `categories.marketing.defaults.sms`, …).
    pub rule: String,
}

impl Policy {
    /// A policy over these configured categories.
    pub fn new(categories: BTreeMap<String, CategoryRule>) -> Self {
        Self {
            categories,
            caps: Vec::new(),
            digest: crate::digest::DigestSettings::default(),
        }
    }

    /// Sets how digests are timed.
    #[must_use]
    pub fn with_digest(mut self, digest: crate::digest::DigestSettings) -> Self {
        self.digest = digest;
        self
    }

    /// How digests are timed.
    pub fn digest(&self) -> crate::digest::DigestSettings {
        self.digest
    }

    /// Adds rate caps.
    #[must_use]
    pub fn with_caps(mut self, caps: Vec<RateCap>) -> Self {
        self.caps = caps;
        self
    }

    /// The configured rate caps.
    pub fn caps(&self) -> &[RateCap] {
        &self.caps
    }

    /// Whether categories are restricted to the configured ones.
    pub fn is_strict(&self) -> bool {
        !self.categories.is_empty()
    }

    /// The aggregation window of `category`, seconds.
    pub fn group_window_s(&self, category: Option<&str>) -> u64 {
        category
            .and_then(|c| self.categories.get(c))
            .and_then(|r| r.group_window_s)
            .unwrap_or(crate::group::DEFAULT_GROUP_WINDOW_S)
    }

    /// The rule of a category, if configured.
    pub fn category(&self, name: &str) -> Option<&CategoryRule> {
        self.categories.get(name)
    }

    /// Checks a category name against the configuration.
    ///
    /// # Errors
    /// [`FieldError`] on `field` when categories are configured and this is not one.
    pub fn check_category(&self, field: &str, name: &str) -> Result<(), FieldError> {
        if self.is_strict() && !self.categories.contains_key(name) {
            let known: Vec<&str> = self.categories.keys().map(String::as_str).collect();
            return Err(FieldError::new(
                field,
                format!(
                    "unknown category {name:?}; configured: {}",
                    known.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Whether `channel` may carry a notification of `category` to a user with `prefs`.
    ///
    /// # Errors
    /// [`Suppressed`] naming the rule that said no.
    pub fn decide(
        &self,
        prefs: &Preferences,
        category: Option<&str>,
        channel: Channel,
    ) -> Result<(), Suppressed> {
        let rule = category.and_then(|c| self.categories.get(c));
        if rule.is_some_and(|r| r.critical) {
            return Ok(());
        }
        let suppressed = |rule: String| Err(Suppressed { rule });
        if prefs.opt_out && channel != Channel::Inbox {
            return suppressed("preferences.opt_out".into());
        }
        let name = channel.as_str();
        if let Some(category) = category
            && let Some(on) = prefs.categories.get(category).and_then(|c| c.get(&channel))
        {
            return if *on {
                Ok(())
            } else {
                suppressed(format!("preferences.categories.{category}.{name}"))
            };
        }
        if let Some(on) = prefs.channels.get(&channel) {
            return if *on {
                Ok(())
            } else {
                suppressed(format!("preferences.channels.{name}"))
            };
        }
        match (category, rule.and_then(|r| r.defaults.get(&channel))) {
            (Some(category), Some(false)) => {
                suppressed(format!("categories.{category}.defaults.{name}"))
            }
            _ => Ok(()),
        }
    }
}

impl Preferences {
    /// The full document for `GET`: every channel switch filled in (configured category
    /// defaults shown under `categories` only where the user overrode something).
    pub fn effective(&self) -> Value {
        let mut doc = serde_json::to_value(self).unwrap_or(Value::Null);
        let channels: serde_json::Map<String, Value> = Channel::ALL
            .into_iter()
            .map(|c| {
                let on = self.channels.get(&c).copied().unwrap_or(true);
                (c.as_str().to_owned(), Value::Bool(on))
            })
            .collect();
        if let Value::Object(map) = &mut doc {
            map.insert("channels".into(), Value::Object(channels));
            map.entry("categories")
                .or_insert_with(|| Value::Object(Default::default()));
            map.entry("quiet_hours").or_insert(Value::Null);
            map.entry("timezone").or_insert(Value::Null);
            map.entry("locale").or_insert(Value::Null);
            map.entry("digest_hour").or_insert(Value::Null);
        }
        doc
    }

    /// The user's time zone, UTC when unset (or, defensively, unknown).
    pub fn time_zone(&self) -> jiff::tz::TimeZone {
        self.timezone
            .as_deref()
            .and_then(|name| jiff::tz::TimeZone::get(name).ok())
            .unwrap_or(jiff::tz::TimeZone::UTC)
    }

    /// When quiet hours are on at `now`, the instant they end; `None` otherwise.
    pub fn quiet_until(&self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        let quiet = self.quiet_hours?;
        if quiet.start == quiet.end {
            return None;
        }
        let local = now.to_zoned(self.time_zone());
        let time = local.time();
        let inside = if quiet.start < quiet.end {
            quiet.start <= time && time < quiet.end
        } else {
            time >= quiet.start || time < quiet.end
        };
        if !inside {
            return None;
        }
        let today_end = local.date().to_datetime(quiet.end);
        let end = if time < quiet.end {
            today_end
        } else {
            today_end.checked_add(jiff::Span::new().days(1)).ok()?
        };
        // A DST gap at `end` resolves to the later instant: quiet hours never end early.
        end.to_zoned(self.time_zone()).ok().map(|z| z.timestamp())
    }
}

/// The body of `PUT …/preferences`: every field optional; present fields are merged.
/// `categories.<name>: null` removes that category's overrides; `quiet_hours: null`
/// (like `timezone`/`locale`: null) clears it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreferencesPatch {
    channels: ChannelSwitches,
    categories: BTreeMap<String, Option<ChannelSwitches>>,
    opt_out: Option<bool>,
    quiet_hours: Option<Option<QuietHours>>,
    timezone: Option<Option<String>>,
    locale: Option<Option<String>>,
    digest: Option<Digest>,
    digest_hour: Option<Option<u8>>,
}

impl PreferencesPatch {
    /// Parses and validates a `PUT` body, naming the first field at fault.
    ///
    /// # Errors
    /// [`FieldError`] for malformed JSON, unknown fields or channels, a category the
    /// policy does not know, an unknown time zone or a malformed time.
    pub fn from_json(body: &[u8], policy: &Policy) -> Result<Self, FieldError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| FieldError::new("body", format!("not valid JSON: {e}")))?;
        let Value::Object(doc) = value else {
            return Err(FieldError::new("body", "expected a JSON object"));
        };
        let mut patch = Self::default();
        for (key, value) in doc {
            match key.as_str() {
                "channels" => patch.channels = switches("channels", value)?,
                "categories" => {
                    let Value::Object(map) = value else {
                        return Err(FieldError::new("categories", "expected an object"));
                    };
                    for (name, value) in map {
                        if name.is_empty() || name.len() > crate::notification::MAX_KEY_BYTES {
                            return Err(FieldError::new(
                                "categories",
                                format!(
                                    "a category name is 1 to {} bytes",
                                    crate::notification::MAX_KEY_BYTES
                                ),
                            ));
                        }
                        let field = format!("categories.{name}");
                        policy.check_category(&field, &name)?;
                        let switches = match value {
                            Value::Null => None,
                            v => Some(switches(&field, v)?),
                        };
                        patch.categories.insert(name, switches);
                    }
                }
                "opt_out" => {
                    patch.opt_out = Some(
                        value
                            .as_bool()
                            .ok_or_else(|| FieldError::new("opt_out", "expected true or false"))?,
                    );
                }
                "quiet_hours" => patch.quiet_hours = Some(quiet_hours(value)?),
                "timezone" => patch.timezone = Some(timezone(value)?),
                "locale" => patch.locale = Some(locale(value)?),
                "digest" => {
                    patch.digest = Some(serde_json::from_value(value).map_err(|_| {
                        FieldError::new("digest", "expected \"off\", \"hourly\" or \"daily\"")
                    })?);
                }
                "digest_hour" => patch.digest_hour = Some(digest_hour(value)?),
                other => {
                    return Err(FieldError::new(
                        other,
                        "unknown field; expected channels, categories, opt_out, quiet_hours, \
                         timezone, locale, digest or digest_hour",
                    ));
                }
            }
        }
        Ok(patch)
    }

    /// Applies the patch to stored preferences.
    ///
    /// # Errors
    /// [`FieldError`] on `categories` when the result would exceed
    /// [`MAX_CATEGORY_OVERRIDES`].
    pub fn apply(self, prefs: &mut Preferences) -> Result<(), FieldError> {
        prefs.channels.extend(self.channels);
        for (name, switches) in self.categories {
            match switches {
                None => {
                    prefs.categories.remove(&name);
                }
                Some(switches) => prefs.categories.entry(name).or_default().extend(switches),
            }
        }
        if prefs.categories.len() > MAX_CATEGORY_OVERRIDES {
            return Err(FieldError::new(
                "categories",
                format!("at most {MAX_CATEGORY_OVERRIDES} categories may be overridden"),
            ));
        }
        if let Some(opt_out) = self.opt_out {
            prefs.opt_out = opt_out;
        }
        if let Some(quiet) = self.quiet_hours {
            prefs.quiet_hours = quiet;
        }
        if let Some(tz) = self.timezone {
            prefs.timezone = tz;
        }
        if let Some(locale) = self.locale {
            prefs.locale = locale;
        }
        if let Some(digest) = self.digest {
            prefs.digest = digest;
        }
        if let Some(hour) = self.digest_hour {
            prefs.digest_hour = hour;
        }
        Ok(())
    }
}

fn switches(field: &str, value: Value) -> Result<ChannelSwitches, FieldError> {
    let Value::Object(map) = value else {
        return Err(FieldError::new(
            field,
            "expected an object of channel: bool",
        ));
    };
    let mut out = ChannelSwitches::new();
    for (name, on) in map {
        let field = format!("{field}.{name}");
        let channel = Channel::parse(&name).ok_or_else(|| {
            FieldError::new(
                &field,
                "unknown channel; expected inbox, push, email, sms or webhook",
            )
        })?;
        let on = on
            .as_bool()
            .ok_or_else(|| FieldError::new(&field, "expected true or false"))?;
        if channel == Channel::Inbox && !on {
            // The inbox is the record and the replay cursor; hiding entries from it would
            // break resume-by-position. Preferences silence the interrupting channels.
            return Err(FieldError::new(
                &field,
                "the inbox always records; turn off push, email, sms or webhook instead",
            ));
        }
        out.insert(channel, on);
    }
    Ok(out)
}

fn quiet_hours(value: Value) -> Result<Option<QuietHours>, FieldError> {
    let map = match value {
        Value::Null => return Ok(None),
        Value::Object(map) => map,
        _ => {
            return Err(FieldError::new(
                "quiet_hours",
                "expected {\"start\",\"end\"}",
            ));
        }
    };
    let time = |name: &str| {
        let field = format!("quiet_hours.{name}");
        let raw = map
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| FieldError::new(&field, "expected a time \"HH:MM\""))?;
        hhmm::parse(raw).ok_or_else(|| FieldError::new(&field, "expected a time \"HH:MM\""))
    };
    if let Some(extra) = map.keys().find(|k| *k != "start" && *k != "end") {
        return Err(FieldError::new(
            format!("quiet_hours.{extra}"),
            "unknown field; expected start and end",
        ));
    }
    Ok(Some(QuietHours {
        start: time("start")?,
        end: time("end")?,
    }))
}

fn timezone(value: Value) -> Result<Option<String>, FieldError> {
    match value {
        Value::Null => Ok(None),
        Value::String(name) => match jiff::tz::TimeZone::get(&name) {
            Ok(_) => Ok(Some(name)),
            Err(_) => Err(FieldError::new(
                "timezone",
                format!("unknown time zone {name:?}; use an IANA name like \"Europe/Berlin\""),
            )),
        },
        _ => Err(FieldError::new(
            "timezone",
            "expected an IANA time zone name",
        )),
    }
}

fn digest_hour(value: Value) -> Result<Option<u8>, FieldError> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(hour @ 0..=23) => Ok(u8::try_from(hour).ok()),
            _ => Err(FieldError::new(
                "digest_hour",
                format!("expected an hour of the day, 0 to 23, not {n}"),
            )),
        },
        _ => Err(FieldError::new(
            "digest_hour",
            "expected an hour of the day, 0 to 23",
        )),
    }
}

fn locale(value: Value) -> Result<Option<String>, FieldError> {
    match value {
        Value::Null => Ok(None),
        Value::String(tag)
            if !tag.is_empty()
                && tag.len() <= MAX_LOCALE_BYTES
                && tag.split('-').all(|part| {
                    (1..=8).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_alphanumeric())
                }) =>
        {
            Ok(Some(tag))
        }
        _ => Err(FieldError::new(
            "locale",
            "expected a BCP 47 language tag like \"de-DE\"",
        )),
    }
}

/// `HH:MM` times, as the preferences document writes them.
mod hhmm {
    use jiff::civil::Time;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn parse(raw: &str) -> Option<Time> {
        let (h, m) = raw.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        Time::new(h.parse().ok()?, m.parse().ok()?, 0, 0).ok()
    }

    pub(super) fn serialize<S: Serializer>(t: &Time, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:02}:{:02}", t.hour(), t.minute()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Time, D::Error> {
        let raw = String::deserialize(d)?;
        parse(&raw).ok_or_else(|| serde::de::Error::custom("expected HH:MM"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch(v: Value) -> Result<PreferencesPatch, FieldError> {
        PreferencesPatch::from_json(v.to_string().as_bytes(), &Policy::default())
    }

    fn prefs(v: Value) -> Preferences {
        let mut p = Preferences::default();
        patch(v)
            .and_then(|x| x.apply(&mut p))
            .expect("valid preferences");
        p
    }

    fn strict() -> Policy {
        let mut cats = BTreeMap::new();
        cats.insert(
            "security".to_owned(),
            CategoryRule {
                critical: true,
                defaults: ChannelSwitches::new(),
                group_window_s: None,
            },
        );
        cats.insert(
            "marketing".to_owned(),
            CategoryRule {
                critical: false,
                defaults: [(Channel::Sms, false)].into_iter().collect(),
                group_window_s: None,
            },
        );
        Policy::new(cats)
    }

    #[test]
    fn the_spec_document_round_trips() {
        let p = prefs(json!({
            "channels":{"inbox":true,"push":true,"email":true,"sms":false,"webhook":false},
            "categories":{"marketing":{"push":false,"email":false},"like":{"email":false}},
            "opt_out":false,"quiet_hours":{"start":"22:00","end":"07:00"},
            "timezone":"Europe/Berlin","locale":"de-DE","digest":"daily"
        }));
        let stored = serde_json::to_string(&p).expect("serialises");
        let back: Preferences = serde_json::from_str(&stored).expect("parses");
        assert_eq!(back, p);
        assert_eq!(
            p.effective()["quiet_hours"],
            json!({"start":"22:00","end":"07:00"})
        );
        assert_eq!(p.effective()["channels"]["sms"], json!(false));
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |v: Value| patch(v).expect_err("invalid").field;
        assert_eq!(
            field(json!({"channels":{"pigeon":true}})),
            "channels.pigeon"
        );
        assert_eq!(field(json!({"channels":{"push":"yes"}})), "channels.push");
        assert_eq!(
            field(json!({"categories":{"like":{"fax":false}}})),
            "categories.like.fax"
        );
        assert_eq!(field(json!({"timezone":"Mars/Olympus"})), "timezone");
        assert_eq!(
            field(json!({"quiet_hours":{"start":"25:00","end":"07:00"}})),
            "quiet_hours.start"
        );
        assert_eq!(
            field(json!({"quiet_hours":{"start":"22:00","end":"7"}})),
            "quiet_hours.end"
        );
        assert_eq!(field(json!({"digest":"weekly"})), "digest");
        assert_eq!(field(json!({"locale":"de DE"})), "locale");
        assert_eq!(field(json!({"channels":{"inbox":false}})), "channels.inbox");
        assert_eq!(
            field(json!({"categories":{"like":{"inbox":false}}})),
            "categories.like.inbox"
        );
        assert_eq!(field(json!({"colour":"blue"})), "colour");
        assert_eq!(field(json!({"digest_hour":24})), "digest_hour");
        assert_eq!(field(json!({"digest_hour":-1})), "digest_hour");
        assert_eq!(field(json!({"digest_hour":"8"})), "digest_hour");
        let strict = PreferencesPatch::from_json(br#"{"categories":{"spam":{}}}"#, &strict());
        assert_eq!(strict.expect_err("unknown").field, "categories.spam");
    }

    #[test]
    fn patches_merge_and_null_clears() {
        let mut p = prefs(json!({"categories":{"like":{"email":false}},"timezone":"UTC"}));
        patch(json!({"categories":{"like":{"push":false}},"channels":{"sms":false}}))
            .and_then(|x| x.apply(&mut p))
            .expect("valid");
        assert_eq!(p.categories["like"].len(), 2);
        assert_eq!(p.timezone.as_deref(), Some("UTC"));
        patch(json!({"categories":{"like":null},"timezone":null}))
            .and_then(|x| x.apply(&mut p))
            .expect("valid");
        assert!(p.categories.is_empty());
        assert_eq!(p.timezone, None);
        patch(json!({"digest":"daily","digest_hour":8}))
            .and_then(|x| x.apply(&mut p))
            .expect("valid");
        assert_eq!(p.digest_hour, Some(8));
        patch(json!({"digest_hour":null}))
            .and_then(|x| x.apply(&mut p))
            .expect("valid");
        assert_eq!(p.digest_hour, None);
        assert_eq!(p.digest, Digest::Daily);
        assert!(!p.channels[&Channel::Sms]);
    }

    #[test]
    fn most_specific_switch_wins_and_critical_ignores_opt_outs() {
        let policy = strict();
        let p =
            prefs(json!({"channels":{"email":false},"categories":{"marketing":{"email":true}}}));
        assert!(policy.decide(&p, Some("marketing"), Channel::Email).is_ok());
        let rule = |r: Result<(), Suppressed>| r.expect_err("suppressed").rule;
        assert_eq!(
            rule(policy.decide(&p, None, Channel::Email)),
            "preferences.channels.email"
        );
        assert_eq!(
            rule(policy.decide(&p, Some("marketing"), Channel::Sms)),
            "categories.marketing.defaults.sms"
        );
        let out = prefs(json!({"opt_out":true,"channels":{"sms":false}}));
        assert_eq!(
            rule(policy.decide(&out, Some("marketing"), Channel::Push)),
            "preferences.opt_out"
        );
        assert!(
            policy
                .decide(&out, Some("marketing"), Channel::Inbox)
                .is_ok()
        );
        assert!(policy.decide(&out, Some("security"), Channel::Sms).is_ok());
    }

    #[test]
    fn quiet_hours_span_midnight_in_the_users_zone() {
        let p = prefs(
            json!({"quiet_hours":{"start":"22:00","end":"07:00"},"timezone":"Europe/Berlin"}),
        );
        let at = |s: &str| s.parse::<jiff::Timestamp>().expect("timestamp");
        // 23:30 in Berlin (CET, UTC+1) → quiet until 07:00 local the next day.
        assert_eq!(
            p.quiet_until(at("2026-01-10T22:30:00Z")),
            Some(at("2026-01-11T06:00:00Z"))
        );
        // 05:00 local → until 07:00 the same day.
        assert_eq!(
            p.quiet_until(at("2026-01-11T04:00:00Z")),
            Some(at("2026-01-11T06:00:00Z"))
        );
        // Noon local → not quiet.
        assert_eq!(p.quiet_until(at("2026-01-11T11:00:00Z")), None);
        let day = prefs(json!({"quiet_hours":{"start":"09:00","end":"17:00"}}));
        assert_eq!(
            day.quiet_until(at("2026-01-11T12:00:00Z")),
            Some(at("2026-01-11T17:00:00Z"))
        );
        assert_eq!(day.quiet_until(at("2026-01-11T17:00:00Z")), None);
    }
}
