//! What has been delivered: the resume position, de-duplication by seq and id, and the
//! unread count (from `hello`, new notifications and read positions).

use herald_protocol::Notification;
use std::collections::{HashSet, VecDeque};

/// Delivery bookkeeping of one client.
#[derive(Debug)]
pub(crate) struct Tracker {
    /// Resume after this seq on the next connection (`None` before the first hello on a
    /// live-only start).
    pub(crate) position: Option<u64>,
    delivered_max: u64,
    recent: HashSet<String>,
    order: VecDeque<String>,
    window: usize,
    /// Newest seq known to exist.
    pub(crate) latest: u64,
    /// Notifications up to this seq are already counted in `unread` (from `hello`).
    counted_up_to: u64,
    pub(crate) unread: u64,
}

impl Tracker {
    pub(crate) fn new(after: Option<u64>, window: usize) -> Self {
        Self {
            position: after,
            delivered_max: after.unwrap_or(0),
            recent: HashSet::new(),
            order: VecDeque::new(),
            window: window.max(1),
            latest: 0,
            counted_up_to: 0,
            unread: 0,
        }
    }

    /// A `hello`: the server's view of the inbox as this connection starts.
    pub(crate) fn hello(&mut self, last_seq: u64, unread: u64) {
        if self.position.is_some_and(|p| last_seq < p) {
            // The inbox's newest seq is below our position: the position is from another
            // life of the inbox (its stream was recreated or restored, so seqs began
            // again), and the server replays the whole inbox. Take it: seqs delivered
            // before say nothing now (ids remembered still drop what was delivered).
            self.position = Some(0);
            self.delivered_max = 0;
            self.latest = 0;
        }
        self.latest = self.latest.max(last_seq);
        // A live-only start resumes, next time, from where this connection started.
        self.position.get_or_insert(last_seq);
        // `unread` includes the replay that follows: do not count those twice.
        self.counted_up_to = last_seq;
        self.unread = unread;
    }

    /// Whether `n` is new (then it is recorded) or a duplicate.
    pub(crate) fn accept(&mut self, n: &Notification) -> bool {
        if n.seq <= self.delivered_max || self.recent.contains(&n.id) {
            return false;
        }
        self.delivered_max = n.seq;
        self.position = Some(self.position.map_or(n.seq, |p| p.max(n.seq)));
        self.latest = self.latest.max(n.seq);
        self.recent.insert(n.id.clone());
        self.order.push_back(n.id.clone());
        if self.order.len() > self.window
            && let Some(old) = self.order.pop_front()
        {
            self.recent.remove(&old);
        }
        if n.seq > self.counted_up_to {
            self.counted_up_to = n.seq;
            if !n.read {
                self.unread += 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(seq: u64) -> Notification {
        serde_json::from_value(serde_json::json!({
            "id": format!("n{seq}"),
            "seq": seq,
            "user_id": "ada",
            "priority": "normal",
            "data": {},
            "created_at": "2025-01-01T00:00:00Z",
            "read": false,
        }))
        .expect("a notification")
    }

    #[test]
    fn a_hello_below_the_position_starts_it_over() {
        let mut t = Tracker::new(Some(50), 16);
        t.hello(2, 2);
        assert_eq!(t.position, Some(0));
        let taken: Vec<u64> = [1, 2, 3]
            .into_iter()
            .filter(|&seq| t.accept(&note(seq)))
            .collect();
        assert_eq!(taken, [1, 2, 3], "the replay of the new inbox is taken");
        assert_eq!((t.position, t.latest), (Some(3), 3));
    }

    #[test]
    fn a_hello_at_or_past_the_position_keeps_it() {
        let mut t = Tracker::new(Some(50), 16);
        t.hello(50, 0);
        assert_eq!(t.position, Some(50));
        assert!(!t.accept(&note(50)), "already delivered");
        assert!(t.accept(&note(51)));
    }
}
