//! Aggregation in the router: what a grouped notification's channel work does.
//!
//! The api already placed each notification in its group (the `group` snapshot it
//! carries). Here the first member to reach the router — the group's first notification,
//! unless that one was refused after joining or has nothing for the router — holds its
//! push/email/SMS/webhook work until the window ends (a JetStream schedule back to this
//! partition's router, so no process polls and restarts lose nothing), and the others are
//! recorded as folded into it. At the window's end the group is closed with compare-and-set: a member that joined
//! before the close is counted in the text that goes out; one that comes after opens a new
//! window. Quiet hours still apply: a window that ends during them waits for their end,
//! and keeps folding what arrives meanwhile.

use crate::{Route, deferral};
use herald_protocol::{Channel, Folded, Preferences, Priority, StoredNotification};
use herald_store::groups::Closed;
use herald_store::status::{State, Update};

/// What the router does next with a notification after aggregation.
pub(crate) enum Step {
    /// Route its channel work, with this folded text when a group closed.
    Route(Option<Folded>),
    /// Nothing more to do now (held for the window, or folded).
    Done,
    /// NATS failed; retry in place.
    Retry,
}

impl Route {
    /// Applies aggregation to a notification whose `channels` policy allows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn aggregate(
        &self,
        msg: &async_nats::jetstream::Message,
        deferred: bool,
        stored: &StoredNotification,
        seq: u64,
        channels: &[Channel],
        prefs: &Preferences,
        now: jiff::Timestamp,
    ) -> Step {
        if deferred {
            return match deferral::closes_window(msg) {
                Some(key) => {
                    let back_from = deferral::scheduled_for(msg);
                    self.close_window(stored, seq, &key, channels, prefs, now, back_from)
                        .await
                }
                // Back from quiet hours: not a group's business.
                None => Step::Route(None),
            };
        }
        let Some(group) = &stored.group else {
            return Step::Route(None);
        };
        // `high` is never held (SPEC §6; README, quiet hours): not by a window, not by the
        // quiet hours its close would wait for, and never onto another member's lane. It
        // goes out at once as itself; the group's text still counts it. A window it opened
        // is carried by the next member that reaches the router.
        if stored.priority == Priority::High {
            return Step::Route(None);
        }
        let waiting: Vec<(Channel, String)> =
            channels.iter().map(|c| (*c, "none".to_string())).collect();
        let first = group.first_id == stored.id;
        let ends = match group.window_ends_at.parse::<jiff::Timestamp>() {
            Ok(t) if t > now => t,
            // Already over (this router was behind): the first closes it now.
            _ if first => {
                return self
                    .close_window(stored, seq, &group.key, channels, prefs, now, None)
                    .await;
            }
            // A later member: its close, if it must carry it, fires at once.
            _ => now,
        };
        let until = ends.to_string();
        match deferral::claim_window_close(
            &self.nats,
            &self.subjects,
            stored,
            seq,
            &group.first_id,
            &group.key,
            &until,
        )
        .await
        {
            Ok(deferral::Claim::Mine) => {}
            Ok(deferral::Claim::Taken) => {
                metrics::counter!("herald_router_folded_total").increment(1);
                let rule = format!(
                    "folded_into: {} (group {}, window until {})",
                    group.first_id, group.key, group.window_ends_at
                );
                self.record(
                    stored,
                    seq,
                    waiting,
                    Update::state(State::Folded).because(rule),
                )
                .await;
                return Step::Done;
            }
            Err(e) => {
                tracing::warn!(seq, error = %e, "scheduling a group's window end failed; will retry");
                return Step::Retry;
            }
        }
        self.record(
            stored,
            seq,
            waiting,
            Update::state(State::Deferred)
                .because(format!("group: {} collects until {until}", group.key)),
        )
        .await;
        Step::Done
    }

    /// The window of `stored`'s group `key` ended: close the group and route `stored`
    /// with its final folded text, unless quiet hours hold it a while longer (`back_from`:
    /// the end its schedule was for, when it comes back from one).
    #[allow(clippy::too_many_arguments)]
    async fn close_window(
        &self,
        stored: &StoredNotification,
        seq: u64,
        key: &str,
        channels: &[Channel],
        prefs: &Preferences,
        now: jiff::Timestamp,
        back_from: Option<jiff::Timestamp>,
    ) -> Step {
        if stored.priority != Priority::High
            && let Some(until) = deferral::still_quiet(prefs, now, back_from)
        {
            // The group keeps folding until this close fires: without the hold, a member
            // an hour past the window's end would open a new window, and this close would
            // find its group gone and send the carrier alone.
            let first_id = stored
                .group
                .as_ref()
                .map_or(stored.id.as_str(), |g| g.first_id.as_str());
            if let Err(e) = self
                .groups
                .hold(&stored.user_id, key, first_id, until.as_second())
                .await
            {
                tracing::warn!(seq, error = %e, "holding a group open for quiet hours failed; will retry");
                return Step::Retry;
            }
            if let Err(e) = deferral::close_window_after_quiet(
                &self.nats,
                &self.subjects,
                stored,
                seq,
                key,
                until,
            )
            .await
            {
                tracing::warn!(seq, error = %e, "deferring a group for quiet hours failed; will retry");
                return Step::Retry;
            }
            let waiting = channels.iter().map(|c| (*c, "none".to_string())).collect();
            self.record(
                stored,
                seq,
                waiting,
                Update::state(State::Deferred).because(format!("quiet_hours: until {until}")),
            )
            .await;
            return Step::Done;
        }
        // The carrier is usually the group's first notification, but may be a later member.
        let first_id = stored
            .group
            .as_ref()
            .map_or(stored.id.as_str(), |g| g.first_id.as_str());
        match self
            .groups
            .close(&stored.user_id, key, first_id, &stored.id)
            .await
        {
            Ok(Closed::ByThis(state)) => Step::Route(Some(Folded {
                key: key.to_owned(),
                count: state.count,
                title: state.title,
                body: state.body,
            })),
            // Another member carried this window's close (this one's router ran behind the
            // window, and its own close came after): it was counted there.
            Ok(Closed::ByOther(carrier)) => {
                metrics::counter!("herald_router_folded_total").increment(1);
                let waiting = channels.iter().map(|c| (*c, "none".to_string())).collect();
                self.record(
                    stored,
                    seq,
                    waiting,
                    Update::state(State::Folded).because(format!(
                        "folded_into: {carrier} (group {key}, closed by it)"
                    )),
                )
                .await;
                Step::Done
            }
            // The group is gone (erased, expired): the notification goes out as itself.
            Ok(Closed::Gone) => Step::Route(None),
            Err(e) => {
                tracing::warn!(seq, error = %e, "closing a group failed; will retry");
                Step::Retry
            }
        }
    }
}
