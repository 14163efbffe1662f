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
