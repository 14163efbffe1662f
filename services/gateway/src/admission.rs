//! Admission control: whether a connection may open now, and how fast a client may talk.
//!
//! - Upgrades pass a token bucket per gateway process; over it, 503 with a jittered
//!   `Retry-After`, so a reconnect storm spreads itself out instead of piling up.
//! - Each user holds at most `max_per_user` connections at once (429 beyond), so one
//!   account cannot exhaust a gateway's file descriptors.
//! - Each connection's client frames pass a token bucket of their own (close 1008 beyond).
//! - Sessions being opened (the store reads of an upgrade) are capped by a limit that
//!   follows the store's latency ([`adaptive`]): in a reconnect storm the gateway admits
//!   what the store can answer, and refuses the rest before they cost anything.
//! - A browser's WebSocket never shows the status of a refused upgrade, so a client
//!   cannot tell "busy" from "WebSocket is blocked on this network" by itself. It asks
//!   with a plain GET of the WebSocket URL, answered by [`Admission::probe`]: busy (503,
//!   a jittered `Retry-After` within the one still running) while this gateway has been
//!   refusing upgrades, 429 at the user's cap, otherwise nothing against it.

pub mod adaptive;

use axum::http::StatusCode;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_api::AppError;
use herald_protocol::UserId;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Admission limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Upgrades per second per gateway process (the bucket's refill).
    pub upgrades_per_sec: u32,
    /// Connections one user may hold on this gateway.
    pub max_per_user: u32,
    /// Client frames per second per connection (bursts of twice that pass).
    pub frames_per_sec: u32,
    /// The adaptive cap on sessions being opened at once.
    pub opening: adaptive::OpenLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            upgrades_per_sec: 2_000,
            max_per_user: 32,
            frames_per_sec: 50,
            opening: adaptive::OpenLimits::default(),
        }
    }
}

/// Admission state of one gateway process.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    upgrades: DefaultDirectRateLimiter,
    per_user: Mutex<HashMap<UserId, u32>>,
    opening: Arc<adaptive::OpenGate>,
    /// Milliseconds after `epoch` until which this gateway counts as busy: the end of the
    /// longest `Retry-After` it has handed out (0: never refused).
    busy_until_ms: AtomicU64,
    epoch: Instant,
}

/// A user's admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    user: UserId,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut map) = self.admission.per_user.lock()
            && let Some(n) = map.get_mut(&self.user)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN)
}

impl Admission {
    /// Admission with these limits.
    pub fn new(limits: Limits) -> Self {
        let upgrades = RateLimiter::direct(Quota::per_second(nonzero(limits.upgrades_per_sec)));
        Self {
            limits,
            upgrades,
            per_user: Mutex::new(HashMap::new()),
            opening: Arc::new(adaptive::OpenGate::new(limits.opening)),
            busy_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// 503 "overloaded" with a jittered `Retry-After`, remembered for [`Admission::probe`].
    fn overloaded(&self) -> AppError {
        let secs = rand::random_range(1..=5);
        self.busy_until_ms
            .fetch_max(self.now_ms().saturating_add(secs * 1000), Ordering::Relaxed);
        busy(secs)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Admits a connection of `user`, or says why not.
    ///
    /// # Errors
    /// 503 with a jittered `Retry-After` over the upgrade rate; 429 over the per-user cap.
    pub fn admit(self: &Arc<Self>, user: &UserId) -> Result<Ticket, AppError> {
        if self.upgrades.check().is_err() {
            metrics::counter!("herald_gateway_refused_total", "reason" => "rate").increment(1);
            return Err(self.overloaded());
        }
        let mut map = self.per_user.lock().map_err(|_| internal())?;
        let held = map.entry(user.clone()).or_insert(0);
        if *held >= self.limits.max_per_user {
            metrics::counter!("herald_gateway_refused_total", "reason" => "per_user").increment(1);
            return Err(self.too_many());
        }
        *held += 1;
        Ok(Ticket {
            admission: self.clone(),
            user: user.clone(),
        })
    }

    /// A place among the sessions being opened, after waiting in line if the store is
    /// already busy with as many as it answers quickly; 503 when the line is full or the
    /// wait runs out.
    ///
    /// # Errors
    /// 503 with a jittered `Retry-After` over the adaptive cap.
    pub async fn begin_open(&self) -> Result<adaptive::Opening, AppError> {
        self.opening.begin().await.ok_or_else(|| {
            metrics::counter!("herald_gateway_refused_total", "reason" => "store_busy")
                .increment(1);
            self.overloaded()
        })
    }

    /// What an upgrade of `user` would be told now, without admitting anything: for a
    /// client whose upgrade failed and that cannot see why (a browser's WebSocket).
    /// Busy while the longest `Retry-After` handed out is still running: the refused
    /// upgrade may have been this client's, and a bucket that refills in milliseconds
    /// would otherwise answer "come in" to a probe made just after it.
    ///
    /// Each busy answer is a wait of its own, drawn at random within what is left of
    /// that `Retry-After` (whole seconds, at least one), like each refusal's. The time
    /// left is the same for every probe, and clients waiting exactly that would all come
    /// back in the same second: the storm the jittered refusals spread out, gathered up
    /// again. A probe does not make the gateway busy for longer: a client whose
    /// upgrades fail for another reason (a proxy that drops them) learns so once the
    /// refusals stop.
    ///
    /// # Errors
    /// 503 with a `Retry-After` within the time left while busy; 429 at the per-user cap.
    pub fn probe(&self, user: &UserId) -> Result<(), AppError> {
        let left_ms = self
            .busy_until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(self.now_ms());
        if left_ms > 0 {
            return Err(busy(rand::random_range(1..=left_ms.div_ceil(1000))));
        }
        let map = self.per_user.lock().map_err(|_| internal())?;
        if map
            .get(user)
            .is_some_and(|&n| n >= self.limits.max_per_user)
        {
            return Err(self.too_many());
        }
        Ok(())
    }

    fn too_many(&self) -> AppError {
        AppError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!(
                "this user already holds {} connections to this gateway; close one",
                self.limits.max_per_user
            ),
        )
    }

    /// A fresh limiter for one connection's client frames.
    pub fn frame_limiter(&self) -> DefaultDirectRateLimiter {
        let rate = nonzero(self.limits.frames_per_sec);
        RateLimiter::direct(
            Quota::per_second(rate).allow_burst(nonzero(rate.get().saturating_mul(2))),
        )
    }
}

/// 503 with a `Retry-After` of `secs`.
fn busy(secs: u64) -> AppError {
    AppError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "too many connections are opening right now; retry after the Retry-After delay",
    )
    .retry_after(secs)
}

fn internal() -> AppError {
    AppError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_cap_frees_slots_on_drop() {
        let a = Arc::new(Admission::new(Limits {
            max_per_user: 2,
            ..Limits::default()
        }));
        let u = UserId::new("u").expect("id");
        let t1 = a.admit(&u).expect("first");
        let _t2 = a.admit(&u).expect("second");
        let refused = a.admit(&u).expect_err("third");
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        // Other users are not affected.
        assert!(a.admit(&UserId::new("v").expect("id")).is_ok());
        drop(t1);
        assert!(a.admit(&u).is_ok());
    }

    #[test]
    fn upgrade_storms_get_503_with_retry_after() {
        let a = Arc::new(Admission::new(Limits {
            upgrades_per_sec: 3,
            max_per_user: 1000,
            ..Limits::default()
        }));
        let u = UserId::new("u").expect("id");
        let mut tickets = Vec::new();
        let mut refused = None;
        for _ in 0..10 {
            match a.admit(&u) {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let refused = refused.expect("the bucket runs dry");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            refused
                .retry_after_secs()
                .is_some_and(|s| (1..=5).contains(&s))
        );
    }

    #[test]
    fn probe_answers_what_an_upgrade_would_be_told() {
        let a = Arc::new(Admission::new(Limits {
            upgrades_per_sec: 1,
            max_per_user: 1,
            ..Limits::default()
        }));
        let u = UserId::new("u").expect("id");
        assert!(a.probe(&u).is_ok(), "an idle gateway has room");
        let held = a.admit(&u).expect("the bucket's one upgrade");
        let at_cap = a
            .probe(&u)
            .expect_err("the user holds their one connection");
        assert_eq!(at_cap.status(), StatusCode::TOO_MANY_REQUESTS);
        drop(held);
        // The bucket is dry: the next upgrade is refused, and the probe says busy for as
        // long as that refusal's Retry-After runs, although nothing is held.
        let refused = a.admit(&u).expect_err("the bucket is dry");
        let told = refused.retry_after_secs().expect("Retry-After");
        let busy = a.probe(&u).expect_err("busy");
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            busy.retry_after_secs()
                .is_some_and(|s| (1..=told).contains(&s)),
            "{:?} of {told}",
            busy.retry_after_secs()
        );
        // Another user is told the same: the gateway as a whole is busy.
        let other = a.probe(&UserId::new("v").expect("id")).expect_err("busy");
        assert_eq!(other.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn busy_probes_are_each_told_a_wait_of_their_own() {
        let a = Arc::new(Admission::new(Limits::default()));
        // Refusing until 5 s from now.
        a.busy_until_ms.store(a.now_ms() + 5_000, Ordering::Relaxed);
        let waits: Vec<u64> = (0..200)
            .map(|i| {
                let user = UserId::new(format!("u{i}")).expect("id");
                let busy = a.probe(&user).expect_err("busy");
                assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
                busy.retry_after_secs().expect("Retry-After")
            })
            .collect();
        assert!(waits.iter().all(|s| (1..=5).contains(s)), "{waits:?}");
        let (least, most) = (waits.iter().min(), waits.iter().max());
        assert!(
            most.zip(least).is_some_and(|(m, l)| m - l >= 2),
            "spread over the busy window: {waits:?}"
        );
        // Probing did not make the gateway busy for longer.
        assert!(a.busy_until_ms.load(Ordering::Relaxed) <= a.now_ms() + 5_000);
    }
}
