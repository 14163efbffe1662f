//! Public keys from a JWKS document (RFC 7517), picked by the token's `kid`: how an
//! identity provider publishes the keys it signs user tokens with, and rotates them.
//!
//! Only signature keys of public-key families are taken (RSA, EC P-256/P-384, Ed25519);
//! a symmetric (`oct`) key in a published set would let anyone who can read the set sign
//! tokens, so it is skipped, as are keys marked for encryption. A key that names its
//! `alg` verifies only tokens of that algorithm; one that does not, only the algorithms
//! of its family. The set is swapped whole when it is fetched again
//! ([`JwksHandle::replace`]), so a rotation needs no restart.
//!
//! A provider may sign with a new key before a periodic read has seen it. A token naming
//! a `kid` the set lacks may therefore ask whoever reads the document to read it now
//! ([`JwksHandle::refetch`]); such reads are rate-limited, so tokens with made-up `kid`s
//! cannot make Herald hammer the provider.

use crate::jwt::JwtError;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// The usable keys of one JWKS document.
#[derive(Clone)]
pub struct Jwks {
    keys: Vec<Key>,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (&k.kid, &k.algorithms)))
            .finish()
    }
}

impl Jwks {
    /// Parses a JWKS document and keeps its usable signature keys.
    ///
    /// # Errors
    /// [`JwtError::Key`] when it is not a JWKS document or holds no usable key.
    pub fn parse(json: &[u8]) -> Result<Self, JwtError> {
        let set: JwkSet = serde_json::from_slice(json)
            .map_err(|e| JwtError::Key(format!("not a JWKS document: {e}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let family: &[Algorithm] = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => &[
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => &[Algorithm::ES256],
                    EllipticCurve::P384 => &[Algorithm::ES384],
                    _ => continue,
                },
                AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                    EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
                    _ => continue,
                },
                AlgorithmParameters::OctetKey(_) => continue,
            };
            let algorithms: Vec<Algorithm> = match jwk.common.key_algorithm {
                None => family.to_vec(),
                Some(named) => match named.to_string().parse::<Algorithm>() {
                    Ok(alg) if family.contains(&alg) => vec![alg],
                    _ => continue,
                },
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                algorithms,
                key,
            });
        }
        if keys.is_empty() {
            return Err(JwtError::Key(
                "the JWKS document holds no RSA, EC (P-256, P-384) or Ed25519 signature key".into(),
            ));
        }
        Ok(Self { keys })
    }

    /// A set without keys: what is used until the document could be read once.
    pub fn empty() -> Self {
        Self { keys: Vec::new() }
    }

    /// Whether a token under `kid` could be verified by a fresher copy of the document
    /// only: the set has no key of that id (or, for a token without `kid`, no key at all).
    fn lacks(&self, kid: Option<&str>) -> bool {
        match kid {
            Some(kid) => !self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)),
            None => self.keys.is_empty(),
        }
    }

    /// The key for a token signed with `alg` under `kid`. Without a `kid`, only a set of
    /// one key answers.
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        let key = match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))?,
            None if self.keys.len() == 1 => &self.keys[0],
            None => return None,
        };
        key.algorithms.contains(&alg).then_some(&key.key)
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds none (never, once parsed; [`Jwks::empty`] does).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Longest a request whose token names a key the set lacks waits for the document to be
/// read again ([`crate::UserAuth::refetch_for`]).
pub const REFETCH_WAIT: Duration = Duration::from_secs(5);

/// The current key set, shared between the verifier and whatever refreshes it.
#[derive(Debug, Clone)]
pub struct JwksHandle(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    keys: RwLock<Arc<Jwks>>,
    refetch: Refetch,
}

/// On-demand reads of the document. Requests are numbered; a read serves every request
/// made before it started, and publishes the highest such number in `served` when it
/// ends (well or not).
#[derive(Debug)]
struct Refetch {
    state: Mutex<RefetchState>,
    wake: Notify,
    served: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct RefetchState {
    /// Least time between two on-demand reads; `None` until a reader is attached.
    min_interval: Option<Duration>,
    last: Option<Instant>,
    requested: u64,
}

impl JwksHandle {
    /// A handle holding `jwks`.
    pub fn new(jwks: Jwks) -> Self {
        Self(Arc::new(Shared {
            keys: RwLock::new(Arc::new(jwks)),
            refetch: Refetch {
                state: Mutex::new(RefetchState::default()),
                wake: Notify::new(),
                served: watch::Sender::new(0),
            },
        }))
    }

    /// Replaces the key set (a fresh fetch of the document).
    pub fn replace(&self, jwks: Jwks) {
        *self
            .0
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(jwks);
    }

    fn current(&self) -> Arc<Jwks> {
        self.0
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How many keys the current set holds.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    /// Whether the current set holds no key (the document was never read).
    pub fn is_empty(&self) -> bool {
        self.current().is_empty()
    }

    /// Runs `f` with the key for `kid` and `alg`, if the current set has one.
    pub(crate) fn with_key<T>(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        f: impl FnOnce(&DecodingKey) -> T,
    ) -> Option<T> {
        let set = self.current();
        set.find(kid, alg).map(f)
    }

    /// Whether only a fresher document could verify a token under `kid`.
    pub(crate) fn lacks(&self, kid: Option<&str>) -> bool {
        self.current().lacks(kid)
    }

    /// Turns on-demand reads on: the caller reads the document when
    /// [`JwksHandle::refetch_requested`] fires and reports with [`JwksHandle::fetched`].
    /// Two on-demand reads are at least `min_interval` apart.
    pub fn serve_refetches(&self, min_interval: Duration) {
        self.lock().min_interval = Some(min_interval);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RefetchState> {
        self.0
            .refetch
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks for the document to be read now, and waits up to `wait` for that read to
    /// end. Joins a read already asked for; returns at once, `false`, when the last
    /// on-demand read is more recent than the minimum interval or nobody serves reads.
    /// `true` when a read ended: the set may hold new keys.
    pub async fn refetch(&self, wait: Duration) -> bool {
        let refetch = &self.0.refetch;
        let mut served = refetch.served.subscribe();
        let target = {
            let mut state = self.lock();
            let Some(min_interval) = state.min_interval else {
                return false;
            };
            if state.requested > *served.borrow() {
                state.requested
            } else if state.last.is_some_and(|t| t.elapsed() < min_interval) {
                return false;
            } else {
                state.requested += 1;
                state.last = Some(Instant::now());
                refetch.wake.notify_one();
                state.requested
            }
        };
        tokio::time::timeout(wait, served.wait_for(|s| *s >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Resolves when a read was asked for by [`JwksHandle::refetch`].
    pub async fn refetch_requested(&self) {
        self.0.refetch.wake.notified().await;
    }

    /// Marks the start of a read of the document; give what it returns to
    /// [`JwksHandle::fetched`] when the read ends.
    pub fn fetching(&self) -> FetchTicket {
        FetchTicket(self.lock().requested)
    }

    /// A read started with `ticket` ended (whether it replaced the keys or failed): the
    /// requests it serves stop waiting.
    pub fn fetched(&self, ticket: FetchTicket) {
        self.0.refetch.served.send_if_modified(|served| {
            let newer = ticket.0 > *served;
            if newer {
                *served = ticket.0;
            }
            newer
        });
    }
}

/// The on-demand requests a read of the document serves (see [`JwksHandle::fetching`]).
#[derive(Debug, Clone, Copy)]
#[must_use = "give it to JwksHandle::fetched when the read ends"]
pub struct FetchTicket(u64);

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(min_interval: Duration) -> JwksHandle {
        let handle = JwksHandle::new(Jwks::empty());
        handle.serve_refetches(min_interval);
        handle
    }

    /// A reader that serves every request after `delay`, counting its reads.
    fn reader(handle: &JwksHandle, delay: Duration) -> Arc<std::sync::atomic::AtomicU32> {
        let reads = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (handle, counted) = (handle.clone(), reads.clone());
        tokio::spawn(async move {
            loop {
                handle.refetch_requested().await;
                let ticket = handle.fetching();
                tokio::time::sleep(delay).await;
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                handle.fetched(ticket);
            }
        });
        reads
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_read_and_later_ones_are_rate_limited() {
        let handle = handle(Duration::from_secs(10));
        let reads = reader(&handle, Duration::from_millis(100));
        let wait = Duration::from_secs(5);
        let (a, b) = tokio::join!(handle.refetch(wait), handle.refetch(wait));
        assert!(a && b, "both waited for the read");
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(!handle.refetch(wait).await, "within the interval: no read");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(handle.refetch(wait).await);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn nobody_serving_reads_answers_at_once() {
        let handle = JwksHandle::new(Jwks::empty());
        assert!(!handle.refetch(Duration::from_secs(5)).await);
        let handle = self::handle(Duration::from_secs(10));
        // A reader that never answers: the wait is bounded.
        assert!(!handle.refetch(Duration::from_secs(5)).await);
    }
}
