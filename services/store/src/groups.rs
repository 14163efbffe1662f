//! Aggregation groups in the `herald_groups` KV bucket: one [`GroupState`] document per
//! (user, group key), changed only with compare-and-set, so api instances joining and
//! routers closing the same group from different processes never lose an update.
//!
//! The key is `g.<user token>.<hash of the group key>`: valid as a KV key whatever either
//! contains, no user can name another's group, and a GDPR erase finds every group of a
//! user under one prefix. Beside it, `g.<user token>.closed.<hash>` names the member that
//! closed one window (see [`Groups::close`]). The bucket's max age (two days, beyond the
//! longest window) expires groups nobody touches any more.

use async_nats::jetstream::kv;
use herald_protocol::UserId;
use herald_protocol::group::{GroupState, Joined};
use sha2::{Digest as _, Sha256};

/// Most attempts at one change against concurrent writers.
const CAS_ATTEMPTS: usize = 32;

/// The group bucket.
#[derive(Clone)]
pub struct Groups {
    store: kv::Store,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").finish_non_exhaustive()
    }
}

/// What closing a window found ([`Groups::close`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Closed by this carrier, now or before: the group's final state.
    ByThis(GroupState),
    /// Closed before by another member (its id), whose send carries the group.
    ByOther(String),
    /// The window is no longer the stored one (erased, expired, or replaced after going
    /// stale).
    Gone,
}

/// The group bucket could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("aggregation groups unavailable")]
pub struct GroupsError(#[source] Box<dyn std::error::Error + Send + Sync>);

fn err(e: impl std::error::Error + Send + Sync + 'static) -> GroupsError {
    GroupsError(Box::new(e))
}

impl Groups {
    /// Opens the bucket (provisioning creates it).
    ///
    /// # Errors
    /// [`GroupsError`] when it is missing or NATS is unreachable.
    pub async fn open(js: &async_nats::jetstream::Context) -> Result<Self, GroupsError> {
        let store = js
            .get_key_value(herald_protocol::streams::GROUPS_BUCKET)
            .await
            .map_err(err)?;
        Ok(Self { store })
    }

    /// Adds notification `id` to `user`'s group `key` at `now` (unix seconds), opening a
    /// `window_s` window when none is open; `text` sets the folded title and body of the
    /// new state (it may run more than once under contention).
    ///
    /// # Errors
    /// [`GroupsError`] when NATS fails or writers keep colliding.
    // The member (id, actor), its group (user, key) and the clock (now, window) are
    // each a pair; a struct for them would only be unpacked again here.
    #[allow(clippy::too_many_arguments)]
    pub async fn join<E>(
        &self,
        user: &UserId,
        key: &str,
        id: &str,
        actor: Option<&str>,
        now: i64,
        window_s: u64,
        mut text: impl FnMut(&mut GroupState) -> Result<(), E>,
    ) -> Result<Result<Joined, E>, GroupsError> {
        let kv_key = kv_key(user, key);
        for _ in 0..CAS_ATTEMPTS {
            let (current, revision) = self.read(&kv_key).await?;
            let mut joined = GroupState::join(current, key, id, actor, now, window_s);
            let state = match &mut joined {
                Joined::Repeat(_) => return Ok(Ok(joined)),
                Joined::Opened(s) | Joined::Folded(s) => s,
            };
            if let Err(e) = text(state) {
                return Ok(Err(e));
            }
            if self.write(&kv_key, state, revision).await? {
                return Ok(Ok(joined));
            }
        }
        Err(GroupsError(
            "too many concurrent updates of one group".into(),
        ))
    }

    /// Closes the window whose first notification is `first_id` on behalf of `carrier`,
    /// the member whose channel work goes out with the group's text, so the next member
    /// opens a new window. Who carries a window is settled once: the first carrier to
    /// close it is written down beside the group (`closed` under the user's prefix), and
    /// any other that comes to close it later — a member whose router ran behind the
    /// window and scheduled a close of its own after the first had fired — learns it
    /// was folded into that one ([`Closed::ByOther`]) instead of sending the group again.
    /// Closing again as the same carrier (a replay) returns the same state.
    ///
    /// # Errors
    /// [`GroupsError`] when NATS fails or writers keep colliding.
    pub async fn close(
        &self,
        user: &UserId,
        key: &str,
        first_id: &str,
        carrier: &str,
    ) -> Result<Closed, GroupsError> {
        let closer = closer_key(user, key, first_id);
        match self.store.create(&closer, carrier.to_owned().into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = self.store.entry(&closer).await.map_err(err)?;
                if let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put)
                    && e.value.as_ref() != carrier.as_bytes()
                {
                    return Ok(Closed::ByOther(
                        String::from_utf8_lossy(&e.value).into_owned(),
                    ));
                }
            }
            Err(e) => return Err(err(e)),
        }
        let kv_key = kv_key(user, key);
        for _ in 0..CAS_ATTEMPTS {
            let (current, revision) = self.read(&kv_key).await?;
            let Some(mut state) = current.filter(|s| s.first_id == first_id) else {
                return Ok(Closed::Gone);
            };
            if state.closed {
                return Ok(Closed::ByThis(state));
            }
            state.closed = true;
            if self.write(&kv_key, &state, revision).await? {
                return Ok(Closed::ByThis(state));
            }
        }
        Err(GroupsError(
            "too many concurrent updates of one group".into(),
        ))
    }

    /// Records that the close of the window opened by `first_id` was deferred to `until`
    /// (unix seconds; quiet hours at the window's end), so members keep folding into it
    /// until that close fires ([`GroupState::hold`]) rather than opening a new window
    /// once it is an hour past its end. Nothing to do when that window is no longer the
    /// stored one, or is closed.
    ///
    /// # Errors
    /// [`GroupsError`] when NATS fails or writers keep colliding.
    pub async fn hold(
        &self,
        user: &UserId,
        key: &str,
        first_id: &str,
        until: i64,
    ) -> Result<(), GroupsError> {
        let kv_key = kv_key(user, key);
        for _ in 0..CAS_ATTEMPTS {
            let (current, revision) = self.read(&kv_key).await?;
            let Some(mut state) = current.filter(|s| s.first_id == first_id && !s.closed) else {
                return Ok(());
            };
            if state.held_until.is_some_and(|held| held >= until) {
                return Ok(());
            }
            state.hold(until);
            if self.write(&kv_key, &state, revision).await? {
                return Ok(());
            }
        }
        Err(GroupsError(
            "too many concurrent updates of one group".into(),
        ))
    }

    /// Removes every group of `user` (GDPR erase), and the record of who closed their
    /// windows. Returns how many groups were removed.
    ///
    /// # Errors
    /// [`GroupsError`] when NATS fails.
    pub async fn erase(&self, user: &UserId) -> Result<u64, GroupsError> {
        let prefix = format!(
            "$KV.{}.g.{}",
            herald_protocol::streams::GROUPS_BUCKET,
            user.token()
        );
        let purge = |filter: String| async move {
            self.store
                .stream
                .purge()
                .filter(filter)
                .await
                .map(|p| p.purged)
                .map_err(err)
        };
        let groups = purge(format!("{prefix}.*")).await?;
        purge(format!("{prefix}.closed.*")).await?;
        Ok(groups)
    }

    async fn read(&self, kv_key: &str) -> Result<(Option<GroupState>, u64), GroupsError> {
        let entry = self.store.entry(kv_key).await.map_err(err)?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                (serde_json::from_slice(&e.value).ok(), e.revision)
            }
            Some(e) => (None, e.revision),
            None => (None, 0),
        })
    }

    /// Compare-and-set; false when another writer came first.
    async fn write(
        &self,
        kv_key: &str,
        state: &GroupState,
        revision: u64,
    ) -> Result<bool, GroupsError> {
        let value: bytes::Bytes = serde_json::to_vec(state).map_err(err)?.into();
        if revision == 0 {
            match self.store.create(kv_key, value).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(err(e)),
            }
        } else {
            match self.store.update(kv_key, value, revision).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(err(e)),
            }
        }
    }
}

/// `g.<user token>.closed.<hash>`: who closed the window of `key` opened by `first_id`
/// (under the user's prefix, so a GDPR erase removes it with their groups).
fn closer_key(user: &UserId, key: &str, first_id: &str) -> String {
    let hash = Sha256::new()
        .chain_update(key.as_bytes())
        .chain_update([0])
        .chain_update(first_id.as_bytes())
        .finalize();
    format!("g.{}.closed.{}", user.token(), hex::encode(&hash[..16]))
}

/// `g.<user token>.<hash>`: valid as a KV key whatever the ids contain, and every group
/// of a user under one prefix.
fn kv_key(user: &UserId, key: &str) -> String {
    let hash = Sha256::new().chain_update(key.as_bytes()).finalize();
    format!("g.{}.{}", user.token(), hex::encode(&hash[..16]))
}
