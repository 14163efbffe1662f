//! Admission that follows the store: how many sessions may be opening at once.
//!
//! Opening a session reads the store (read position, last seq, unread count). In a
//! reconnect storm a fixed token bucket admits upgrades at a rate the store may not
//! sustain: the reads slow down, time out, the upgrades fail after costing their work,
//! the clients retry, and the storm feeds itself. So besides the bucket, a gateway caps
//! the sessions *being opened* at once, and moves that cap by what it measures (additive
//! increase, multiplicative decrease, as TCP does with its window):
//! - an open that took less than the target latency raises the cap by one;
//! - one that took longer, or failed, cuts the cap by 30%, at most once per target
//!   period (the opens in flight when it was cut were admitted under the old cap).
//!
//! Over the cap an upgrade waits its turn in a bounded FIFO queue (the HTTP request is
//! simply not answered yet) for at most `max_wait`; beyond `max_queued` waiting, or after
//! that wait, it is refused (503, jittered `Retry-After`) before it costs the store
//! anything. Waiting is what keeps a storm from feeding itself: a refused client comes
//! back with a new TCP connection and a new upgrade, and at tens of thousands of clients
//! those retries alone took the CPU the store needed to answer (measured: the cap sat at
//! its floor while 3,300 upgrades a second were refused and the store's answers took
//! 40–60 ms). The cap stays between a floor (so the gateway always makes progress) and a
//! ceiling.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Tunables of the adaptive cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLimits {
    /// Opens the gateway starts with.
    pub initial: u32,
    /// The cap never goes below this.
    pub min: u32,
    /// The cap never goes above this.
    pub max: u32,
    /// An open slower than this counts as the store being overloaded.
    pub target: Duration,
    /// Upgrades that may wait for a place at once; more are refused at once.
    pub max_queued: u32,
    /// How long an upgrade waits for a place before it is refused.
    pub max_wait: Duration,
}

impl Default for OpenLimits {
    fn default() -> Self {
        Self {
            initial: 64,
            // Measured (BENCHMARKS.md, session 6): with a floor of 4 and a 500 ms target,
            // a storm on a CPU-starved machine held the cap at its floor, and 10,000
            // clients took 209 s to come back. An open normally takes milliseconds; only
            // seconds mean the store itself is struggling.
            min: 64,
            max: 1_024,
            target: Duration::from_secs(2),
            max_queued: 4_096,
            max_wait: Duration::from_secs(10),
        }
    }
}

/// The cap's arithmetic, with time passed in (deterministic to test).
#[derive(Debug)]
struct Aimd {
    limits: OpenLimits,
    cap: f64,
    in_flight: u32,
    /// When the cap was last cut.
    cut_at: Option<Instant>,
}

impl Aimd {
    fn new(limits: OpenLimits) -> Self {
        let min = limits.min.max(1);
        let limits = OpenLimits {
            min,
            max: limits.max.max(min),
            ..limits
        };
        Self {
            cap: f64::from(limits.initial.clamp(limits.min, limits.max)),
            limits,
            in_flight: 0,
            cut_at: None,
        }
    }

    fn cap(&self) -> u32 {
        // The cap is kept within [min, max], both u32.
        self.cap as u32
    }

    fn try_begin(&mut self) -> bool {
        if self.in_flight >= self.cap() {
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// An open ended; `took` is `None` when it failed.
    fn end(&mut self, took: Option<Duration>, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let fast = took.is_some_and(|t| t <= self.limits.target);
        if fast {
            self.cap = (self.cap + 1.0).min(f64::from(self.limits.max));
            return;
        }
        let recently_cut = self
            .cut_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.limits.target);
        if !recently_cut {
            self.cap = (self.cap * 0.7).max(f64::from(self.limits.min));
            self.cut_at = Some(now);
        }
    }

    /// An open was abandoned (the client left): frees its place, says nothing of the store.
    fn abandon(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

/// The adaptive cap on sessions being opened, shared by a gateway's upgrades.
#[derive(Debug)]
pub struct OpenGate {
    aimd: Mutex<Aimd>,
    /// Wakes the longest waiter when a place frees up (tokio's `Notify` is FIFO, and a
    /// waiter that gives up passes its wake-up on).
    freed: Notify,
    queued: AtomicU32,
    limits: OpenLimits,
}

/// A session being opened; say how it went with [`Opening::finish`]. Dropped unfinished,
/// it only frees its place.
#[derive(Debug)]
pub struct Opening {
    gate: Arc<OpenGate>,
    started: Instant,
    finished: bool,
}

impl OpenGate {
    /// A gate with these limits.
    pub fn new(limits: OpenLimits) -> Self {
        Self {
            aimd: Mutex::new(Aimd::new(limits)),
            freed: Notify::new(),
            queued: AtomicU32::new(0),
            limits,
        }
    }

    /// A place to open a session: at once when the cap allows, else after waiting in
    /// line for at most `max_wait`; `None` when the line is full or the wait ran out.
    pub async fn begin(self: &Arc<Self>) -> Option<Opening> {
        if let Some(opening) = self.try_begin() {
            return Some(opening);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.limits.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let _in_line = InLine(&self.queued);
        let deadline = tokio::time::Instant::now() + self.limits.max_wait;
        loop {
            // Registered before the check, so a place freed in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(opening) = self.try_begin() {
                return Some(opening);
            }
            tokio::time::timeout_at(deadline, freed).await.ok()?;
        }
    }

    /// Upgrades waiting for a place now.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Acquire)
    }

    fn aimd(&self) -> std::sync::MutexGuard<'_, Aimd> {
        // The arithmetic cannot panic halfway: a poisoned lock still holds valid numbers.
        self.aimd.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place to open a session, or `None` when the cap is reached.
    pub fn try_begin(self: &Arc<Self>) -> Option<Opening> {
        let mut aimd = self.aimd();
        if !aimd.try_begin() {
            return None;
        }
        metrics::gauge!("herald_gateway_open_cap").set(f64::from(aimd.cap()));
        Some(Opening {
            gate: self.clone(),
            started: Instant::now(),
            finished: false,
        })
    }

    /// The current cap on sessions opening at once.
    pub fn cap(&self) -> u32 {
        self.aimd().cap()
    }

    /// Sessions opening now.
    pub fn in_flight(&self) -> u32 {
        self.aimd().in_flight
    }
}

/// Counts an upgrade in line for as long as it waits, however the wait ends.
struct InLine<'a>(&'a AtomicU32);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Opening {
    /// Records how the open went: its latency when it succeeded, a failure otherwise.
    pub fn finish(mut self, ok: bool) {
        self.finished = true;
        let now = Instant::now();
        let took = ok.then(|| now.saturating_duration_since(self.started));
        let (before, after) = {
            let mut aimd = self.gate.aimd();
            let before = aimd.cap();
            aimd.end(took, now);
            (before, aimd.cap())
        };
        // One place freed, and one more for each step the cap grew.
        for _ in 0..=after.saturating_sub(before) {
            self.gate.freed.notify_one();
        }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if !self.finished {
            self.gate.aimd().abandon();
            self.gate.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: OpenLimits = OpenLimits {
        initial: 10,
        min: 2,
        max: 20,
        target: Duration::from_millis(100),
        max_queued: 2,
        max_wait: Duration::from_secs(5),
    };

    fn fill(aimd: &mut Aimd) -> u32 {
        let mut n = 0;
        while aimd.try_begin() {
            n += 1;
        }
        n
    }

    #[test]
    fn refuses_beyond_the_cap_and_frees_places() {
        let mut aimd = Aimd::new(LIMITS);
        assert_eq!(fill(&mut aimd), 10);
        aimd.abandon();
        assert!(aimd.try_begin());
        assert!(!aimd.try_begin());
    }

    #[test]
    fn fast_opens_raise_the_cap_up_to_the_ceiling() {
        let mut aimd = Aimd::new(LIMITS);
        let now = Instant::now();
        for _ in 0..100 {
            assert!(aimd.try_begin());
            aimd.end(Some(Duration::from_millis(5)), now);
        }
        assert_eq!(aimd.cap(), 20);
        assert_eq!(fill(&mut aimd), 20);
    }

    #[test]
    fn slow_or_failed_opens_cut_the_cap_once_per_period_down_to_the_floor() {
        let mut aimd = Aimd::new(LIMITS);
        let t0 = Instant::now();
        assert_eq!(fill(&mut aimd), 10);
        // A burst of slow answers within one period is one cut, not ten.
        for _ in 0..10 {
            aimd.end(Some(Duration::from_secs(1)), t0);
        }
        assert_eq!(aimd.cap(), 7);
        // A failure a period later cuts again.
        assert!(aimd.try_begin());
        aimd.end(None, t0 + LIMITS.target);
        assert_eq!(aimd.cap(), 4);
        // However bad it gets, the floor holds.
        for i in 2..20 {
            assert!(aimd.try_begin());
            aimd.end(None, t0 + LIMITS.target * i);
        }
        assert_eq!(aimd.cap(), 2);
        // And it recovers as the store answers quickly again.
        for _ in 0..5 {
            assert!(aimd.try_begin());
            aimd.end(Some(Duration::from_millis(1)), t0 + LIMITS.target * 30);
        }
        assert_eq!(aimd.cap(), 7);
    }

    #[test]
    fn an_opening_dropped_unfinished_frees_its_place() {
        let gate = Arc::new(OpenGate::new(OpenLimits {
            initial: 1,
            min: 1,
            ..LIMITS
        }));
        let first = gate.try_begin().expect("a place");
        assert!(gate.try_begin().is_none());
        drop(first);
        let second = gate.try_begin().expect("freed");
        second.finish(true);
        assert_eq!(gate.in_flight(), 0);
        assert_eq!(gate.cap(), 2);
    }

    /// A gate that admits one open at a time, whatever happens.
    fn one_place() -> Arc<OpenGate> {
        Arc::new(OpenGate::new(OpenLimits {
            initial: 1,
            min: 1,
            max: 1,
            ..LIMITS
        }))
    }

    #[tokio::test]
    async fn over_the_cap_an_open_waits_its_turn_and_a_full_line_is_refused() {
        let gate = one_place();
        let first = gate.begin().await.expect("a place at once");
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move { gate.begin().await.map(|o| o.finish(true)) })
            })
            .collect();
        // Both are in line (the line holds two); a third is refused at once.
        while gate.queued() < 2 {
            tokio::task::yield_now().await;
        }
        assert!(gate.begin().await.is_none(), "the line is full");
        // Each freed place lets the next one through.
        first.finish(true);
        for w in waiting {
            assert!(w.await.expect("joined").is_some(), "got a place in turn");
        }
        assert_eq!(gate.queued(), 0);
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_is_refused() {
        let gate = one_place();
        let _held = gate.begin().await.expect("a place");
        assert!(gate.begin().await.is_none(), "refused after max_wait");
        assert_eq!(gate.queued(), 0);
    }
}
