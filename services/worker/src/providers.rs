//! The providers a worker sends through, each behind its own token bucket and circuit
//! breaker, in failover order per channel.
//!
//! This is where providers plug in: build each [`Provider`] and [`Providers::register`]
//! it with its [`Limits`]; the first registered provider of a channel that accepts a
//! target is its primary, the next ones take over while the primary's circuit is open.

use crate::breaker::{Admit, Breaker, BreakerConfig, BreakerState};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_channels::{Provider, SendError, Target};
use herald_protocol::Channel;
use metrics::{Counter, Gauge, Histogram};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How hard a provider may be driven.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// Sends per second (token bucket; bursts up to the same number). `None`: unlimited.
    pub rate_per_second: Option<NonZeroU32>,
    /// When its circuit opens.
    pub breaker: BreakerConfig,
}

/// A provider with its guards.
pub struct Guarded {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// Its token bucket.
    limiter: Option<DefaultDirectRateLimiter>,
    /// Its breaker.
    pub breaker: Breaker,
    /// Its metrics.
    pub metrics: ProviderMetrics,
    /// The breaker state last reported ([`BreakerState::gauge`]).
    reported: AtomicU8,
    /// Until when the provider said to slow down (a 429 or quota answer): its limits are
    /// usually per account or project, so every job waits or fails over, not only the
    /// one that was told.
    paused_until: std::sync::Mutex<Option<Instant>>,
    /// Woken when a breaker's reported state changes (shared by all providers).
    changed: Arc<Notify>,
}

/// A provider's metric handles, registered once rather than looked up by name and labels
/// on every send. Built after the process installed its recorder (a handle taken before
/// records nowhere).
pub struct ProviderMetrics {
    /// `herald_provider_send_seconds`: how long each send took.
    pub send_seconds: Histogram,
    sent: Counter,
    throttled: Counter,
    transient: Counter,
    permanent: Counter,
    invalid_target: Counter,
    breaker_state: Gauge,
}

/// How a send ended, as `herald_provider_sends_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendResult {
    /// Accepted.
    Sent,
    /// Rate-limited by the provider.
    Throttled,
    /// 5xx, timeout, connection trouble.
    Transient,
    /// Refused for good.
    Permanent,
    /// The target is gone (unregistered token, retired endpoint).
    InvalidTarget,
}

impl SendResult {
    /// The `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Throttled => "throttled",
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::InvalidTarget => "invalid_target",
        }
    }
}

impl From<&SendError> for SendResult {
    fn from(error: &SendError) -> Self {
        match error {
            SendError::Throttled { .. } => Self::Throttled,
            SendError::Transient { .. } => Self::Transient,
            SendError::Permanent { .. } => Self::Permanent,
            SendError::InvalidTarget { .. } => Self::InvalidTarget,
        }
    }
}

impl ProviderMetrics {
    fn new(provider: &str) -> Self {
        let sends = |result: SendResult| metrics::counter!("herald_provider_sends_total", "provider" => provider.to_string(), "result" => result.as_str());
        Self {
            send_seconds: metrics::histogram!("herald_provider_send_seconds", "provider" => provider.to_string()),
            sent: sends(SendResult::Sent),
            throttled: sends(SendResult::Throttled),
            transient: sends(SendResult::Transient),
            permanent: sends(SendResult::Permanent),
            invalid_target: sends(SendResult::InvalidTarget),
            breaker_state: metrics::gauge!("herald_provider_breaker_state", "provider" => provider.to_string()),
        }
    }

    /// Counts one send that ended with `result`.
    pub fn count(&self, result: SendResult) {
        match result {
            SendResult::Sent => &self.sent,
            SendResult::Throttled => &self.throttled,
            SendResult::Transient => &self.transient,
            SendResult::Permanent => &self.permanent,
            SendResult::InvalidTarget => &self.invalid_target,
        }
        .increment(1);
    }
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("provider", &self.provider.name())
            .field("breaker", &self.breaker.state())
            .finish()
    }
}

impl Guarded {
    /// Waits for a token of the provider's bucket.
    pub async fn ready(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
    }

    /// The provider throttled us: no call to it for `for_` (capped at
    /// [`MAX_THROTTLE_PAUSE`]; a later pause never shortens an earlier one).
    pub fn pause(&self, for_: Duration) {
        let now = Instant::now();
        let until = now + for_.min(MAX_THROTTLE_PAUSE);
        let began = {
            let mut paused = self
                .paused_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let began = paused.is_none_or(|p| p <= now);
            if paused.is_none_or(|p| p < until) {
                *paused = Some(until);
            }
            began
        };
        // The channel's gate may have shut: the lanes waiting on a pull look again.
        if began {
            self.changed.notify_waiters();
        }
    }

    /// How long the provider stays paused at `now`, if it is.
    fn paused(&self, now: Instant) -> Option<Duration> {
        let paused = *self
            .paused_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        paused.and_then(|until| until.checked_duration_since(now))
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        self.provider.name()
    }

    /// Publishes the breaker state as a gauge, and wakes the lanes watching the gate when
    /// it changed.
    pub fn report(&self) {
        let state = self.breaker.state();
        self.metrics.breaker_state.set(state.gauge());
        if self.reported.swap(state as u8, Ordering::Relaxed) != state as u8 {
            self.changed.notify_waiters();
        }
    }
}

/// Longest a throttled provider is left alone, whatever its `Retry-After` says (the job
/// that was told still waits all of it).
pub const MAX_THROTTLE_PAUSE: Duration = Duration::from_secs(60);

/// Every provider, by channel, in failover order.
#[derive(Debug, Default)]
pub struct Providers {
    all: Vec<Arc<Guarded>>,
    changed: Arc<Notify>,
}

/// Whether a channel's lanes should pull jobs now ([`Providers::gate`]).
///
/// A job pulled while no circuit of its channel admits a call can only be deferred, and
/// every deferral is a delivery that counts towards `MaxDeliver`: a backlog pulled again
/// and again through an outage longer than its back-off would be dead-lettered without
/// one attempt. So a channel whose circuits are all open, or whose providers are paused
/// by a throttle (a 429, or a 5xx with `Retry-After`), pulls nothing, and then one job at
/// a time, for the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// A provider of the channel takes calls: pull as usual.
    Open,
    /// Every circuit is open or paused, and one that is not paused would let its probe
    /// through now: pull one job.
    Probe,
    /// Every circuit is open (or its probe is out) or paused: pull nothing for up to
    /// this long.
    Shut(Duration),
}

/// Which provider to use for one send.
#[derive(Debug)]
pub enum Pick {
    /// This one (`probe`: it is the half-open probe of its breaker).
    Use(Arc<Guarded>, bool),
    /// Every provider that accepts the target has its circuit open or is throttled; try
    /// again after this.
    AllOpen(Duration),
    /// No provider of the channel accepts this target.
    NoneAccepts,
}

impl Providers {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a provider after the ones of its channel already registered.
    pub fn register(&mut self, provider: Arc<dyn Provider>, limits: Limits) -> &mut Self {
        let guarded = Guarded {
            limiter: limits
                .rate_per_second
                .map(|r| RateLimiter::direct(Quota::per_second(r))),
            breaker: Breaker::new(limits.breaker),
            metrics: ProviderMetrics::new(provider.name()),
            provider,
            reported: AtomicU8::new(BreakerState::Closed as u8),
            paused_until: std::sync::Mutex::new(None),
            changed: self.changed.clone(),
        };
        guarded.report();
        self.all.push(Arc::new(guarded));
        self
    }

    /// Channels that have at least one provider.
    pub fn channels(&self) -> Vec<Channel> {
        let mut out: Vec<Channel> = Vec::new();
        for g in &self.all {
            let c = g.provider.channel();
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }

    /// Whether `channel` has a provider.
    pub fn serves(&self, channel: Channel) -> bool {
        self.all.iter().any(|g| g.provider.channel() == channel)
    }

    /// Whether `channel`'s lanes should pull now, by its providers' circuits and
    /// throttle pauses: a paused provider admits no call, so it counts as a shut circuit
    /// until its pause ends (its half-open probe included, which waits for the end too).
    pub fn gate(&self, channel: Channel) -> Gate {
        self.gate_at(channel, Instant::now())
    }

    fn gate_at(&self, channel: Channel, now: Instant) -> Gate {
        let mut probe = false;
        let mut soonest: Option<Duration> = None;
        for g in self.all.iter().filter(|g| g.provider.channel() == channel) {
            let admit = match g.paused(now) {
                Some(wait) => Admit::No(wait),
                None => g.breaker.peek(now),
            };
            match admit {
                Admit::Yes => return Gate::Open,
                Admit::Probe => probe = true,
                Admit::No(wait) => soonest = Some(soonest.map_or(wait, |s| s.min(wait))),
            }
        }
        match (probe, soonest) {
            (true, _) => Gate::Probe,
            (false, Some(wait)) => Gate::Shut(wait),
            (false, None) => Gate::Open,
        }
    }

    /// Resolves when a breaker's state changed. Create it before reading
    /// [`Providers::gate`], or a change in between goes unnoticed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// The provider to use for `target` on `channel` now: the first that accepts it, is
    /// not paused by a throttle, and whose circuit admits a call.
    pub fn pick(&self, channel: Channel, target: &Target) -> Pick {
        let now = Instant::now();
        let mut soonest: Option<Duration> = None;
        for g in self
            .all
            .iter()
            .filter(|g| g.provider.channel() == channel && g.provider.accepts(target))
        {
            if let Some(wait) = g.paused(now) {
                soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
                continue;
            }
            match g.breaker.admit(now) {
                Admit::Yes => return Pick::Use(g.clone(), false),
                Admit::Probe => {
                    g.report();
                    return Pick::Use(g.clone(), true);
                }
                Admit::No(wait) => soonest = Some(soonest.map_or(wait, |s| s.min(wait))),
            }
        }
        match soonest {
            Some(wait) => Pick::AllOpen(wait),
            None => Pick::NoneAccepts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_channels::{Delivery, Sent};

    struct Sms;

    #[async_trait::async_trait]
    impl Provider for Sms {
        fn name(&self) -> &str {
            "sms"
        }
        fn channel(&self) -> Channel {
            Channel::Sms
        }
        fn accepts(&self, _: &Target) -> bool {
            true
        }
        async fn send(&self, _: &Delivery) -> Result<Sent, SendError> {
            Ok(Sent {
                provider_message_id: None,
            })
        }
    }

    fn one(open_for: Duration) -> (Providers, Arc<Guarded>) {
        let mut providers = Providers::new();
        let limits = Limits {
            rate_per_second: None,
            breaker: BreakerConfig {
                consecutive_failures: 1,
                open_for,
                ..BreakerConfig::default()
            },
        };
        providers.register(Arc::new(Sms), limits);
        let guarded = providers.all[0].clone();
        (providers, guarded)
    }

    #[test]
    fn a_paused_provider_shuts_the_gate_until_its_pause_ends() {
        let (providers, sms) = one(Duration::from_secs(30));
        let now = Instant::now();
        assert_eq!(providers.gate_at(Channel::Sms, now), Gate::Open);
        sms.pause(Duration::from_secs(10));
        assert!(
            matches!(providers.gate_at(Channel::Sms, now), Gate::Shut(wait) if wait > Duration::from_secs(9)),
            "{:?}",
            providers.gate_at(Channel::Sms, now)
        );
        let after = now + Duration::from_secs(11);
        assert_eq!(providers.gate_at(Channel::Sms, after), Gate::Open);
        // Another channel's pause shuts nothing here.
        assert_eq!(providers.gate_at(Channel::Push, now), Gate::Open);
    }

    #[test]
    fn no_probe_while_the_provider_is_still_paused() {
        let (providers, sms) = one(Duration::from_secs(1));
        let now = Instant::now();
        sms.breaker.on_failure(now);
        sms.pause(Duration::from_secs(10));
        // The circuit would let its probe through after 1 s; the pause says 10 s.
        let probe_due = now + Duration::from_secs(2);
        assert_eq!(sms.breaker.peek(probe_due), Admit::Probe);
        assert!(
            matches!(providers.gate_at(Channel::Sms, probe_due), Gate::Shut(_)),
            "{:?}",
            providers.gate_at(Channel::Sms, probe_due)
        );
        assert_eq!(
            providers.gate_at(Channel::Sms, now + Duration::from_secs(11)),
            Gate::Probe
        );
    }

    #[tokio::test]
    async fn a_pause_that_begins_wakes_the_lanes_at_the_gate() {
        let (providers, sms) = one(Duration::from_secs(30));
        let changed = providers.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        sms.pause(Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(5), changed)
            .await
            .expect("woken");
    }
}
