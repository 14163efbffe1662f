//! A circuit breaker per provider: after enough consecutive failures, or a high error
//! rate over recent calls, the circuit opens and the provider gets no traffic for a while
//! (workers fail over to the next provider of the channel); then one probe is let through
//! (half-open), and its answer closes or re-opens the circuit.
//!
//! Small and synchronous on purpose: the maintained breaker crates either tie the breaker
//! to wrapping the call (we need to classify the answer first, since a 400 or a 429 says
//! nothing about the provider's health) or bring their own futures runtime glue.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a circuit opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub consecutive_failures: u32,
    /// Failure ratio over the last `window` calls that opens it (0..=1).
    pub error_rate: f64,
    /// Calls the error rate is measured over (and the least before it applies).
    pub window: usize,
    /// How long an open circuit stays open before a probe.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            error_rate: 0.5,
            window: 20,
            open_for: Duration::from_secs(30),
        }
    }
}

/// A breaker's state, as shown in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// No traffic until the time passed.
    Open,
    /// One probe in flight or allowed.
    HalfOpen,
}

impl BreakerState {
    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed {
        consecutive: u32,
        recent: VecDeque<bool>,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        probing: bool,
    },
}

/// Whether a call may go to the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Yes.
    Yes,
    /// Yes, as the half-open probe.
    Probe,
    /// No; the circuit may admit a probe after this long.
    No(Duration),
}

/// One provider's breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner::Closed {
                consecutive: 0,
                recent: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to make a call at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => Admit::Yes,
            Inner::Open { until } if now >= until => {
                *inner = Inner::HalfOpen { probing: true };
                Admit::Probe
            }
            Inner::Open { until } => Admit::No(until - now),
            Inner::HalfOpen { probing: false } => {
                *inner = Inner::HalfOpen { probing: true };
                Admit::Probe
            }
            Inner::HalfOpen { probing: true } => Admit::No(self.config.open_for / 10),
        }
    }

    /// What [`Breaker::admit`] would answer at `now`, without taking the probe.
    pub fn peek(&self, now: Instant) -> Admit {
        match *self.lock() {
            Inner::Closed { .. } => Admit::Yes,
            Inner::Open { until } if now >= until => Admit::Probe,
            Inner::Open { until } => Admit::No(until - now),
            Inner::HalfOpen { probing: false } => Admit::Probe,
            Inner::HalfOpen { probing: true } => Admit::No(self.config.open_for / 10),
        }
    }

    /// The provider answered in a way that says it is healthy (success, or an error about
    /// the request rather than the provider).
    pub fn on_success(&self) {
        let mut inner = self.lock();
        match &mut *inner {
            Inner::Closed {
                consecutive,
                recent,
            } => {
                *consecutive = 0;
                push(recent, true, self.config.window);
            }
            Inner::HalfOpen { .. } => {
                *inner = Inner::Closed {
                    consecutive: 0,
                    recent: VecDeque::new(),
                };
            }
            Inner::Open { .. } => {}
        }
    }

    /// The provider failed (5xx, timeout, refused) at `now`.
    pub fn on_failure(&self, now: Instant) {
        let mut inner = self.lock();
        let open = match &mut *inner {
            Inner::Closed {
                consecutive,
                recent,
            } => {
                *consecutive += 1;
                push(recent, false, self.config.window);
                let failures = recent.iter().filter(|ok| !**ok).count();
                *consecutive >= self.config.consecutive_failures
                    || (recent.len() >= self.config.window
                        && failures as f64 / recent.len() as f64 >= self.config.error_rate)
            }
            Inner::HalfOpen { .. } => true,
            Inner::Open { .. } => false,
        };
        if open {
            *inner = Inner::Open {
                until: now + self.config.open_for,
            };
        }
    }

    /// A probe that ended without an answer about health gives the slot back.
    pub fn release_probe(&self) {
        let mut inner = self.lock();
        if let Inner::HalfOpen { probing } = &mut *inner {
            *probing = false;
        }
    }
}

fn push(recent: &mut VecDeque<bool>, ok: bool, window: usize) {
    recent.push_back(ok);
    while recent.len() > window.max(1) {
        recent.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            error_rate: 0.5,
            window: 10,
            open_for: Duration::from_secs(10),
        }
    }

    #[test]
    fn opens_on_consecutive_failures_and_probes_after_the_pause() {
        let b = Breaker::new(config());
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Admit::Yes);
            b.on_failure(t0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(4)),
            Admit::No(Duration::from_secs(6))
        );
        // One probe only; looking does not take it.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.peek(later), Admit::Probe);
        assert_eq!(b.peek(later), Admit::Probe);
        assert_eq!(b.admit(later), Admit::Probe);
        assert!(matches!(b.peek(later), Admit::No(_)));
        assert!(matches!(b.admit(later), Admit::No(_)));
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(later), Admit::Yes);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = Breaker::new(config());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.on_failure(t0);
        }
        let later = t0 + Duration::from_secs(11);
        assert_eq!(b.admit(later), Admit::Probe);
        b.on_failure(later);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(later), Admit::No(Duration::from_secs(10)));
    }

    #[test]
    fn opens_on_error_rate_without_consecutive_failures() {
        let b = Breaker::new(config());
        let t0 = Instant::now();
        // Alternating: never 3 in a row, but 50 % over a full window.
        for i in 0..10 {
            if i % 2 == 1 {
                b.on_failure(t0);
            } else {
                b.on_success();
            }
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn successes_reset_the_count() {
        let b = Breaker::new(config());
        let t0 = Instant::now();
        for _ in 0..5 {
            b.on_failure(t0);
            b.on_failure(t0);
            b.on_success();
            b.on_success();
            b.on_success();
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_released_probe_lets_the_next_one_through() {
        let b = Breaker::new(config());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.on_failure(t0);
        }
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(later), Admit::Probe);
        b.release_probe();
        assert_eq!(b.admit(later), Admit::Probe);
    }
}
