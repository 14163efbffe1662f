//! Opt-out as the worker sees it: the user's preferences (SPEC §3, `herald_store`'s
//! preference store) and the configured category policy, checked again right before each
//! send — the router already applied them when it enqueued the job, but a user may have
//! unsubscribed while the job waited — and the one-click unsubscribe written into them
//! (`categories.<category>.email = false`, or `channels.email = false` for mail without a
//! category).

use herald_protocol::{Channel, Policy, Preferences, PreferencesPatch, UserId};
use herald_store::{PreferenceStore, PreferencesError};
use serde_json::json;
use std::sync::Arc;

/// Opt-out checks and one-click unsubscribes.
#[derive(Clone, Debug)]
pub struct OptOut {
    store: PreferenceStore,
    policy: Arc<Policy>,
}

impl OptOut {
    /// Opens the preferences bucket (provisioning creates it).
    ///
    /// # Errors
    /// [`PreferencesError`] when it is missing or NATS fails.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        policy: Arc<Policy>,
    ) -> Result<Self, PreferencesError> {
        Ok(Self {
            store: PreferenceStore::open(js).await?,
            policy,
        })
    }

    /// Whether `user` still wants `channel` for `category`.
    ///
    /// # Errors
    /// [`PreferencesError`] when NATS fails.
    pub async fn allows(
        &self,
        user: &UserId,
        channel: Channel,
        category: Option<&str>,
    ) -> Result<bool, PreferencesError> {
        let prefs = self.store.get(user).await?;
        Ok(self.policy.decide(&prefs, category, channel).is_ok())
    }

    /// The preferences of `users` in one batched read (a worker's fetched batch), for
    /// [`OptOut::decide`].
    ///
    /// # Errors
    /// [`PreferencesError`] when NATS fails.
    pub async fn preferences_of(
        &self,
        users: &[UserId],
    ) -> Result<std::collections::HashMap<UserId, Preferences>, PreferencesError> {
        self.store.get_many(users).await
    }

    /// Whether preferences `prefs` still want `channel` for `category`.
    pub fn decide(&self, prefs: &Preferences, channel: Channel, category: Option<&str>) -> bool {
        self.policy.decide(prefs, category, channel).is_ok()
    }

    /// Whether `category` is critical (security alerts, OTPs): its notifications ignore
    /// opt-outs, so their emails offer no unsubscribe link that could not be honoured.
    pub fn is_critical(&self, category: Option<&str>) -> bool {
        category
            .and_then(|c| self.policy.category(c))
            .is_some_and(|rule| rule.critical)
    }

    /// Opts `user` out of email for `category` (or of email altogether without one).
    ///
    /// # Errors
    /// [`PreferencesError`] when NATS fails or the category is not a configured one.
    pub async fn unsubscribe_email(
        &self,
        user: &UserId,
        category: Option<&str>,
    ) -> Result<(), PreferencesError> {
        let doc = match category {
            Some(c) => json!({"categories": {c: {"email": false}}}),
            None => json!({"channels": {"email": false}}),
        };
        let patch = PreferencesPatch::from_json(doc.to_string().as_bytes(), &self.policy)?;
        self.store.update(user, patch).await?;
        Ok(())
    }
}
