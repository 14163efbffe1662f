//! FCM HTTP v1 with its OAuth2 token endpoint, against the fake.

use crate::common::{ENDLESS_BODY_BUDGET, EndlessBody, class, delivery, http};
use herald_channels::fcm::oauth::ServiceAccount;
use herald_channels::fcm::{FcmConfig, FcmProvider};
use herald_channels::{Platform, Provider, SendError, Target};
use herald_fakes::Reply;
use herald_fakes::fcm::{FcmFake, error_reply};
use herald_protocol::{Channel, Priority};
use serde_json::json;
use std::time::Duration;

async fn setup() -> (FcmFake, FcmProvider) {
    let fake = FcmFake::start().await.expect("fake fcm starts");
    let account: ServiceAccount =
        serde_json::from_str(&fake.service_account_json()).expect("service account");
    let provider = provider(&fake, account);
    (fake, provider)
}

fn provider(fake: &FcmFake, service_account: ServiceAccount) -> FcmProvider {
    FcmProvider::new(&FcmConfig {
        base_url: fake.url(),
        service_account,
        http: http(None),
    })
    .expect("provider builds")
}

fn device(platform: Platform, token: &str) -> Target {
    Target::Device {
        platform,
        token: token.into(),
    }
}

#[tokio::test]
async fn fcm_sends_android_and_web_messages_with_one_cached_access_token() {
    let (fake, provider) = setup().await;
    let mut android = delivery(Channel::Push, device(Platform::Android, "android-token-1"));
    android.priority = Priority::High;
    android.collapse_key = Some("photo-9".into());
    android.expires_at = Some(time::OffsetDateTime::now_utc() + time::Duration::minutes(10));
    android.data.insert("photo".into(), json!(9));
    // Keys FCM reserves, which it would refuse the whole message for.
    android.data.insert("from".into(), json!("Ada"));
    android.data.insert("google.x".into(), json!("y"));
    let sent = provider.send(&android).await.expect("android accepted");
    assert!(
        sent.provider_message_id
            .as_deref()
            .is_some_and(|n| n.starts_with("projects/herald-test/messages/")),
        "{sent:?}"
    );

    let web = delivery(Channel::Push, device(Platform::Web, "web-token-1"));
    provider.send(&web).await.expect("web accepted");

    let received = fake.received();
    assert_eq!(received.len(), 2);
    let m = &received[0].message;
    assert_eq!(m["token"], json!("android-token-1"));
    assert_eq!(
        m["notification"],
        json!({"title": "New like", "body": "Ada liked your photo"})
    );
    assert_eq!(
        m["data"],
        json!({"photo": "9", "herald_from": "Ada", "herald_google.x": "y"}),
        "data values are strings, reserved keys prefixed"
    );
    assert_eq!(m["android"]["priority"], json!("HIGH"));
    assert_eq!(m["android"]["collapse_key"], json!("photo-9"));
    let ttl = m["android"]["ttl"].as_str().expect("ttl");
    assert!(
        ttl.ends_with('s')
            && ttl
                .trim_end_matches('s')
                .parse::<i64>()
                .is_ok_and(|s| (590..=600).contains(&s)),
        "{ttl}"
    );
    let w = &received[1].message;
    assert_eq!(w["token"], json!("web-token-1"));
    assert_eq!(w["webpush"]["headers"]["Urgency"], json!("normal"));
    assert_eq!(w["webpush"]["notification"]["title"], json!("New like"));
    assert_eq!(fake.token_requests(), 1, "the access token is cached");
    assert_eq!(received[0].bearer, received[1].bearer);
}

#[tokio::test]
async fn fcm_access_token_is_refreshed_shortly_before_expiry() {
    let (fake, provider) = setup().await;
    // A token living 30 s is inside the refresh margin (60 s): fetched for every send.
    fake.set_token_lifetime(30);
    for _ in 0..2 {
        provider
            .send(&delivery(Channel::Push, device(Platform::Android, "t")))
            .await
            .expect("sent");
    }
    assert_eq!(fake.token_requests(), 2);
    fake.set_token_lifetime(3600);
    for _ in 0..2 {
        provider
            .send(&delivery(Channel::Push, device(Platform::Android, "t")))
            .await
            .expect("sent");
    }
    assert_eq!(fake.token_requests(), 3);
}

#[tokio::test]
async fn fcm_401_discards_the_access_token_and_the_next_send_fetches_one() {
    let (fake, provider) = setup().await;
    let push = || delivery(Channel::Push, device(Platform::Android, "t"));
    provider.send(&push()).await.expect("sent");
    fake.revoke_access_tokens();
    let result = provider.send(&push()).await;
    assert_eq!(class(&result), "transient", "{result:?}");
    provider.send(&push()).await.expect("sent with a new token");
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn fcm_unregistered_and_invalid_tokens_are_invalid_targets() {
    let (fake, provider) = setup().await;
    fake.unregister("gone");
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Android, "gone")))
        .await;
    assert!(
        matches!(&result, Err(SendError::InvalidTarget { detail }) if detail.contains("UNREGISTERED")),
        "{result:?}"
    );
    fake.script().push(
        1,
        error_reply(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            "The registration token is not a valid FCM registration token",
        ),
    );
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Web, "bad")))
        .await;
    assert_eq!(class(&result), "invalid-target", "{result:?}");
    fake.script().push(
        1,
        error_reply(
            403,
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
            "SenderId mismatch",
        ),
    );
    // A token of another project: this message fails, the token stays, and one user's
    // data does not open the circuit for everyone.
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Web, "bad")))
        .await;
    assert_eq!(class(&result), "permanent", "{result:?}");
}

#[tokio::test]
async fn fcm_errors_garbage_and_silence_are_classified() {
    let (fake, provider) = setup().await;
    let quota = error_reply(
        429,
        "RESOURCE_EXHAUSTED",
        Some("QUOTA_EXCEEDED"),
        "Quota exceeded",
    )
    .header("retry-after", "7");
    let cases: Vec<(Reply, &str)> = vec![
        (
            error_reply(
                503,
                "UNAVAILABLE",
                Some("UNAVAILABLE"),
                "The service is currently unavailable.",
            ),
            "transient",
        ),
        (
            error_reply(
                500,
                "INTERNAL",
                Some("INTERNAL"),
                "Internal error encountered.",
            ),
            "transient",
        ),
        (
            error_reply(
                400,
                "INVALID_ARGUMENT",
                Some("INVALID_ARGUMENT"),
                "Message is too big",
            ),
            "permanent",
        ),
        (
            error_reply(
                401,
                "UNAUTHENTICATED",
                Some("THIRD_PARTY_AUTH_ERROR"),
                "APNs auth failed",
            ),
            // The project's APNs or web push key: that platform only, not FCM's circuit.
            "permanent",
        ),
        (
            error_reply(404, "NOT_FOUND", None, "Project not found"),
            "permanent",
        ),
        (Reply::raw(502, "<html>upstream</html>"), "transient"),
        (Reply::raw(200, "not json"), "permanent"),
        (Reply::json(200, &json!({"unexpected": 1})), "permanent"),
        (Reply::raw(418, ""), "permanent"),
        (Reply::Hang, "transient"),
    ];
    for (reply, expected) in cases {
        let shown = format!("{reply:?}");
        fake.script().push(1, reply);
        let result = provider
            .send(&delivery(Channel::Push, device(Platform::Android, "t")))
            .await;
        assert_eq!(class(&result), expected, "{shown} gave {result:?}");
    }
    fake.script().push(1, quota);
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Android, "t")))
        .await;
    assert_eq!(
        result.err(),
        Some(SendError::Throttled {
            retry_after: Some(Duration::from_secs(7)),
            detail: "fcm: 429 QUOTA_EXCEEDED: Quota exceeded".into()
        })
    );
}

/// FCM's device message rate (`QUOTA_EXCEEDED` about one device) holds back that
/// device's job only; the project's quota stays a throttle of the whole provider.
#[tokio::test]
async fn fcm_device_message_rate_throttles_that_device_only() {
    let (fake, provider) = setup().await;
    fake.script().push(
        1,
        error_reply(
            429,
            "RESOURCE_EXHAUSTED",
            Some("QUOTA_EXCEEDED"),
            "Device message rate exceeded.",
        ),
    );
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Android, "hot")))
        .await;
    let error = result.expect_err("throttled");
    assert!(error.throttles_one_target(), "{error:?}");
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Android, "calm")))
        .await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn fcm_503_with_retry_after_says_when_to_come_back() {
    let (fake, provider) = setup().await;
    fake.script().push(
        1,
        error_reply(
            503,
            "UNAVAILABLE",
            Some("UNAVAILABLE"),
            "The service is unavailable",
        )
        .header("retry-after", "9"),
    );
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Android, "t")))
        .await;
    assert!(
        matches!(&result, Err(SendError::Transient { retry_after: Some(d), .. }) if *d == Duration::from_secs(9)),
        "{result:?}"
    );
    // Without the header, the worker's own back-off decides.
    fake.script().push(1, Reply::raw(500, "<html>oops</html>"));
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Android, "t")))
        .await;
    assert!(
        matches!(
            &result,
            Err(SendError::Transient {
                retry_after: None,
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn fcm_token_endpoint_failures_are_classified() {
    let (fake, provider) = setup().await;
    let push = || delivery(Channel::Push, device(Platform::Android, "t"));
    fake.token_script().push(1, Reply::status(503));
    assert_eq!(class(&provider.send(&push()).await), "transient");
    fake.token_script().push(1, Reply::raw(200, "{{{{"));
    assert_eq!(class(&provider.send(&push()).await), "transient");
    fake.token_script().push(1, Reply::Hang);
    assert_eq!(class(&provider.send(&push()).await), "transient");
    fake.token_script().push(
        1,
        Reply::json(
            400,
            &json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
        ),
    );
    // A refused grant is our credentials: retried, and counted by the provider's circuit.
    let refused = provider.send(&push()).await;
    assert!(
        matches!(&refused, Err(SendError::Transient { detail, .. }) if detail.contains("credentials refused")),
        "{refused:?}"
    );
    assert!(
        fake.received().is_empty(),
        "no message is sent without a token"
    );
    provider
        .send(&push())
        .await
        .expect("the endpoint recovered");
}

#[tokio::test]
async fn fcm_assertion_from_the_wrong_account_is_refused() {
    let fake = FcmFake::start().await.expect("fake fcm starts");
    let mut account: ServiceAccount =
        serde_json::from_str(&fake.service_account_json()).expect("service account");
    account.client_email = "someone-else@example.iam.gserviceaccount.com".into();
    let provider = provider(&fake, account);
    let result = provider
        .send(&delivery(Channel::Push, device(Platform::Android, "t")))
        .await;
    assert!(
        matches!(&result, Err(SendError::Transient { detail, .. }) if detail.contains("invalid_grant")),
        "{result:?}"
    );
}

#[tokio::test]
async fn fcm_reads_only_a_bounded_prefix_of_an_endless_answer() {
    let fake = FcmFake::start().await.expect("fake fcm starts");
    let account: ServiceAccount =
        serde_json::from_str(&fake.service_account_json()).expect("service account");
    let push = || delivery(Channel::Push, device(Platform::Android, "t"));

    // The send endpoint answers 500 with a body that never ends.
    let server = EndlessBody::start(500).await;
    let sender = FcmProvider::new(&FcmConfig {
        base_url: server.url(""),
        service_account: account.clone(),
        http: http(None),
    })
    .expect("provider builds");
    let result = sender.send(&push()).await;
    assert_eq!(class(&result), "transient", "{result:?}");
    let written = server.written_when_hung_up().await;
    assert!(written < ENDLESS_BODY_BUDGET, "send: read {written} bytes");

    // So does the token endpoint.
    let server = EndlessBody::start(500).await;
    let tokens = FcmProvider::new(&FcmConfig {
        base_url: fake.url(),
        service_account: ServiceAccount {
            token_uri: server.url("/token"),
            ..account
        },
        http: http(None),
    })
    .expect("provider builds");
    let result = tokens.send(&push()).await;
    assert_eq!(class(&result), "transient", "{result:?}");
    let written = server.written_when_hung_up().await;
    assert!(written < ENDLESS_BODY_BUDGET, "token: read {written} bytes");
}
