//! `ProvidersConfig` from the environment, validation that reports everything, and
//! `build` producing working providers in failover order.

use crate::common::delivery;
use figment::Figment;
use figment::providers::{Env, Serialized};
use herald_channels::{ENV_KEYS, Platform, ProvidersConfig, Target, build};
use herald_fakes::apns::ApnsFake;
use herald_fakes::fcm::FcmFake;
use herald_fakes::twilio::TwilioFake;
use herald_fakes::vonage::VonageFake;
use herald_fakes::webhook::WebhookReceiver;
use herald_protocol::Channel;
use std::path::PathBuf;

#[test]
#[allow(clippy::result_large_err)] // figment's `Jail` closure type, not ours
fn settings_come_from_herald_env_variables() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("HERALD_APNS_URL", "https://api.sandbox.push.apple.com");
        jail.set_env("HERALD_APNS_KEY_FILE", "/etc/herald/AuthKey.p8");
        jail.set_env("HERALD_APNS_KEY_ID", "KEY1234567");
        jail.set_env("HERALD_APNS_TEAM_ID", "TEAM123456");
        jail.set_env("HERALD_APNS_TOPIC", "com.example.app");
        jail.set_env("HERALD_FCM_CREDENTIALS", "/etc/herald/firebase.json");
        jail.set_env("HERALD_TWILIO_ACCOUNT_SID", "AC123");
        jail.set_env("HERALD_TWILIO_AUTH_TOKEN", "0123456789");
        jail.set_env("HERALD_TWILIO_FROM", "+15005550006");
        jail.set_env("HERALD_VONAGE_API_KEY", "12345678");
        jail.set_env("HERALD_VONAGE_API_SECRET", "s");
        jail.set_env("HERALD_VONAGE_FROM", "Herald");
        jail.set_env("HERALD_WEBHOOK_SECRET", "0123456789abcdef");
        jail.set_env("HERALD_PROVIDER_TIMEOUT_MS", "2500");
        jail.set_env("HERALD_UNRELATED", "ignored");
        let config: ProvidersConfig = Figment::new()
            .merge(Env::prefixed("HERALD_").only(&ENV_KEYS))
            .extract()?;
        assert_eq!(
            config.apns_url.as_deref(),
            Some("https://api.sandbox.push.apple.com")
        );
        assert_eq!(
            config.apns_key_file,
            Some(PathBuf::from("/etc/herald/AuthKey.p8"))
        );
        assert_eq!(config.apns_key_id.as_deref(), Some("KEY1234567"));
        assert_eq!(config.apns_team_id.as_deref(), Some("TEAM123456"));
        assert_eq!(config.apns_topic.as_deref(), Some("com.example.app"));
        assert_eq!(
            config.fcm_credentials,
            Some(PathBuf::from("/etc/herald/firebase.json"))
        );
        assert_eq!(config.twilio_account_sid.as_deref(), Some("AC123"));
        assert_eq!(
            config.twilio_auth_token.as_deref(),
            Some("123456789"),
            "figment parsed it as a number"
        );
        assert_eq!(config.twilio_from.as_deref(), Some("+15005550006"));
        assert_eq!(config.vonage_api_key.as_deref(), Some("12345678"));
        assert_eq!(config.vonage_api_secret.as_deref(), Some("s"));
        assert_eq!(config.vonage_from.as_deref(), Some("Herald"));
        assert_eq!(config.webhook_secret.as_deref(), Some("0123456789abcdef"));
        assert_eq!(config.provider_timeout_ms, Some(2500));

        // Read raw, as `ENV_KEYS` documents, nothing is lost.
        let mut raw = Figment::new();
        for (key, value) in Env::prefixed("HERALD_").only(&ENV_KEYS).iter() {
            raw = raw.merge(Serialized::default(key.as_str(), value));
        }
        let exact: ProvidersConfig = raw.extract()?;
        assert_eq!(exact.twilio_auth_token.as_deref(), Some("0123456789"));
        assert_eq!(exact.twilio_from.as_deref(), Some("+15005550006"));
        assert_eq!(exact.provider_timeout_ms, Some(2500));
        assert_eq!(
            exact,
            ProvidersConfig {
                twilio_auth_token: Some("0123456789".into()),
                ..config
            }
        );
        Ok(())
    });
}

#[test]
fn nothing_configured_builds_no_provider() {
    let providers = build(&ProvidersConfig::default()).expect("empty is valid");
    assert!(providers.is_empty());
}

#[test]
fn every_problem_is_reported_at_once_naming_what_to_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ProvidersConfig {
        apns_key_id: Some("KEY1234567".into()),
        fcm_credentials: Some(dir.path().join("missing.json")),
        twilio_account_sid: Some("AC123".into()),
        vonage_url: Some("not a url".into()),
        vonage_api_key: Some("k".into()),
        vonage_api_secret: Some("s".into()),
        vonage_from: Some("Herald".into()),
        webhook_secret: Some("short".into()),
        provider_timeout_ms: Some(0),
        ..ProvidersConfig::default()
    };
    let errors = match build(&config) {
        Ok(_) => panic!("invalid configuration accepted"),
        Err(e) => e.0,
    };
    let all = errors.join("\n");
    for expected in [
        "HERALD_APNS_KEY_FILE",
        "HERALD_APNS_TEAM_ID",
        "HERALD_APNS_TOPIC",
        "HERALD_FCM_CREDENTIALS",
        "HERALD_TWILIO_AUTH_TOKEN",
        "HERALD_TWILIO_FROM",
        "Vonage URL",
        "HERALD_WEBHOOK_SECRET",
        "HERALD_PROVIDER_TIMEOUT_MS",
    ] {
        assert!(all.contains(expected), "{expected} missing from:\n{all}");
    }
    assert!(
        !all.contains("HERALD_APNS_KEY_ID"),
        "the key id was given:\n{all}"
    );
    assert_eq!(errors.len(), 9, "{all}");
}

#[test]
fn unreadable_keys_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("AuthKey.p8");
    std::fs::write(&key, "not a key").expect("write");
    let sa = dir.path().join("firebase.json");
    std::fs::write(&sa, "{\"project_id\": 1}").expect("write");
    let config = ProvidersConfig {
        apns_key_file: Some(key),
        apns_key_id: Some("KEY1234567".into()),
        apns_team_id: Some("TEAM123456".into()),
        apns_topic: Some("com.example".into()),
        fcm_credentials: Some(sa),
        ..ProvidersConfig::default()
    };
    let errors = build(&config).err().expect("bad keys refused").0;
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("APNs key"), "{errors:?}");
    assert!(errors[1].contains("HERALD_FCM_CREDENTIALS"), "{errors:?}");
}

#[tokio::test]
async fn built_providers_come_in_failover_order_and_deliver() {
    let apns = ApnsFake::start("com.example.herald").await.expect("apns");
    let fcm = FcmFake::start().await.expect("fcm");
    let twilio = TwilioFake::start().await.expect("twilio");
    let vonage = VonageFake::start().await.expect("vonage");
    let secret = "0123456789abcdef0123";
    let receiver = WebhookReceiver::start(secret).await.expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        path
    };
    let config = ProvidersConfig {
        apns_url: Some(apns.url()),
        apns_key_file: Some(write("AuthKey.p8", apns.p8_pem())),
        apns_key_id: Some(apns.key_id().into()),
        apns_team_id: Some(apns.team_id().into()),
        apns_topic: Some("com.example.herald".into()),
        fcm_url: Some(fcm.url()),
        fcm_credentials: Some(write("firebase.json", &fcm.service_account_json())),
        twilio_url: Some(twilio.url()),
        twilio_account_sid: Some(twilio.account_sid().into()),
        twilio_auth_token: Some(twilio.auth_token().into()),
        twilio_from: Some("+15005550006".into()),
        vonage_url: Some(vonage.url()),
        vonage_api_key: Some(vonage.api_key().into()),
        vonage_api_secret: Some(vonage.api_secret().into()),
        vonage_from: Some("Herald".into()),
        webhook_secret: Some(secret.into()),
        provider_ca_file: Some(write("ca.pem", apns.ca_pem())),
        provider_timeout_ms: Some(2000),
    };
    let providers = build(&config).expect("valid");
    let names: Vec<&str> = providers.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["apns", "fcm", "twilio", "vonage", "webhook"]);

    let targets = [
        (
            Channel::Push,
            Target::Device {
                platform: Platform::Ios,
                token: "abcdef0123456789".into(),
            },
        ),
        (
            Channel::Push,
            Target::Device {
                platform: Platform::Android,
                token: "android-1".into(),
            },
        ),
        (
            Channel::Sms,
            Target::Phone {
                e164: "+4915112345678".into(),
            },
        ),
        (
            Channel::Sms,
            Target::Phone {
                e164: "+4915112345678".into(),
            },
        ),
        (
            Channel::Webhook,
            Target::Webhook {
                url: receiver.url("/h"),
            },
        ),
    ];
    for (provider, (channel, target)) in providers.iter().zip(targets) {
        assert_eq!(provider.channel(), channel);
        assert!(
            provider.accepts(&target),
            "{} accepts {target:?}",
            provider.name()
        );
        provider
            .send(&delivery(channel, target))
            .await
            .unwrap_or_else(|e| panic!("{} failed: {e}", provider.name()));
    }
    assert_eq!(apns.received().len(), 1);
    assert_eq!(fcm.received().len(), 1);
    assert_eq!(twilio.accepted().len(), 1);
    assert_eq!(vonage.accepted().len(), 1);
    assert_eq!(receiver.received().len(), 1);
}

#[test]
fn a_ca_file_that_is_not_pem_is_reported_by_its_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let config = ProvidersConfig {
        webhook_secret: Some("0123456789abcdef".into()),
        provider_ca_file: Some(ca),
        ..ProvidersConfig::default()
    };
    let errors = build(&config).err().expect("bad CA refused").0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("HERALD_PROVIDER_CA_FILE")
            && errors[0].contains("invalid certificate"),
        "named by its variable, with the cause: {errors:?}"
    );
}
