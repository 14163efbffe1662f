//! Signed webhooks against a receiver that verifies the signature independently.

use crate::common::{ENDLESS_BODY_BUDGET, EndlessBody, class, delivery, http};
use herald_channels::webhook::signature;
use herald_channels::webhook::{WebhookConfig, WebhookProvider};
use herald_channels::{Provider, SendError, Target};
use herald_fakes::Reply;
use herald_fakes::webhook::WebhookReceiver;
use herald_protocol::Channel;
use serde_json::json;
use std::time::Duration;

const SECRET: &str = "whsec-0123456789abcdef";

fn provider(secret: &str) -> WebhookProvider {
    WebhookProvider::new(&WebhookConfig {
        secret: secret.into(),
        http: http(None),
    })
    .expect("provider builds")
}

fn hook(url: String) -> Target {
    Target::Webhook { url }
}

#[tokio::test]
async fn webhook_posts_the_notification_signed_and_the_receiver_verifies_it() {
    let receiver = WebhookReceiver::start(SECRET)
        .await
        .expect("receiver starts");
    let provider = provider(SECRET);
    let mut push = delivery(Channel::Webhook, hook(receiver.url("/hooks/herald?team=7")));
    push.data.insert("photo".into(), json!(9));
    provider.send(&push).await.expect("delivered");

    let received = receiver.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert!(request.signature_valid);
    assert_eq!(request.path, "/hooks/herald");
    assert_eq!(request.id.as_deref(), Some(push.id.as_str()));
    assert_eq!(
        request.body,
        json!({"id": push.id, "seq": 7, "user_id": "user-1", "category": "like", "priority": "normal",
               "title": "New like", "body": "Ada liked your photo", "data": {"photo": 9}, "collapse_key": null})
    );
}

#[tokio::test]
async fn webhook_signed_with_another_secret_is_refused_by_the_receiver() {
    let receiver = WebhookReceiver::start(SECRET)
        .await
        .expect("receiver starts");
    let result = provider("another-secret-of-16+")
        .send(&delivery(Channel::Webhook, hook(receiver.url("/"))))
        .await;
    assert_eq!(class(&result), "permanent", "{result:?}");
    assert!(!receiver.received()[0].signature_valid);
}

#[tokio::test]
async fn webhook_answers_are_classified() {
    let receiver = WebhookReceiver::start(SECRET)
        .await
        .expect("receiver starts");
    let provider = provider(SECRET);
    let cases: Vec<(Reply, &str)> = vec![
        (Reply::status(200), "sent"),
        (Reply::raw(202, "garbage is fine on success"), "sent"),
        (Reply::status(410), "invalid-target"),
        (Reply::status(503), "transient"),
        (Reply::raw(500, vec![0xff; 10]), "transient"),
        (Reply::status(408), "transient"),
        (Reply::status(404), "permanent"),
        (Reply::status(400), "permanent"),
        (
            Reply::status(301).header("location", "http://example.invalid/"),
            "permanent",
        ),
        (Reply::Hang, "transient"),
    ];
    for (reply, expected) in cases {
        let shown = format!("{reply:?}");
        receiver.script().push(1, reply);
        let result = provider
            .send(&delivery(Channel::Webhook, hook(receiver.url("/"))))
            .await;
        assert_eq!(class(&result), expected, "{shown} gave {result:?}");
    }
    receiver
        .script()
        .push(1, Reply::status(429).header("retry-after", "3"));
    let result = provider
        .send(&delivery(Channel::Webhook, hook(receiver.url("/"))))
        .await;
    assert!(
        matches!(result, Err(SendError::Throttled { retry_after: Some(d), .. }) if d == Duration::from_secs(3)),
        "{result:?}"
    );
}

/// The receiver is a tenant's: one streaming an endless 500 body costs the worker a
/// bounded prefix of it, not the body (which would run it out of memory).
#[tokio::test]
async fn webhook_reads_only_a_bounded_prefix_of_an_endless_error_body() {
    let receiver = EndlessBody::start(500).await;
    let started = std::time::Instant::now();
    let result = provider(SECRET)
        .send(&delivery(Channel::Webhook, hook(receiver.url("/hook"))))
        .await;
    assert_eq!(class(&result), "transient", "{result:?}");
    let written = receiver.written_when_hung_up().await;
    assert!(
        written < ENDLESS_BODY_BUDGET,
        "the client read {written} bytes of the error body in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn webhook_503_with_retry_after_says_when_to_come_back() {
    let receiver = WebhookReceiver::start(SECRET)
        .await
        .expect("receiver starts");
    let provider = provider(SECRET);
    receiver
        .script()
        .push(1, Reply::status(503).header("retry-after", "5"));
    let result = provider
        .send(&delivery(Channel::Webhook, hook(receiver.url("/"))))
        .await;
    assert!(
        matches!(result, Err(SendError::Transient { retry_after: Some(d), .. }) if d == Duration::from_secs(5)),
        "{result:?}"
    );
}

#[tokio::test]
async fn webhook_unreachable_or_malformed_targets() {
    let provider = provider(SECRET);
    // A port nobody listens on: bind one, then free it.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let result = provider
        .send(&delivery(
            Channel::Webhook,
            hook(format!("http://{closed}/")),
        ))
        .await;
    assert_eq!(class(&result), "transient", "{result:?}");
    for bad in ["ftp://example.com/x", "not a url", "http://"] {
        let result = provider
            .send(&delivery(Channel::Webhook, hook(bad.into())))
            .await;
        assert_eq!(class(&result), "invalid-target", "{bad}: {result:?}");
    }
}

#[test]
fn the_verification_helper_accepts_what_the_sender_signs() {
    let body = br#"{"id":"1"}"#;
    let header = signature::sign(SECRET.as_bytes(), 1_700_000_000, body);
    assert_eq!(
        signature::verify(
            SECRET.as_bytes(),
            &header,
            body,
            1_700_000_100,
            Duration::from_secs(300)
        ),
        Ok(())
    );
    assert_eq!(
        signature::verify(
            b"nope",
            &header,
            body,
            1_700_000_100,
            Duration::from_secs(300)
        ),
        Err(signature::SignatureError::Mismatch)
    );
}
