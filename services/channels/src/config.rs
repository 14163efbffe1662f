//! Provider configuration, as read by figment from `HERALD_*` environment variables or the
//! TOML file (field `apns_key_id` ⇔ env `HERALD_APNS_KEY_ID`), and [`build`], which turns
//! it into providers in failover order.
//!
//! A provider is enabled by setting any of its variables; once enabled, everything it
//! needs must be there. Every problem is reported at once, each naming the variable to set.

use crate::Provider;
use crate::apns::{self, ApnsConfig, ApnsProvider};
use crate::fcm::{self, FcmConfig, FcmProvider, oauth::ServiceAccount};
use crate::http::{HttpOptions, SetupError};
use crate::twilio::{self, TwilioConfig, TwilioProvider};
use crate::vonage::{self, VonageConfig, VonageProvider};
use crate::webhook::{WebhookConfig, WebhookProvider};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod lenient;

/// Every provider setting. All optional: an unset group is a disabled provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProvidersConfig {
    /// APNs base URL (`HERALD_APNS_URL`); default Apple's production endpoint.
    #[serde(deserialize_with = "lenient::string")]
    pub apns_url: Option<String>,
    /// Path of the `.p8` token-signing key (`HERALD_APNS_KEY_FILE`).
    pub apns_key_file: Option<PathBuf>,
    /// The key's id (`HERALD_APNS_KEY_ID`).
    #[serde(deserialize_with = "lenient::string")]
    pub apns_key_id: Option<String>,
    /// Apple developer team id (`HERALD_APNS_TEAM_ID`).
    #[serde(deserialize_with = "lenient::string")]
    pub apns_team_id: Option<String>,
    /// App bundle id (`HERALD_APNS_TOPIC`).
    #[serde(deserialize_with = "lenient::string")]
    pub apns_topic: Option<String>,
    /// FCM base URL (`HERALD_FCM_URL`); default Google's endpoint.
    #[serde(deserialize_with = "lenient::string")]
    pub fcm_url: Option<String>,
    /// Path of the service-account JSON key (`HERALD_FCM_CREDENTIALS`).
    pub fcm_credentials: Option<PathBuf>,
    /// Twilio base URL (`HERALD_TWILIO_URL`); default Twilio's endpoint.
    #[serde(deserialize_with = "lenient::string")]
    pub twilio_url: Option<String>,
    /// Account SID (`HERALD_TWILIO_ACCOUNT_SID`).
    #[serde(deserialize_with = "lenient::string")]
    pub twilio_account_sid: Option<String>,
    /// Auth token (`HERALD_TWILIO_AUTH_TOKEN`).
    #[serde(deserialize_with = "lenient::string")]
    pub twilio_auth_token: Option<String>,
    /// Sender number (`HERALD_TWILIO_FROM`).
    #[serde(deserialize_with = "lenient::sender")]
    pub twilio_from: Option<String>,
    /// Vonage base URL (`HERALD_VONAGE_URL`); default Vonage's endpoint.
    #[serde(deserialize_with = "lenient::string")]
    pub vonage_url: Option<String>,
    /// API key (`HERALD_VONAGE_API_KEY`).
    #[serde(deserialize_with = "lenient::string")]
    pub vonage_api_key: Option<String>,
    /// API secret (`HERALD_VONAGE_API_SECRET`).
    #[serde(deserialize_with = "lenient::string")]
    pub vonage_api_secret: Option<String>,
    /// Sender id or number (`HERALD_VONAGE_FROM`).
    #[serde(deserialize_with = "lenient::string")]
    pub vonage_from: Option<String>,
    /// Webhook signing secret, at least 16 bytes (`HERALD_WEBHOOK_SECRET`); enables webhooks.
    #[serde(deserialize_with = "lenient::string")]
    pub webhook_secret: Option<String>,
    /// Extra PEM root certificates every provider client trusts (`HERALD_PROVIDER_CA_FILE`),
    /// e.g. a test CA or a TLS-inspecting proxy.
    pub provider_ca_file: Option<PathBuf>,
    /// Per-request timeout in milliseconds (`HERALD_PROVIDER_TIMEOUT_MS`); default 10000.
    #[serde(deserialize_with = "lenient::number")]
    pub provider_timeout_ms: Option<u64>,
}

/// The figment keys (env `HERALD_` + upper case) of [`ProvidersConfig`], for `Env::only`.
///
/// figment's `Env` provider parses values (`+15005550006` becomes a number, `0123` loses its
/// zero). The fields accept numbers back as text, but to keep secrets exact merge these
/// variables as raw strings:
///
/// ```
/// use figment::{Figment, providers::{Env, Serialized}};
/// let mut figment = Figment::new();
/// for (key, value) in Env::prefixed("HERALD_").only(&herald_channels::ENV_KEYS).iter() {
///     figment = figment.merge(Serialized::default(key.as_str(), value));
/// }
/// let config: herald_channels::ProvidersConfig = figment.extract().expect("valid");
/// ```
pub const ENV_KEYS: [&str; 18] = [
    "apns_url",
    "apns_key_file",
    "apns_key_id",
    "apns_team_id",
    "apns_topic",
    "fcm_url",
    "fcm_credentials",
    "twilio_url",
    "twilio_account_sid",
    "twilio_auth_token",
    "twilio_from",
    "vonage_url",
    "vonage_api_key",
    "vonage_api_secret",
    "vonage_from",
    "webhook_secret",
    "provider_ca_file",
    "provider_timeout_ms",
];

/// Provider configuration that cannot be used: every problem, each naming what to set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid provider configuration:\n  - {}", .0.join("\n  - "))]
pub struct ProvidersConfigError(pub Vec<String>);

/// Builds every configured provider, in failover order: APNs, FCM (push; they take
/// different platforms), Twilio then Vonage (SMS: primary, secondary), webhook. An empty
/// list is not an error: no provider is configured.
///
/// # Errors
/// [`ProvidersConfigError`] listing every missing or unusable setting.
pub fn build(config: &ProvidersConfig) -> Result<Vec<Arc<dyn Provider>>, ProvidersConfigError> {
    let mut errors = Vec::new();
    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    let http = HttpOptions {
        timeout: Duration::from_millis(config.provider_timeout_ms.unwrap_or(10_000)),
        extra_root_pem: config
            .provider_ca_file
            .as_deref()
            .and_then(|p| read_ca(p, &mut errors)),
    };
    if config.provider_timeout_ms == Some(0) {
        errors.push("HERALD_PROVIDER_TIMEOUT_MS must be above 0".into());
    }
    let mut add =
        |result: Result<Arc<dyn Provider>, SetupError>, errors: &mut Vec<String>| match result {
            Ok(p) => providers.push(p),
            Err(e) => errors.push(describe(&e)),
        };

    if let Some(apns) = apns_config(config, &http, &mut errors) {
        add(
            ApnsProvider::new(&apns).map(|p| Arc::new(p) as _),
            &mut errors,
        );
    }
    if let Some(fcm) = fcm_config(config, &http, &mut errors) {
        add(
            FcmProvider::new(&fcm).map(|p| Arc::new(p) as _),
            &mut errors,
        );
    }
    let twilio = [
        (
            "HERALD_TWILIO_ACCOUNT_SID",
            &config.twilio_account_sid,
            "the account SID, AC…",
        ),
        (
            "HERALD_TWILIO_AUTH_TOKEN",
            &config.twilio_auth_token,
            "the account's auth token",
        ),
        (
            "HERALD_TWILIO_FROM",
            &config.twilio_from,
            "the sending number in E.164 form",
        ),
    ];
    if let Some([sid, token, from]) =
        group("Twilio", config.twilio_url.is_some(), twilio, &mut errors)
    {
        let twilio = TwilioConfig {
            base_url: config
                .twilio_url
                .clone()
                .unwrap_or_else(|| twilio::PRODUCTION_URL.into()),
            account_sid: sid,
            auth_token: token,
            from,
            http: http.clone(),
        };
        add(
            TwilioProvider::new(&twilio).map(|p| Arc::new(p) as _),
            &mut errors,
        );
    }
    let vonage = [
        (
            "HERALD_VONAGE_API_KEY",
            &config.vonage_api_key,
            "the API key",
        ),
        (
            "HERALD_VONAGE_API_SECRET",
            &config.vonage_api_secret,
            "the API secret",
        ),
        (
            "HERALD_VONAGE_FROM",
            &config.vonage_from,
            "the sender id or number",
        ),
    ];
    if let Some([key, secret, from]) =
        group("Vonage", config.vonage_url.is_some(), vonage, &mut errors)
    {
        let vonage = VonageConfig {
            base_url: config
                .vonage_url
                .clone()
                .unwrap_or_else(|| vonage::PRODUCTION_URL.into()),
            api_key: key,
            api_secret: secret,
            from,
            http: http.clone(),
        };
        add(
            VonageProvider::new(&vonage).map(|p| Arc::new(p) as _),
            &mut errors,
        );
    }
    if let Some(secret) = &config.webhook_secret {
        let webhook = WebhookConfig {
            secret: secret.clone(),
            http: http.clone(),
        };
        add(
            WebhookProvider::new(&webhook)
                .map(|p| Arc::new(p) as _)
                .map_err(|e| match e {
                    SetupError::Invalid { reason, .. } => SetupError::Invalid {
                        what: "HERALD_WEBHOOK_SECRET",
                        reason,
                    },
                    other => other,
                }),
            &mut errors,
        );
    }
    if errors.is_empty() {
        Ok(providers)
    } else {
        Err(ProvidersConfigError(errors))
    }
}

fn apns_config(
    config: &ProvidersConfig,
    http: &HttpOptions,
    errors: &mut Vec<String>,
) -> Option<ApnsConfig> {
    let key_file = config
        .apns_key_file
        .as_ref()
        .map(|p| p.display().to_string());
    let fields = [
        (
            "HERALD_APNS_KEY_FILE",
            &key_file,
            "the path of the .p8 signing key",
        ),
        (
            "HERALD_APNS_KEY_ID",
            &config.apns_key_id,
            "the 10-character id of that key",
        ),
        (
            "HERALD_APNS_TEAM_ID",
            &config.apns_team_id,
            "your Apple developer team id",
        ),
        (
            "HERALD_APNS_TOPIC",
            &config.apns_topic,
            "the app's bundle id",
        ),
    ];
    let [key_file, key_id, team_id, topic] =
        group("APNs", config.apns_url.is_some(), fields, errors)?;
    let key_pem = read(Path::new(&key_file), "HERALD_APNS_KEY_FILE", errors)?;
    Some(ApnsConfig {
        base_url: config
            .apns_url
            .clone()
            .unwrap_or_else(|| apns::PRODUCTION_URL.into()),
        key_pem,
        key_id,
        team_id,
        topic,
        http: http.clone(),
    })
}

fn fcm_config(
    config: &ProvidersConfig,
    http: &HttpOptions,
    errors: &mut Vec<String>,
) -> Option<FcmConfig> {
    let credentials = config
        .fcm_credentials
        .as_ref()
        .map(|p| p.display().to_string());
    let fields = [(
        "HERALD_FCM_CREDENTIALS",
        &credentials,
        "the path of the Firebase service-account JSON key",
    )];
    let [path] = group("FCM", config.fcm_url.is_some(), fields, errors)?;
    let json = read(Path::new(&path), "HERALD_FCM_CREDENTIALS", errors)?;
    let service_account = serde_json::from_slice::<ServiceAccount>(&json)
        .map_err(|e| {
            errors.push(format!(
                "HERALD_FCM_CREDENTIALS {path}: not a service-account key (needs project_id, client_email, private_key, token_uri): {e}"
            ))
        })
        .ok()?;
    Some(FcmConfig {
        base_url: config
            .fcm_url
            .clone()
            .unwrap_or_else(|| fcm::PRODUCTION_URL.into()),
        service_account,
        http: http.clone(),
    })
}

/// A provider's required settings: `None` when none is set (and no URL: disabled), the
/// values when all are, and one error per missing one otherwise.
fn group<const N: usize>(
    provider: &str,
    url_set: bool,
    fields: [(&str, &Option<String>, &str); N],
    errors: &mut Vec<String>,
) -> Option<[String; N]> {
    let present = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.trim().is_empty());
    if !url_set && !fields.iter().any(|(_, v, _)| present(v)) {
        return None;
    }
    let missing: Vec<String> = fields
        .iter()
        .filter(|(_, v, _)| !present(v))
        .map(|(env, _, what)| format!("{provider} is partly configured: set {env} ({what})"))
        .collect();
    if !missing.is_empty() {
        errors.extend(missing);
        return None;
    }
    Some(fields.map(|(_, v, _)| v.clone().unwrap_or_default().trim().to_owned()))
}

/// The extra trust roots, checked once here so a bad file is reported once, by its name.
fn read_ca(path: &Path, errors: &mut Vec<String>) -> Option<Vec<u8>> {
    let pem = read(path, "HERALD_PROVIDER_CA_FILE", errors)?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Some(pem),
        Ok(_) => {
            errors.push(format!(
                "HERALD_PROVIDER_CA_FILE {}: no PEM certificate in it",
                path.display()
            ));
            None
        }
        Err(e) => {
            errors.push(format!(
                "HERALD_PROVIDER_CA_FILE {}: not PEM certificates: {}",
                path.display(),
                describe(&e)
            ));
            None
        }
    }
}

fn read(path: &Path, env: &str, errors: &mut Vec<String>) -> Option<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| errors.push(format!("{env} {}: cannot read: {e}", path.display())))
        .ok()
}

/// An error with its sources, for one line of the configuration report.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
