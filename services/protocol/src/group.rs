//! Aggregation: notifications that share a `group_key` for one user within a window fold
//! into one ("Jane and 4 others liked your photo").
//!
//! Why this shape: every notification is still stored (the inbox is the replay cursor and
//! nothing may vanish from it), but each carries a [`Group`] snapshot — the group's key,
//! how many it holds so far, who caused them, and the folded text — so a client collapses
//! by `group.key` and shows the latest text. Interrupting channels fold for real: the
//! group's first notification holds its push/email/SMS until the window ends, and then
//! sends once with the folded text of the whole group; the others are recorded as
//! `folded` into it. The shared state is one [`GroupState`] document per (user, key) in
//! a KV bucket, changed only with compare-and-set, so any number of api instances agree
//! on who joined which window.

use serde::{Deserialize, Serialize};

/// Default window when the category configures none, seconds.
pub const DEFAULT_GROUP_WINDOW_S: u64 = 60;
/// Longest configurable window, seconds (the group bucket keeps state for two days).
pub const MAX_GROUP_WINDOW_S: u64 = 86_400;
/// Most distinct actors a group remembers (most recent first).
pub const MAX_ACTORS: usize = 10;
/// Most member ids a group remembers to recognise a retried notify.
const MAX_RECENT_IDS: usize = 64;

/// The group snapshot a notification carries (SPEC §4, additive field `group`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// The producer's `group_key`.
    pub key: String,
    /// Notifications in the group so far, this one included.
    pub count: u64,
    /// Distinct actors, most recent first (at most [`MAX_ACTORS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<String>,
    /// Id of the group's first notification: the one its push, email and SMS go out under.
    pub first_id: String,
    /// When the window closes (RFC 3339).
    pub window_ends_at: String,
    /// The folded title ("Jane and 4 others liked your photo").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The folded body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// The shared state of one (user, group key), as kept in the group bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// The key.
    pub key: String,
    /// Id of the first notification of the current window.
    pub first_id: String,
    /// Window end, unix seconds.
    pub window_ends_at: i64,
    /// Members so far.
    pub count: u64,
    /// Distinct actors, most recent first.
    #[serde(default)]
    pub actors: Vec<String>,
    /// Recent member ids (a retried notify with the same idempotency key is not counted
    /// twice).
    #[serde(default)]
    pub recent_ids: Vec<String>,
    /// Folded title of the latest member.
    #[serde(default)]
    pub title: Option<String>,
    /// Folded body of the latest member.
    #[serde(default)]
    pub body: Option<String>,
    /// Set when the window's push went out: the next member opens a new window.
    #[serde(default)]
    pub closed: bool,
    /// When the window's close was deferred past its end (quiet hours), the instant it
    /// was deferred to, unix seconds: the window stays open until that close fires,
    /// however long after its end ([`GroupState::hold`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<i64>,
}

/// What joining did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// Opened a new window: this notification is the group's first.
    Opened(GroupState),
    /// Joined the open window.
    Folded(GroupState),
    /// Already a member (a retry): nothing changed.
    Repeat(GroupState),
}

impl Joined {
    /// The state after joining.
    pub fn state(&self) -> &GroupState {
        match self {
            Self::Opened(s) | Self::Folded(s) | Self::Repeat(s) => s,
        }
    }
}

/// How long after its end — or after the instant its close was deferred to
/// ([`GroupState::held_until`]) — a window that was never closed (its routers were down
/// for that long) is still joined, seconds; beyond it a new window opens.
const STALE_AFTER_S: i64 = 3600;

impl GroupState {
    /// Adds notification `id` (caused by `actor`) at `now` (unix seconds) to `current`
    /// (the stored state, if any), opening a new `window_s` window when there is none,
    /// it was closed, or it is long stale.
    pub fn join(
        current: Option<GroupState>,
        key: &str,
        id: &str,
        actor: Option<&str>,
        now: i64,
        window_s: u64,
    ) -> Joined {
        if let Some(state) = &current
            && state.recent_ids.iter().any(|r| r == id)
        {
            return Joined::Repeat(state.clone());
        }
        let open = current.filter(|s| {
            !s.closed && s.key == key && now <= s.closes_by().saturating_add(STALE_AFTER_S)
        });
        match open {
            Some(mut state) => {
                state.count += 1;
                state.remember(id, actor);
                Joined::Folded(state)
            }
            None => {
                let mut state = GroupState {
                    key: key.to_owned(),
                    first_id: id.to_owned(),
                    window_ends_at: now.saturating_add(i64::try_from(window_s).unwrap_or(0)),
                    count: 1,
                    actors: Vec::new(),
                    recent_ids: Vec::new(),
                    title: None,
                    body: None,
                    closed: false,
                    held_until: None,
                };
                state.remember(id, actor);
                Joined::Opened(state)
            }
        }
    }

    /// When the window's close is due: its end, or the later instant its close was
    /// deferred to.
    pub fn closes_by(&self) -> i64 {
        self.held_until
            .map_or(self.window_ends_at, |held| held.max(self.window_ends_at))
    }

    /// Records that the window's close was deferred to `until` (unix seconds): members
    /// keep folding into it until then, instead of opening a new window once it is an
    /// hour past its end — the held close would find its window replaced and send the
    /// carrier without the group.
    pub fn hold(&mut self, until: i64) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    fn remember(&mut self, id: &str, actor: Option<&str>) {
        self.recent_ids.push(id.to_owned());
        if self.recent_ids.len() > MAX_RECENT_IDS {
            self.recent_ids.remove(0);
        }
        if let Some(actor) = actor {
            self.actors.retain(|a| a != actor);
            self.actors.insert(0, actor.to_owned());
            self.actors.truncate(MAX_ACTORS);
        }
    }

    /// The snapshot a member carries.
    pub fn snapshot(&self) -> Group {
        Group {
            key: self.key.clone(),
            count: self.count,
            actors: self.actors.clone(),
            first_id: self.first_id.clone(),
            window_ends_at: crate::notification::format_time(
                time::OffsetDateTime::from_unix_timestamp(self.window_ends_at)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            ),
            title: self.title.clone(),
            body: self.body.clone(),
        }
    }
}

/// The folded text when no template defines one: the member's own text while the group
/// holds one notification, then "<title> (+N more)" with the first actors named when
/// known ("Jane, Bob and 3 others: New like").
pub fn default_folded(
    title: Option<&str>,
    body: Option<&str>,
    count: u64,
    actors: &[String],
) -> (Option<String>, Option<String>) {
    if count <= 1 {
        return (title.map(str::to_owned), body.map(str::to_owned));
    }
    let others = count - 1;
    let headline = title.or(body).unwrap_or("");
    let title = match actors.first() {
        Some(actor) => {
            let noun = if others == 1 { "other" } else { "others" };
            format!("{actor} and {others} {noun}: {headline}")
        }
        None => format!("{headline} (+{others} more)"),
    };
    (Some(title), body.map(str::to_owned))
}

/// The variables a template's `group.title` / `group.body` see, besides the notify's own
/// `vars`: `count`, `others` (count − 1), `actors` (most recent first), `actor` (the
/// first of them, or empty).
pub fn group_vars(count: u64, actors: &[String]) -> serde_json::Map<String, serde_json::Value> {
    let mut vars = serde_json::Map::new();
    vars.insert("count".into(), count.into());
    vars.insert("others".into(), count.saturating_sub(1).into());
    vars.insert(
        "actors".into(),
        serde_json::Value::Array(actors.iter().cloned().map(Into::into).collect()),
    );
    vars.insert(
        "actor".into(),
        actors.first().cloned().unwrap_or_default().into(),
    );
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_fold_until_closed_then_a_new_window_opens() {
        let first = GroupState::join(None, "like:9", "a", Some("Jane"), 100, 60);
        let Joined::Opened(state) = first else {
            panic!("opens: {first:?}")
        };
        assert_eq!(state.window_ends_at, 160);
        let second = GroupState::join(Some(state), "like:9", "b", Some("Bob"), 130, 60);
        let Joined::Folded(mut state) = second else {
            panic!("folds: {second:?}")
        };
        assert_eq!((state.count, state.first_id.as_str()), (2, "a"));
        assert_eq!(state.actors, ["Bob", "Jane"]);
        let again = GroupState::join(Some(state.clone()), "like:9", "b", Some("Bob"), 131, 60);
        assert!(
            matches!(again, Joined::Repeat(ref s) if s.count == 2),
            "{again:?}"
        );
        state.closed = true;
        let next = GroupState::join(Some(state), "like:9", "c", None, 170, 60);
        assert!(
            matches!(next, Joined::Opened(ref s) if s.first_id == "c" && s.count == 1),
            "{next:?}"
        );
    }

    #[test]
    fn a_window_whose_close_was_deferred_keeps_folding_until_it_fires() {
        let Joined::Opened(mut state) = GroupState::join(None, "like:9", "a", None, 100, 60) else {
            panic!("opens")
        };
        // The window ends at 160 during quiet hours; its close is held until 160 + 8 h.
        state.hold(160 + 8 * 3600);
        let late = GroupState::join(Some(state.clone()), "like:9", "b", None, 160 + 3601, 60);
        assert!(
            matches!(late, Joined::Folded(ref s) if s.first_id == "a" && s.count == 2),
            "{late:?}"
        );
        let Joined::Folded(state) = late else {
            unreachable!()
        };
        // Up to the held close and its grace, not beyond.
        let at_close =
            GroupState::join(Some(state.clone()), "like:9", "c", None, 160 + 8 * 3600, 60);
        assert!(matches!(at_close, Joined::Folded(_)), "{at_close:?}");
        let stale = GroupState::join(
            Some(state.clone()),
            "like:9",
            "d",
            None,
            160 + 9 * 3600 + 1,
            60,
        );
        assert!(
            matches!(stale, Joined::Opened(ref s) if s.first_id == "d"),
            "{stale:?}"
        );
        // An earlier hold never shortens a later one.
        let mut state = state;
        state.hold(200);
        assert_eq!(state.held_until, Some(160 + 8 * 3600));
        // Without a hold, an hour past its end is stale, as before.
        let Joined::Opened(plain) = GroupState::join(None, "like:9", "e", None, 100, 60) else {
            panic!("opens")
        };
        let next = GroupState::join(Some(plain), "like:9", "f", None, 160 + 3601, 60);
        assert!(matches!(next, Joined::Opened(_)), "{next:?}");
    }

    #[test]
    fn default_text_names_the_latest_actor_and_the_others() {
        assert_eq!(
            default_folded(Some("liked your photo"), None, 5, &["Jane".into()]),
            (Some("Jane and 4 others: liked your photo".into()), None)
        );
        assert_eq!(
            default_folded(Some("New like"), Some("b"), 2, &[])
                .0
                .as_deref(),
            Some("New like (+1 more)")
        );
        assert_eq!(
            default_folded(Some("t"), Some("b"), 1, &[]),
            (Some("t".into()), Some("b".into()))
        );
    }
}
