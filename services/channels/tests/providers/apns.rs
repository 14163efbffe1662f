//! APNs over HTTP/2 + TLS against the fake.

use crate::common::{class, delivery, eventually, http};
use herald_channels::apns::{ApnsConfig, ApnsProvider};
use herald_channels::{Platform, Provider, SendError, Target};
use herald_fakes::Reply;
use herald_fakes::apns::{ApnsFake, error_reply};
use herald_protocol::{Channel, Priority};
use serde_json::json;
use std::time::Duration;

const TOPIC: &str = "com.example.herald";
const DEVICE: &str = "a3f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

async fn setup() -> (ApnsFake, ApnsProvider) {
    let fake = ApnsFake::start(TOPIC).await.expect("fake apns starts");
    let provider = provider_with_key(&fake, fake.p8_pem().as_bytes());
    (fake, provider)
}

fn provider_with_key(fake: &ApnsFake, key_pem: &[u8]) -> ApnsProvider {
    ApnsProvider::new(&ApnsConfig {
        base_url: fake.url(),
        key_pem: key_pem.to_vec(),
        key_id: fake.key_id().into(),
        team_id: fake.team_id().into(),
        topic: TOPIC.into(),
        http: http(Some(fake.ca_pem())),
    })
    .expect("provider builds")
}

fn ios(token: &str) -> Target {
    Target::Device {
        platform: Platform::Ios,
        token: token.into(),
    }
}

#[tokio::test]
async fn apns_push_goes_over_http2_with_token_auth_and_apple_headers() {
    let (fake, provider) = setup().await;
    let mut push = delivery(Channel::Push, ios(DEVICE));
    push.priority = Priority::High;
    push.collapse_key = Some("photo-9".into());
    push.expires_at = Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    push.data.insert("photo".into(), json!("9"));

    let sent = provider.send(&push).await.expect("accepted");
    assert_eq!(sent.provider_message_id.as_deref(), Some(push.id.as_str()));

    let received = fake.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert!(request.http2, "APNs requires HTTP/2");
    assert_eq!(request.device_token, DEVICE);
    assert!(
        request.token_iat.is_some(),
        "the ES256 provider token verified"
    );
    let header = |name: &str| request.headers.get(name).map(String::as_str);
    assert_eq!(header("apns-push-type"), Some("alert"));
    assert_eq!(header("apns-priority"), Some("10"));
    assert_eq!(header("apns-topic"), Some(TOPIC));
    assert_eq!(header("apns-collapse-id"), Some("photo-9"));
    assert_eq!(header("apns-id"), Some(push.id.as_str()));
    let expiration: i64 = header("apns-expiration")
        .expect("expiration")
        .parse()
        .expect("unix time");
    assert_eq!(expiration, push.expires_at.expect("set").unix_timestamp());
    assert_eq!(
        request.payload,
        json!({"aps": {"alert": {"title": "New like", "body": "Ada liked your photo"}}, "photo": "9"})
    );

    let normal = delivery(Channel::Push, ios(DEVICE));
    provider.send(&normal).await.expect("accepted");
    let received = fake.received();
    assert_eq!(
        received[1].headers.get("apns-priority").map(String::as_str),
        Some("5")
    );
    assert!(!received[1].headers.contains_key("apns-collapse-id"));
    assert!(!received[1].headers.contains_key("apns-expiration"));
    assert_eq!(
        received[0].headers.get("authorization"),
        received[1].headers.get("authorization"),
        "one cached provider token for both sends"
    );
    assert_eq!(
        fake.connections(),
        1,
        "both sends share one HTTP/2 connection"
    );
}

#[tokio::test]
async fn apns_dead_tokens_are_invalid_targets() {
    let (fake, provider) = setup().await;
    fake.unregister(DEVICE);
    let result = provider.send(&delivery(Channel::Push, ios(DEVICE))).await;
    assert_eq!(class(&result), "invalid-target", "{result:?}");

    // Also APNs' answer for a token of the other environment: a setup mistake must not
    // remove every user's token, so this message fails and the token stays.
    fake.script().push(1, error_reply(400, "BadDeviceToken"));
    let other = "00ff".repeat(16);
    let result = provider.send(&delivery(Channel::Push, ios(&other))).await;
    assert_eq!(class(&result), "permanent", "{result:?}");

    // A token of another app: one user's data, so this message fails and the token
    // stays; it must not open the circuit for everyone.
    fake.script()
        .push(1, error_reply(400, "DeviceTokenNotForTopic"));
    let result = provider.send(&delivery(Channel::Push, ios(&other))).await;
    assert_eq!(class(&result), "permanent", "{result:?}");

    // The topic we send is refused: our configuration, counted by the circuit.
    for reason in ["TopicDisallowed", "BadTopic", "MissingTopic"] {
        fake.script().push(1, error_reply(400, reason));
        let result = provider.send(&delivery(Channel::Push, ios(&other))).await;
        assert_eq!(class(&result), "transient", "{reason}: {result:?}");
        let message = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("HERALD_APNS_TOPIC"), "{reason}: {message}");
    }

    // Not hex: never sent (it would land in the URL path).
    let before = fake.received().len();
    let result = provider
        .send(&delivery(Channel::Push, ios("../../etc")))
        .await;
    assert_eq!(class(&result), "invalid-target", "{result:?}");
    assert_eq!(fake.received().len(), before);
}

#[tokio::test]
async fn apns_errors_garbage_and_silence_are_classified() {
    let (fake, provider) = setup().await;
    let cases: Vec<(Reply, &str)> = vec![
        (error_reply(429, "TooManyRequests"), "throttled"),
        (error_reply(503, "ServiceUnavailable"), "transient"),
        (error_reply(500, "InternalServerError"), "transient"),
        (Reply::raw(502, "<html>bad gateway</html>"), "transient"),
        (error_reply(400, "PayloadEmpty"), "permanent"),
        (error_reply(413, "PayloadTooLarge"), "permanent"),
        (error_reply(403, "BadCertificate"), "transient"),
        (Reply::raw(400, vec![0xff, 0xfe, 0x00]), "permanent"),
        (Reply::json(400, &json!({"unexpected": true})), "permanent"),
        (Reply::status(200), "sent"),
        (Reply::Hang, "transient"),
    ];
    for (reply, expected) in cases {
        let shown = format!("{reply:?}");
        fake.script().push(1, reply);
        let result = provider.send(&delivery(Channel::Push, ios(DEVICE))).await;
        assert_eq!(class(&result), expected, "{shown} gave {result:?}");
    }
}

/// APNs' 429 `TooManyRequests` is about one device token ("too many requests were made
/// consecutively to the same device token"): classed as that target's throttle, so the
/// worker holds back that job only, and the next device is pushed to at once.
#[tokio::test]
async fn apns_too_many_requests_throttles_that_device_only() {
    let (fake, provider) = setup().await;
    let other = "b4f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    fake.script().push(1, error_reply(429, "TooManyRequests"));
    let hot = provider.send(&delivery(Channel::Push, ios(DEVICE))).await;
    let error = hot.expect_err("throttled");
    assert!(
        error.throttles_one_target(),
        "a device's throttle: {error:?}"
    );
    assert!(
        provider
            .send(&delivery(Channel::Push, ios(other)))
            .await
            .is_ok()
    );
    fake.script()
        .push(1, error_reply(429, "TooManyProviderTokenUpdates"));
    let account = provider.send(&delivery(Channel::Push, ios(other))).await;
    let error = account.expect_err("throttled");
    assert!(
        matches!(error, SendError::Throttled { .. }) && !error.throttles_one_target(),
        "the account's throttle: {error:?}"
    );
}

#[tokio::test]
async fn apns_503_with_retry_after_says_when_to_come_back() {
    let (fake, provider) = setup().await;
    fake.script().push(
        1,
        error_reply(503, "ServiceUnavailable").header("retry-after", "12"),
    );
    let result = provider.send(&delivery(Channel::Push, ios(DEVICE))).await;
    assert!(
        matches!(&result, Err(SendError::Transient { retry_after: Some(d), .. }) if *d == Duration::from_secs(12)),
        "{result:?}"
    );
}

#[tokio::test]
async fn apns_expired_provider_token_is_replaced_by_a_fresh_one() {
    let (fake, provider) = setup().await;
    provider
        .send(&delivery(Channel::Push, ios(DEVICE)))
        .await
        .expect("first send");
    let first_iat = fake.received()[0].token_iat.expect("verified token");
    fake.expire_tokens_issued_until(first_iat);

    let result = provider.send(&delivery(Channel::Push, ios(DEVICE))).await;
    assert!(
        matches!(&result, Err(SendError::Transient { detail, .. }) if detail.contains("ExpiredProviderToken")),
        "{result:?}"
    );
    // The provider signs a new token (with a later `iat`) instead of reusing the cached one.
    let sent = eventually(Duration::from_secs(5), || async {
        provider
            .send(&delivery(Channel::Push, ios(DEVICE)))
            .await
            .ok()
    })
    .await;
    assert!(sent.is_some(), "a fresh token was never signed");
    let last = fake.received().pop().expect("requests");
    assert!(last.token_iat.expect("verified") > first_iat);
}

#[tokio::test]
async fn apns_token_signed_with_the_wrong_key_counts_against_the_provider() {
    let fake = ApnsFake::start(TOPIC).await.expect("fake apns starts");
    let other = ApnsFake::start(TOPIC).await.expect("second fake");
    let provider = provider_with_key(&fake, other.p8_pem().as_bytes());
    let result = provider.send(&delivery(Channel::Push, ios(DEVICE))).await;
    assert!(
        // Our key, not the message: retried, and counted by the provider's circuit.
        matches!(&result, Err(SendError::Transient { detail, .. })
            if detail.contains("InvalidProviderToken") && detail.contains("credentials refused")),
        "{result:?}"
    );
}

#[tokio::test]
async fn apns_takes_only_ios_tokens() {
    let (_fake, provider) = setup().await;
    assert!(provider.accepts(&ios(DEVICE)));
    assert!(!provider.accepts(&Target::Device {
        platform: Platform::Android,
        token: "x".into()
    }));
    assert!(!provider.accepts(&Target::Phone {
        e164: "+4915112345678".into()
    }));
}

#[tokio::test]
async fn apns_provider_token_is_reused_for_50_minutes_then_re_signed() {
    use herald_channels::apns::token::{ProviderTokens, REFRESH_AFTER};
    let fake = ApnsFake::start(TOPIC).await.expect("fake apns starts");
    let tokens = ProviderTokens::new(fake.p8_pem().as_bytes(), fake.key_id(), fake.team_id())
        .expect("key parses");
    let t0 = 1_800_000_000;
    let first = tokens.current_at(t0).expect("signed");
    assert_eq!(
        tokens.current_at(t0 + REFRESH_AFTER - 1).expect("cached"),
        first
    );
    let second = tokens.current_at(t0 + REFRESH_AFTER).expect("re-signed");
    assert_ne!(
        second, first,
        "re-signed after 50 minutes (Apple refuses tokens older than an hour)"
    );
    // A stale token reported by another request does not throw away the current one.
    tokens.discard(&first);
    assert_eq!(
        tokens.current_at(t0 + REFRESH_AFTER + 1).expect("cached"),
        second
    );
    tokens.discard(&second);
    assert_ne!(
        tokens
            .current_at(t0 + REFRESH_AFTER + 2)
            .expect("re-signed"),
        second
    );
    const { assert!(REFRESH_AFTER >= 20 * 60 && REFRESH_AFTER < 60 * 60) };
}

#[test]
fn apns_key_that_is_not_p8_is_refused_at_setup() {
    let result = herald_channels::apns::token::ProviderTokens::new(
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "K",
        "T",
    );
    assert!(result.is_err());
}
