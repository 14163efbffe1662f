//! Delivery targets: push device tokens (registered by users) and contact data (email,
//! phone, locale, time zone; written by producers), in the `herald_targets` KV bucket.
//!
//! Contact data is personal data, so it is stored encrypted at rest with AES-256-GCM
//! under a key from configuration; the user token is the associated data, so a ciphertext
//! copied onto another user's key does not decrypt. Each record names the key it was
//! sealed with (`kid`, a hash of the key), so keys can be rotated: configure the new key
//! as `contact_key` and the old one in `contact_old_keys`; records are re-sealed with the
//! new key whenever they are written.
//!
//! Work queues carry only a target's opaque id ([`target_id`]), never the address.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use herald_channels::{Platform, Target};
use herald_protocol::{Channel, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Most devices one user may register; the oldest is dropped beyond this.
pub const MAX_DEVICES: usize = 20;

/// The opaque id of a target: 32 hex characters of SHA-256 over its key.
pub fn target_id(target: &Target) -> String {
    let digest = Sha256::digest(target.key().as_bytes());
    hex::encode(&digest[..16])
}

/// A registered push device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Platform.
    pub platform: Platform,
    /// Token as the platform issued it.
    pub token: String,
    /// When it was registered (RFC 3339).
    pub added_at: String,
}

/// A user's contact data, as the producer gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// Email address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Phone number, E.164.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// BCP 47 locale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// IANA time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// HTTPS endpoint for the webhook channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Devices {
    devices: Vec<Device>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Sealed {
    kid: String,
    nonce: String,
    ct: String,
}

/// The target store could not answer, or a record could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    /// NATS failed.
    #[error("target store unavailable: {0}")]
    Nats(String),
    /// A contact record was sealed with a key this process does not have.
    #[error("contact record sealed with unknown key {0}; configure it in contact_old_keys")]
    UnknownKey(String),
    /// A contact record does not decrypt or decode.
    #[error("contact record is corrupt")]
    Corrupt,
}

fn nats(e: impl std::fmt::Display) -> TargetsError {
    TargetsError::Nats(e.to_string())
}

/// AES-256-GCM keys: the first seals, all open.
#[derive(Clone)]
pub struct ContactKeys {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for ContactKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ContactKeys").field("kids", &kids).finish()
    }
}

impl ContactKeys {
    /// `current` seals new records; `old` only open existing ones.
    pub fn new(current: [u8; 32], old: &[[u8; 32]]) -> Self {
        let keys = std::iter::once(&current)
            .chain(old)
            .map(|k| {
                let kid = hex::encode(&Sha256::digest(k)[..4]);
                (kid, Aes256Gcm::new(k.into()))
            })
            .collect();
        Self { keys }
    }

    /// Parses a key given as 64 hex characters or 43 base64url characters.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse_key(raw: &str) -> Result<[u8; 32], String> {
        let raw = raw.trim();
        let bytes = hex::decode(raw)
            .ok()
            .or_else(|| B64.decode(raw.trim_end_matches('=')).ok())
            .ok_or("not hex or base64url")?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| format!("{} bytes; AES-256 needs 32", bytes.len()))
    }

    fn seal(&self, aad: &str, plain: &[u8]) -> Result<Vec<u8>, TargetsError> {
        let (kid, cipher) = self.keys.first().ok_or(TargetsError::Corrupt)?;
        let nonce_bytes: [u8; 12] = rand::random();
        let ct = cipher
            .encrypt(
                &Nonce::from(nonce_bytes),
                Payload {
                    msg: plain,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| TargetsError::Corrupt)?;
        serde_json::to_vec(&Sealed {
            kid: kid.clone(),
            nonce: B64.encode(nonce_bytes),
            ct: B64.encode(ct),
        })
        .map_err(|_| TargetsError::Corrupt)
    }

    fn open(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>, TargetsError> {
        let sealed: Sealed = serde_json::from_slice(sealed).map_err(|_| TargetsError::Corrupt)?;
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(kid, _)| *kid == sealed.kid)
            .ok_or_else(|| TargetsError::UnknownKey(sealed.kid.clone()))?;
        let nonce = B64
            .decode(&sealed.nonce)
            .map_err(|_| TargetsError::Corrupt)?;
        let ct = B64.decode(&sealed.ct).map_err(|_| TargetsError::Corrupt)?;
        let nonce = <[u8; 12]>::try_from(nonce.as_slice()).map_err(|_| TargetsError::Corrupt)?;
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| TargetsError::Corrupt)
    }
}

/// Devices and contacts of every user.
#[derive(Clone)]
pub struct Targets {
    kv: kv::Store,
    keys: ContactKeys,
    /// For batched direct gets ([`Targets::targets_of_many`]).
    client: async_nats::Client,
}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Targets").field("keys", &self.keys).finish()
    }
}

fn device_key(user: &UserId) -> String {
    format!("d.{}", user.token().as_str())
}

fn contact_key(user: &UserId) -> String {
    format!("c.{}", user.token().as_str())
}

/// The key of a user's targets on `channel` (`None` for the inbox, which has none).
fn key_of(channel: Channel) -> Option<fn(&UserId) -> String> {
    match channel {
        Channel::Inbox => None,
        Channel::Push => Some(device_key),
        Channel::Email | Channel::Sms | Channel::Webhook => Some(contact_key),
    }
}

fn now() -> String {
    herald_protocol::notification::format_time(time::OffsetDateTime::now_utc())
}

impl Targets {
    /// Opens the bucket (provisioning creates it).
    ///
    /// # Errors
    /// [`TargetsError`] when it is missing or NATS is unreachable.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        keys: ContactKeys,
    ) -> Result<Self, TargetsError> {
        let kv = js
            .get_key_value(herald_protocol::streams::TARGETS_BUCKET)
            .await
            .map_err(nats)?;
        Ok(Self {
            kv,
            keys,
            client: js.client(),
        })
    }

    async fn devices_entry(&self, user: &UserId) -> Result<(Devices, u64), TargetsError> {
        match self.kv.entry(device_key(user)).await.map_err(nats)? {
            Some(e) if e.operation == kv::Operation::Put => Ok((
                serde_json::from_slice(&e.value).unwrap_or_default(),
                e.revision,
            )),
            Some(e) => Ok((Devices::default(), e.revision)),
            None => Ok((Devices::default(), 0)),
        }
    }

    /// Changes a user's device list with compare-and-set, retrying on a concurrent write.
    async fn update_devices(
        &self,
        user: &UserId,
        change: impl Fn(&mut Vec<Device>) -> bool,
    ) -> Result<bool, TargetsError> {
        loop {
            let (mut doc, revision) = self.devices_entry(user).await?;
            if !change(&mut doc.devices) {
                return Ok(false);
            }
            let value = Bytes::from(serde_json::to_vec(&doc).map_err(|_| TargetsError::Corrupt)?);
            if revision == 0 {
                match self.kv.create(device_key(user), value).await {
                    Ok(_) => return Ok(true),
                    // Another device registered at the same moment: read again.
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(nats(e)),
                }
            }
            match self.kv.update(device_key(user), value, revision).await {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(nats(e)),
            }
        }
    }

    /// Registers a device (again); returns whether it was new.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails.
    pub async fn add_device(
        &self,
        user: &UserId,
        platform: Platform,
        token: &str,
    ) -> Result<bool, TargetsError> {
        self.update_devices(user, |devices| {
            if devices
                .iter()
                .any(|d| d.platform == platform && d.token == token)
            {
                return false;
            }
            devices.push(Device {
                platform,
                token: token.to_string(),
                added_at: now(),
            });
            if devices.len() > MAX_DEVICES {
                devices.remove(0);
            }
            true
        })
        .await
    }

    /// Removes a device token (any platform); returns whether it was there.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails.
    pub async fn remove_device(&self, user: &UserId, token: &str) -> Result<bool, TargetsError> {
        self.update_devices(user, |devices| {
            let before = devices.len();
            devices.retain(|d| d.token != token);
            devices.len() != before
        })
        .await
    }

    /// The user's devices.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails.
    pub async fn devices(&self, user: &UserId) -> Result<Vec<Device>, TargetsError> {
        Ok(self.devices_entry(user).await?.0.devices)
    }

    /// Stores the user's contact data, encrypted.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails.
    pub async fn put_contact(&self, user: &UserId, contact: &Contact) -> Result<(), TargetsError> {
        let plain = serde_json::to_vec(contact).map_err(|_| TargetsError::Corrupt)?;
        let sealed = self.keys.seal(user.token().as_str(), &plain)?;
        self.kv
            .put(contact_key(user), sealed.into())
            .await
            .map_err(nats)?;
        Ok(())
    }

    /// The user's contact data, decrypted (empty when none).
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails or the record cannot be opened.
    pub async fn contact(&self, user: &UserId) -> Result<Contact, TargetsError> {
        Ok(self.contact_entry(user).await?.0)
    }

    fn open_contact(&self, user: &UserId, sealed: &[u8]) -> Result<Contact, TargetsError> {
        let plain = self.keys.open(user.token().as_str(), sealed)?;
        serde_json::from_slice(&plain).map_err(|_| TargetsError::Corrupt)
    }

    async fn contact_entry(&self, user: &UserId) -> Result<(Contact, u64), TargetsError> {
        match self.kv.entry(contact_key(user)).await.map_err(nats)? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok((self.open_contact(user, &e.value)?, e.revision))
            }
            Some(e) => Ok((Contact::default(), e.revision)),
            None => Ok((Contact::default(), 0)),
        }
    }

    /// Everything the user can be reached at on `channel`.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails or the contact record cannot be opened.
    pub async fn targets(
        &self,
        user: &UserId,
        channel: Channel,
    ) -> Result<Vec<Target>, TargetsError> {
        Ok(match channel {
            Channel::Push => device_targets(self.devices_entry(user).await?.0),
            Channel::Email | Channel::Sms | Channel::Webhook => {
                contact_targets(self.contact(user).await?, channel)
            }
            Channel::Inbox => Vec::new(),
        })
    }

    /// The targets of each of `users` on `channel`, as [`Targets::targets`] gives them,
    /// in batched direct gets of the bucket (one round trip per 256 users instead of
    /// one per user): a worker's pulled batch names many users, most of them once.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails. A contact record that cannot be opened fails
    /// only its own user's entry, as it would have failed that user's own read.
    pub async fn targets_of_many(
        &self,
        users: &[UserId],
        channel: Channel,
    ) -> Result<HashMap<UserId, Result<Vec<Target>, TargetsError>>, TargetsError> {
        let Some(key_of) = key_of(channel) else {
            return Ok(users.iter().map(|u| (u.clone(), Ok(Vec::new()))).collect());
        };
        let keys: Vec<String> = users.iter().map(key_of).collect();
        let mut values: HashMap<String, Bytes> = crate::direct::kv_live_many(
            &self.client,
            herald_protocol::streams::TARGETS_BUCKET,
            &keys,
        )
        .await
        .map_err(nats)?
        .into_iter()
        .collect();
        Ok(users
            .iter()
            .zip(&keys)
            .map(|(user, key)| {
                let targets = match values.remove(key) {
                    None => Ok(Vec::new()),
                    Some(value) => self.decode_targets(user, channel, &value),
                };
                (user.clone(), targets)
            })
            .collect())
    }

    /// The target of `channel` whose [`target_id`] is `id`, if the user still has it.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails or the contact record cannot be opened.
    pub async fn find(
        &self,
        user: &UserId,
        channel: Channel,
        id: &str,
    ) -> Result<Option<Target>, TargetsError> {
        Ok(self
            .targets(user, channel)
            .await?
            .into_iter()
            .find(|t| target_id(t) == id))
    }

    /// [`Targets::find`] answered by the bucket's stream leader (`STREAM.MSG.GET`), not by
    /// any replica. For a target a batched read ([`Targets::targets_of_many`]) did not
    /// find: on a cluster, the replica that answered may not yet have applied the
    /// registration the job was made from. One round trip, on that rare path only.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails or the contact record cannot be opened.
    pub async fn find_at_leader(
        &self,
        user: &UserId,
        channel: Channel,
        id: &str,
    ) -> Result<Option<Target>, TargetsError> {
        let Some(key_of) = key_of(channel) else {
            return Ok(None);
        };
        let subject = format!("{}{}", self.kv.prefix, key_of(user));
        let value = match self
            .kv
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => crate::direct::kv_live(&m.headers).then_some(m.payload),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => None,
            Err(e) => return Err(nats(e)),
        };
        let targets = match value {
            None => Vec::new(),
            Some(value) => self.decode_targets(user, channel, &value)?,
        };
        Ok(targets.into_iter().find(|t| target_id(t) == id))
    }

    /// The targets of `channel` in a stored value of `user`'s key for it (a device list
    /// for push, the encrypted contact record otherwise).
    fn decode_targets(
        &self,
        user: &UserId,
        channel: Channel,
        value: &[u8],
    ) -> Result<Vec<Target>, TargetsError> {
        if channel == Channel::Push {
            let devices = serde_json::from_slice::<Devices>(value).unwrap_or_default();
            return Ok(device_targets(devices));
        }
        Ok(contact_targets(self.open_contact(user, value)?, channel))
    }

    /// Forgets a target a provider called invalid; returns whether it was there.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails or the contact record cannot be opened.
    pub async fn remove(&self, user: &UserId, target: &Target) -> Result<bool, TargetsError> {
        match target {
            Target::Device { token, .. } => self.remove_device(user, token).await,
            other => loop {
                let (mut contact, revision) = self.contact_entry(user).await?;
                let field = match other {
                    Target::Email { .. } => &mut contact.email,
                    Target::Phone { .. } => &mut contact.phone,
                    Target::Webhook { .. } => &mut contact.webhook,
                    Target::Device { .. } => return Ok(false),
                };
                let matches = field.as_ref().is_some_and(|v| {
                    target_id(other)
                        == target_id(&match other {
                            Target::Email { .. } => Target::Email { address: v.clone() },
                            Target::Phone { .. } => Target::Phone { e164: v.clone() },
                            _ => Target::Webhook { url: v.clone() },
                        })
                });
                if !matches {
                    return Ok(false);
                }
                *field = None;
                let plain = serde_json::to_vec(&contact).map_err(|_| TargetsError::Corrupt)?;
                let sealed = self.keys.seal(user.token().as_str(), &plain)?;
                match self
                    .kv
                    .update(contact_key(user), sealed.into(), revision)
                    .await
                {
                    Ok(_) => return Ok(true),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(nats(e)),
                }
            },
        }
    }

    /// Erases everything stored about the user's targets.
    ///
    /// # Errors
    /// [`TargetsError`] when NATS fails.
    pub async fn erase(&self, user: &UserId) -> Result<(), TargetsError> {
        self.kv.purge(device_key(user)).await.map_err(nats)?;
        self.kv.purge(contact_key(user)).await.map_err(nats)?;
        Ok(())
    }
}

/// The push targets of a user's device list.
fn device_targets(devices: Devices) -> Vec<Target> {
    devices
        .devices
        .into_iter()
        .map(|d| Target::Device {
            platform: d.platform,
            token: d.token,
        })
        .collect()
}

/// The targets of `contact` on a contact channel (email, SMS, webhook).
fn contact_targets(contact: Contact, channel: Channel) -> Vec<Target> {
    match channel {
        Channel::Email => contact.email.map(|address| Target::Email { address }),
        Channel::Sms => contact.phone.map(|e164| Target::Phone { e164 }),
        Channel::Webhook => contact.webhook.map(|url| Target::Webhook { url }),
        Channel::Push | Channel::Inbox => None,
    }
    .into_iter()
    .collect()
}

/// Whether a user may be reachable beyond the inbox: what [`reachable`] answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    /// They have at least one push device.
    pub push: bool,
    /// They have a contact record (email, phone or webhook; which ones is sealed).
    pub contact: bool,
}

impl Reach {
    /// Whether `channel` may reach them (contact channels: maybe; the router reads the
    /// record and decides).
    pub fn may_reach(self, channel: Channel) -> bool {
        match channel {
            Channel::Push => self.push,
            Channel::Email | Channel::Sms | Channel::Webhook => self.contact,
            Channel::Inbox => true,
        }
    }
}

/// Which of `users` have a device or a contact record, in batched direct gets of the
/// bucket's literal subjects (one round trip per 128 users), without opening any sealed
/// record. A fan-out to a million subscribers uses it to hand the router only those who
/// can be reached at all, instead of one hand-over per subscriber.
///
/// # Errors
/// [`TargetsError`] when NATS cannot answer.
pub async fn reachable(
    client: &async_nats::Client,
    users: &[UserId],
) -> Result<std::collections::HashMap<UserId, Reach>, TargetsError> {
    let keys: Vec<String> = users
        .iter()
        .flat_map(|u| [device_key(u), contact_key(u)])
        .collect();
    let values =
        crate::direct::kv_live_many(client, herald_protocol::streams::TARGETS_BUCKET, &keys)
            .await
            .map_err(nats)?;
    let mut found: std::collections::HashMap<UserId, Reach> = std::collections::HashMap::new();
    for (key, value) in values {
        let Some((kind, token)) = key.split_once('.') else {
            continue;
        };
        let Ok(user) = herald_protocol::UserToken::decode(token) else {
            continue;
        };
        let reach = found.entry(user).or_default();
        match kind {
            "d" => {
                reach.push =
                    serde_json::from_slice::<Devices>(&value).is_ok_and(|d| !d.devices.is_empty());
            }
            "c" => reach.contact = true,
            _ => {}
        }
    }
    Ok(users
        .iter()
        .map(|u| (u.clone(), found.remove(u).unwrap_or_default()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_contacts_open_only_for_their_user_and_with_a_known_key() {
        let old = [7u8; 32];
        let new = [9u8; 32];
        let sealed_old = ContactKeys::new(old, &[])
            .seal("dXNlcg", b"secret")
            .expect("seal");
        let rotated = ContactKeys::new(new, &[old]);
        assert_eq!(
            rotated.open("dXNlcg", &sealed_old).expect("open"),
            b"secret"
        );
        assert!(matches!(
            rotated.open("b3RoZXI", &sealed_old),
            Err(TargetsError::Corrupt)
        ));
        assert!(matches!(
            ContactKeys::new(new, &[]).open("dXNlcg", &sealed_old),
            Err(TargetsError::UnknownKey(_))
        ));
        let text = String::from_utf8_lossy(&sealed_old);
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn keys_parse_from_hex_or_base64() {
        let hex_key = "00".repeat(32);
        assert_eq!(ContactKeys::parse_key(&hex_key), Ok([0u8; 32]));
        assert_eq!(
            ContactKeys::parse_key(&B64.encode([1u8; 32])),
            Ok([1u8; 32])
        );
        assert!(ContactKeys::parse_key("short").is_err());
    }

    #[test]
    fn target_ids_are_stable_and_hide_the_address() {
        let t = Target::Email {
            address: "Ann@Example.com".into(),
        };
        let id = target_id(&t);
        assert_eq!(id.len(), 32);
        assert_eq!(
            id,
            target_id(&Target::Email {
                address: "ann@example.com".into()
            })
        );
        assert!(!id.contains("ann"));
    }
}
