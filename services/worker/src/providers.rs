//! The providers a worker sends through, each behind its own token bucket and circuit
//! breaker, in failover order per channel.
//!
//! This is where providers plug in: build each [`Provider`] and [`Providers::register`]
//! it with its [`Limits`]; the first registered provider of a channel that accepts a
//! target is its primary, the next ones take over while the primary's circuit is open.

use crate::breaker::{Admit, Breaker, BreakerConfig};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_channels::{Provider, Target};
use herald_protocol::Channel;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    /// The provider's name.
    pub fn name(&self) -> &str {
        self.provider.name()
    }

    /// Publishes the breaker state as a gauge.
    pub fn report(&self) {
        metrics::gauge!("herald_provider_breaker_state", "provider" => self.name().to_string())
            .set(self.breaker.state().gauge());
    }
}

/// Every provider, by channel, in failover order.
#[derive(Debug, Default)]
pub struct Providers {
    all: Vec<Arc<Guarded>>,
}

/// Which provider to use for one send.
#[derive(Debug)]
pub enum Pick {
    /// This one (`probe`: it is the half-open probe of its breaker).
    Use(Arc<Guarded>, bool),
    /// Every provider that accepts the target has its circuit open; try again after this.
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
            provider,
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

    /// The provider to use for `target` on `channel` now: the first that accepts it and
    /// whose circuit admits a call.
    pub fn pick(&self, channel: Channel, target: &Target) -> Pick {
        let now = Instant::now();
        let mut soonest: Option<Duration> = None;
        for g in self
            .all
            .iter()
            .filter(|g| g.provider.channel() == channel && g.provider.accepts(target))
        {
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
