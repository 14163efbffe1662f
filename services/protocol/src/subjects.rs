//! Subject names. Every subject Herald uses is built here and nowhere else.

use crate::user::UserId;

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "herald";
/// The default number of INBOX partitions (router ownership units).
pub const DEFAULT_PARTITIONS: u16 = 16;
/// The lane token of inbox entries that need nothing beyond the inbox (no push, email,
/// SMS or webhook). No router consumer filters it, so the router is never handed them:
/// most notifications cost one stored message and no consumer delivery or ack.
pub const INBOX_ONLY_LANE: &str = "inbox";

/// Builds subjects under one prefix for one partition count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    partitions: u16,
}

/// A prefix that is not a plain dotted subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject prefix {0:?} must be dot-separated tokens of letters, digits, '-' and '_'")]
pub struct BadPrefix(pub String);

impl Default for Subjects {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.into(),
            partitions: DEFAULT_PARTITIONS,
        }
    }
}

impl Subjects {
    /// Subjects under `prefix` with `partitions` partitions (at least 1).
    ///
    /// # Errors
    /// [`BadPrefix`] when the prefix holds wildcards, spaces or empty tokens.
    pub fn new(prefix: &str, partitions: u16) -> Result<Self, BadPrefix> {
        let ok = !prefix.is_empty()
            && prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !ok {
            return Err(BadPrefix(prefix.into()));
        }
        Ok(Self {
            prefix: prefix.into(),
            partitions: partitions.max(1),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The partition count.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Native ingest: producers publish notify bodies here.
    pub fn notify(&self) -> String {
        format!("{}.notify", self.prefix)
    }

    /// Where one notification of `user` at priority `lane` is stored:
    /// `inbox.<partition>.<user token>.<lane>`.
    ///
    /// The lane is part of the subject so that routing has lanes too: each partition has
    /// one router consumer per lane, and a `high` notification never waits behind a
    /// backlog of `low` ones. The user's inbox is the union of their three lane subjects
    /// ([`Subjects::inbox`]), read in stream order, so `seq` stays one position per user.
    pub fn inbox_entry(&self, user: &UserId, lane: crate::Priority) -> String {
        format!(
            "{}.inbox.{}.{}.{}",
            self.prefix,
            user.partition(self.partitions),
            user.token(),
            lane.as_str()
        )
    }

    /// Where one notification of `user` that needs nothing beyond the inbox is stored:
    /// `inbox.<partition>.<user token>.inbox` ([`INBOX_ONLY_LANE`]), outside every router
    /// consumer's filter but inside the user's inbox ([`Subjects::inbox`]) and the live
    /// republish.
    pub fn inbox_only_entry(&self, user: &UserId) -> String {
        format!(
            "{}.inbox.{}.{}.{INBOX_ONLY_LANE}",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// The literal subjects of a user's inbox, one per lane (the priority lanes, then
    /// [`INBOX_ONLY_LANE`]): together, what [`Subjects::inbox`] matches. Reads that walk
    /// forward go lane by lane: a batched direct get over the wildcard makes the server
    /// scan every later message of the stream for the next match (BENCHMARKS.md).
    pub fn inbox_lanes(&self, user: &UserId) -> Vec<String> {
        let mut lanes: Vec<String> = crate::Priority::ALL
            .iter()
            .map(|lane| self.inbox_entry(user, *lane))
            .collect();
        lanes.push(self.inbox_only_entry(user));
        lanes
    }

    /// A user's whole inbox, every lane (a filter: read it, never publish to it).
    pub fn inbox(&self, user: &UserId) -> String {
        format!(
            "{}.inbox.{}.{}.*",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// Every inbox subject (the INBOX stream's filter).
    pub fn inbox_all(&self) -> String {
        format!("{}.inbox.>", self.prefix)
    }

    /// The entries of one lane of one partition (a router consumer's filter).
    pub fn inbox_lane(&self, partition: u16, lane: crate::Priority) -> String {
        format!("{}.inbox.{partition}.*.{}", self.prefix, lane.as_str())
    }

    /// What INBOX republishes, as `(source, destination)`: every entry to its user's live
    /// subject, the lane token dropped, so a gateway listens to one subject per user.
    pub fn republish(&self) -> (String, String) {
        (
            format!("{}.inbox.*.*.*", self.prefix),
            format!(
                "{}.live.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
                self.prefix
            ),
        )
    }

    /// Where a scheduled notification waits until its `send_at` (one subject per
    /// notification: JetStream keeps one schedule per subject). `id` is a UUID.
    pub fn scheduled(&self, user: &UserId, id: &str) -> String {
        format!(
            "{}.sched.{}.{}.{id}",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// The schedule subject of notification `id`, whoever it is for (a filter).
    pub fn scheduled_by_id(&self, id: &str) -> String {
        format!("{}.sched.*.*.{id}", self.prefix)
    }

    /// Where channel work of `user` on priority `lane` comes back to the router of their
    /// partition. Schedules (on [`Subjects::scheduled`]) fire into it at the end of quiet
    /// hours (`q-<id>`), of a group's window (`g-<id>`) and of a digest period
    /// (`d-<unix>`, lane `low`), and a big topic's fan-out hands each subscriber's copy
    /// over on it. The lane keeps that work in its priority: each lane's router consumer
    /// reads its own ([`Subjects::deferred_lane`]), so a `low` blast's hand-overs never
    /// hold up `normal` or `high` work. Not republished live, not in pages.
    ///
    /// The `normal` lane ([`crate::streams::DEFERRED_LANE`]) keeps the lane-less subject
    /// of earlier versions, [`Subjects::deferred`], whose router consumer was the only one
    /// to read deferred work; the others are `defer.<partition>.<user token>.<lane>`.
    pub fn deferred_in(&self, user: &UserId, lane: crate::Priority) -> String {
        if lane == crate::streams::DEFERRED_LANE {
            return self.deferred(user);
        }
        format!(
            "{}.defer.{}.{}.{}",
            self.prefix,
            user.partition(self.partitions),
            user.token(),
            lane.as_str()
        )
    }

    /// Every deferred subject of one lane of one partition (a router consumer's second
    /// filter; see [`Subjects::deferred_in`]).
    pub fn deferred_lane(&self, partition: u16, lane: crate::Priority) -> String {
        if lane == crate::streams::DEFERRED_LANE {
            return self.deferred_partition(partition);
        }
        format!("{}.defer.{partition}.*.{}", self.prefix, lane.as_str())
    }

    /// The deferred subjects of `user`'s lanes other than `normal` (a filter; see
    /// [`Subjects::deferred_in`]). With [`Subjects::deferred`], everything deferred for
    /// them.
    pub fn deferred_of(&self, user: &UserId) -> String {
        format!(
            "{}.defer.{}.{}.*",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// The deferred subject of `user`'s `normal` lane, `defer.<partition>.<user token>`
    /// (lane-less: the one deferred subject of earlier versions). See
    /// [`Subjects::deferred_in`].
    pub fn deferred(&self, user: &UserId) -> String {
        format!(
            "{}.defer.{}.{}",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// Every deferred subject of the `normal` lane of one partition ([`Subjects::deferred`]).
    pub fn deferred_partition(&self, partition: u16) -> String {
        format!("{}.defer.{partition}.*", self.prefix)
    }

    /// Every deferred subject (captured by INBOX).
    pub fn deferred_all(&self) -> String {
        format!("{}.defer.>", self.prefix)
    }

    /// Where the notifications waiting for `user`'s next email digest are recorded (the
    /// HERALD_DIGEST stream; one message per notification).
    pub fn digest(&self, user: &UserId) -> String {
        format!(
            "{}.digest.{}.{}",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// Every digest subject (the HERALD_DIGEST stream's filter).
    pub fn digest_all(&self) -> String {
        format!("{}.digest.>", self.prefix)
    }

    /// Every schedule of one user (a filter).
    pub fn scheduled_of(&self, user: &UserId) -> String {
        format!(
            "{}.sched.{}.{}.*",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// Every schedule subject (captured by the INBOX stream, whose scheduler fires them
    /// into the users' inbox subjects).
    pub fn scheduled_all(&self) -> String {
        format!("{}.sched.>", self.prefix)
    }

    /// One subscription, by topic (fan-out reads `subs.<topic>.*`).
    pub fn subscription(&self, topic: &crate::TopicId, user: &UserId) -> String {
        format!("{}.subs.{}.{}", self.prefix, topic.token(), user.token())
    }

    /// Every subscription of a topic (a filter).
    pub fn subscribers_of(&self, topic: &crate::TopicId) -> String {
        format!("{}.subs.{}.*", self.prefix, topic.token())
    }

    /// Every subscription of a user, as one set on one literal subject (the newest
    /// message holds the whole set), so that opening a session reads one message instead
    /// of filtering a stream that holds every subscription of every user.
    pub fn topics_of(&self, user: &UserId) -> String {
        format!("{}.usubs.{}", self.prefix, user.token())
    }

    /// Every subscription subject (the SUBS stream's filters).
    pub fn subscriptions_all(&self) -> Vec<String> {
        vec![
            format!("{}.subs.>", self.prefix),
            format!("{}.usubs.>", self.prefix),
        ]
    }

    /// Where a big topic's publishes are stored once, in the INBOX stream beside the
    /// users' inbox subjects (so they share its sequence space: a user's view merges
    /// this subject into their own). `t` is never a partition number, so no router
    /// consumer reads it; the lane keeps the shape of a user's entry, so the republish
    /// that drops the lane delivers it on [`Subjects::topic_live`].
    pub fn topic_inbox_entry(&self, topic: &crate::TopicId, lane: crate::Priority) -> String {
        format!(
            "{}.inbox.t.{}.{}",
            self.prefix,
            topic.token(),
            lane.as_str()
        )
    }
    /// The literal subjects of a big topic's stored publishes, one per lane: together,
    /// what [`Subjects::topic_inbox`] matches (see [`Subjects::inbox_lanes`] for why).
    pub fn topic_inbox_lanes(&self, topic: &crate::TopicId) -> Vec<String> {
        crate::Priority::ALL
            .iter()
            .map(|lane| self.topic_inbox_entry(topic, *lane))
            .collect()
    }
    /// Every stored publish of a big topic, every lane (a filter: read it, never
    /// publish to it).
    pub fn topic_inbox(&self, topic: &crate::TopicId) -> String {
        format!("{}.inbox.t.{}.*", self.prefix, topic.token())
    }
    /// Where INBOX republishes a big topic's publishes (gateways subscribe while they
    /// hold an online subscriber of the topic).
    pub fn topic_live(&self, topic: &crate::TopicId) -> String {
        format!("{}.live.t.{}", self.prefix, topic.token())
    }

    /// The topic of a [`Subjects::topic_live`] or [`Subjects::topic_inbox_entry`]
    /// subject.
    pub fn topic_of(&self, subject: &str) -> Option<crate::TopicId> {
        let rest = subject.strip_prefix(self.prefix.as_str())?;
        let token = match rest.strip_prefix(".live.t.") {
            Some(token) => token,
            None => {
                let (token, lane) = rest.strip_prefix(".inbox.t.")?.split_once('.')?;
                if !crate::Priority::ALL.iter().any(|p| p.as_str() == lane) {
                    return None;
                }
                token
            }
        };
        crate::TopicId::decode(token).ok()
    }
    /// Topic publishes waiting for fan-out.
    pub fn fanout(&self) -> String {
        format!("{}.fanout", self.prefix)
    }

    /// A user's live subject: INBOX republishes each stored message here.
    pub fn live(&self, user: &UserId) -> String {
        format!(
            "{}.live.{}.{}",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// Every live subject of one partition (a gateway hub subscribes to each).
    pub fn live_partition(&self, partition: u16) -> String {
        format!("{}.live.{partition}.*", self.prefix)
    }

    /// Every live subject (the republish destination).
    pub fn live_all(&self) -> String {
        format!("{}.live.>", self.prefix)
    }

    /// The work queue of one channel and lane.
    pub fn work(&self, channel: crate::Channel, lane: crate::Priority) -> String {
        format!(
            "{}.work.{}.{}",
            self.prefix,
            channel.as_str(),
            lane.as_str()
        )
    }

    /// Every work subject of one channel (that channel's work stream filter).
    pub fn work_channel(&self, channel: crate::Channel) -> String {
        format!("{}.work.{}.*", self.prefix, channel.as_str())
    }

    /// Every work subject.
    pub fn work_all(&self) -> String {
        format!("{}.work.>", self.prefix)
    }

    /// Where `user`'s dead-lettered jobs of one channel go: per user, so an erase can
    /// remove them ([`Subjects::dlq_of_user`]).
    pub fn dlq(&self, channel: crate::Channel, user: &UserId) -> String {
        format!(
            "{}.dlq.{}.{}.{}",
            self.prefix,
            channel.as_str(),
            user.partition(self.partitions),
            user.token()
        )
    }

    /// Every dead letter of `user`, on any channel (a filter).
    pub fn dlq_of_user(&self, user: &UserId) -> String {
        format!(
            "{}.dlq.*.{}.{}",
            self.prefix,
            user.partition(self.partitions),
            user.token()
        )
    }

    /// Every dead-letter subject (the DLQ stream's filter).
    pub fn dlq_all(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    /// Where rejected native messages are recorded.
    pub fn rejected(&self) -> String {
        format!("{}.rejected", self.prefix)
    }

    /// Which user an inbox entry or live subject belongs to.
    pub fn user_of(&self, subject: &str) -> Option<UserId> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?;
        let mut tokens = rest.split('.');
        let kind = tokens.next()?;
        // A partition is a number; `t` marks a topic's subjects, which belong to no user.
        tokens.next()?.parse::<u16>().ok()?;
        let token = tokens.next()?;
        let shape_ok = match kind {
            "inbox" => tokens.next().is_some_and(|lane| {
                lane == INBOX_ONLY_LANE || crate::Priority::ALL.iter().any(|p| p.as_str() == lane)
            }),
            "live" => true,
            _ => false,
        };
        if !shape_ok || tokens.next().is_some() {
            return None;
        }
        crate::user::UserToken::decode(token).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_stay_in_their_own_subject() {
        let s = Subjects::default();
        for raw in ["*", ">", "a.b", "bob.*", " ", "$JS.API.STREAM.DELETE.INBOX"] {
            let id = UserId::new(raw).expect("valid");
            for lane in crate::Priority::ALL {
                let subject = s.inbox_entry(&id, lane);
                let tokens: Vec<_> = subject.split('.').collect();
                assert_eq!(tokens.len(), 5, "{subject}");
                assert!(!subject.contains('*') && !subject.contains('>') && !subject.contains(' '));
                assert_eq!(s.user_of(&subject), Some(id.clone()));
            }
            let only = s.inbox_only_entry(&id);
            assert_eq!(only.split('.').count(), 5, "{only}");
            assert_eq!(s.user_of(&only), Some(id.clone()));
            let live = s.live(&id);
            assert_eq!(live.split('.').count(), 4, "{live}");
            assert_eq!(s.user_of(&live), Some(id.clone()));
            // The read filter is the entry subjects with the lane as its only wildcard.
            assert_eq!(s.inbox(&id).matches('*').count(), 1);
            assert!(s.inbox(&id).ends_with(".*"));
        }
    }

    #[test]
    fn inbox_only_entries_are_in_the_inbox_but_no_router_lane() {
        let s = Subjects::new("acme.herald", 4).expect("valid");
        let id = UserId::new("ana").expect("valid");
        let only = s.inbox_only_entry(&id);
        let matches = |filter: &str| {
            let (f, o): (Vec<_>, Vec<_>) = (filter.split('.').collect(), only.split('.').collect());
            f.len() == o.len() && f.iter().zip(&o).all(|(f, o)| *f == "*" || f == o)
        };
        assert!(matches(&s.inbox(&id)), "{only} is in the user's inbox");
        assert!(matches(&s.republish().0), "{only} is republished live");
        for p in 0..s.partitions() {
            for lane in crate::Priority::ALL {
                assert!(
                    !matches(&s.inbox_lane(p, lane)),
                    "{only} is outside every router lane"
                );
            }
        }
    }

    #[test]
    fn republish_drops_the_lane() {
        let s = Subjects::new("acme.herald", 4).expect("valid");
        let (src, dest) = s.republish();
        assert_eq!(src, "acme.herald.inbox.*.*.*");
        assert_eq!(dest, "acme.herald.live.{{wildcard(1)}}.{{wildcard(2)}}");
        assert_eq!(
            s.inbox_lane(3, crate::Priority::High),
            "acme.herald.inbox.3.*.high"
        );
    }

    #[test]
    fn topic_subjects_are_not_partitions() {
        let s = Subjects::default();
        let t = crate::TopicId::new("news.*").expect("valid");
        assert_eq!(s.topic_of(&s.topic_live(&t)), Some(t.clone()));
        // The read filter: the entry subjects with the lane as its only wildcard.
        assert!(s.topic_inbox(&t).starts_with("herald.inbox.t."));
        assert!(s.topic_inbox(&t).ends_with(".*"));
        assert_eq!(s.topic_inbox(&t).matches('*').count(), 1);
        for lane in crate::Priority::ALL {
            let entry = s.topic_inbox_entry(&t, lane);
            assert_eq!(entry.split('.').count(), 5, "{entry}");
            assert_eq!(s.topic_of(&entry), Some(t.clone()));
            assert_eq!(s.user_of(&entry), None, "a topic entry is nobody's inbox");
        }
        let user = UserId::new("u").expect("valid");
        assert_eq!(s.topic_of(&s.live(&user)), None);
    }

    #[test]
    fn prefix_is_validated() {
        assert!(Subjects::new("acme.herald", 4).is_ok());
        for bad in ["", "a..b", "a.*", "a b", ">"] {
            assert!(Subjects::new(bad, 4).is_err(), "{bad}");
        }
    }
}
