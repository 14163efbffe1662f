//! Twilio and Vonage against their fakes, and E.164 validation before either is called.

use crate::common::{ENDLESS_BODY_BUDGET, EndlessBody, class, delivery, http};
use herald_channels::twilio::{TwilioConfig, TwilioProvider};
use herald_channels::vonage::{VonageConfig, VonageProvider};
use herald_channels::{Provider, SendError, Target};
use herald_fakes::Reply;
use herald_fakes::twilio::{TwilioFake, error_reply};
use herald_fakes::vonage::{VonageFake, status_reply};
use herald_protocol::Channel;
use serde_json::json;
use std::time::Duration;

const FROM: &str = "+15005550006";
const TO: &str = "+4915112345678";

fn phone(e164: &str) -> Target {
    Target::Phone { e164: e164.into() }
}

async fn twilio() -> (TwilioFake, TwilioProvider) {
    let fake = TwilioFake::start().await.expect("fake twilio starts");
    let provider = twilio_with_token(&fake, fake.auth_token());
    (fake, provider)
}

fn twilio_with_token(fake: &TwilioFake, token: &str) -> TwilioProvider {
    TwilioProvider::new(&TwilioConfig {
        base_url: fake.url(),
        account_sid: fake.account_sid().into(),
        auth_token: token.into(),
        from: FROM.into(),
        http: http(None),
    })
    .expect("provider builds")
}

async fn vonage() -> (VonageFake, VonageProvider) {
    let fake = VonageFake::start().await.expect("fake vonage starts");
    let provider = vonage_with_secret(&fake, fake.api_secret());
    (fake, provider)
}

fn vonage_with_secret(fake: &VonageFake, secret: &str) -> VonageProvider {
    VonageProvider::new(&VonageConfig {
        base_url: fake.url(),
        api_key: fake.api_key().into(),
        api_secret: secret.into(),
        from: "Herald".into(),
        http: http(None),
    })
    .expect("provider builds")
}

#[tokio::test]
async fn twilio_sends_a_form_with_basic_auth_and_returns_the_sid() {
    let (fake, provider) = twilio().await;
    let sent = provider
        .send(&delivery(Channel::Sms, phone(TO)))
        .await
        .expect("accepted");
    assert!(
        sent.provider_message_id
            .as_deref()
            .is_some_and(|s| s.starts_with("SM")),
        "{sent:?}"
    );
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 1);
    let form = &accepted[0].form;
    assert_eq!(form.get("To").map(String::as_str), Some(TO));
    assert_eq!(form.get("From").map(String::as_str), Some(FROM));
    assert_eq!(
        form.get("Body").map(String::as_str),
        Some("New like\nAda liked your photo")
    );
    provider
        .send(&delivery(Channel::Sms, phone(TO)))
        .await
        .expect("accepted");
    assert_eq!(
        fake.connections(),
        1,
        "the connection is kept alive and reused"
    );
}

#[tokio::test]
async fn phone_numbers_that_are_not_e164_never_reach_a_provider() {
    let (twilio_fake, twilio) = twilio().await;
    let (vonage_fake, vonage) = vonage().await;
    for bad in [
        "015112345678",
        "+49 151 12345678",
        "+0049151",
        "+1555",
        "+999123456789",
        "tel:+4915112345678",
    ] {
        for provider in [&twilio as &dyn Provider, &vonage] {
            let result = provider.send(&delivery(Channel::Sms, phone(bad))).await;
            assert_eq!(
                class(&result),
                "invalid-target",
                "{} {bad}: {result:?}",
                provider.name()
            );
        }
    }
    assert!(twilio_fake.received().is_empty());
    assert!(vonage_fake.received().is_empty());
}

#[tokio::test]
async fn twilio_error_codes_garbage_and_silence_are_classified() {
    let (fake, provider) = twilio().await;
    let cases: Vec<(Reply, &str)> = vec![
        (
            error_reply(400, 21211, "The 'To' number is not a valid phone number."),
            "invalid-target",
        ),
        (
            error_reply(400, 21614, "'To' number is not a valid mobile number"),
            "invalid-target",
        ),
        (
            error_reply(400, 21610, "Attempt to send to unsubscribed recipient"),
            "invalid-target",
        ),
        (error_reply(429, 20429, "Too Many Requests"), "throttled"),
        (
            error_reply(
                400,
                21408,
                "Permission to send an SMS has not been enabled for the region",
            ),
            "permanent",
        ),
        (error_reply(503, 20503, "Service unavailable"), "transient"),
        (Reply::raw(500, "<html>oops</html>"), "transient"),
        (Reply::raw(400, "nonsense"), "permanent"),
        (Reply::raw(201, "{\"no_sid\":true}"), "permanent"),
        (Reply::raw(201, vec![0xc3, 0x28]), "permanent"),
        (Reply::Hang, "transient"),
    ];
    for (reply, expected) in cases {
        let shown = format!("{reply:?}");
        fake.script().push(1, reply);
        let result = provider.send(&delivery(Channel::Sms, phone(TO))).await;
        assert_eq!(class(&result), expected, "{shown} gave {result:?}");
    }
    fake.script()
        .push(1, Reply::status(429).header("retry-after", "1"));
    let result = provider.send(&delivery(Channel::Sms, phone(TO))).await;
    assert!(
        matches!(result, Err(SendError::Throttled { retry_after: Some(d), .. }) if d == Duration::from_secs(1)),
        "{result:?}"
    );
}

#[tokio::test]
async fn twilio_wrong_credentials_count_against_the_provider() {
    let fake = TwilioFake::start().await.expect("fake twilio starts");
    let provider = twilio_with_token(&fake, "wrong");
    let result = provider.send(&delivery(Channel::Sms, phone(TO))).await;
    assert!(
        matches!(&result, Err(SendError::Transient { detail, .. })
            if detail.contains("20003") && detail.contains("credentials refused")),
        "{result:?}"
    );
}

#[tokio::test]
async fn vonage_sends_json_with_key_and_secret_and_returns_the_message_id() {
    let (fake, provider) = vonage().await;
    let push = delivery(Channel::Sms, phone(TO));
    let sent = provider.send(&push).await.expect("accepted");
    assert!(sent.provider_message_id.is_some());
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 1);
    let params = &accepted[0].params;
    assert_eq!(params["to"], json!(TO.trim_start_matches('+')));
    assert_eq!(params["from"], json!("Herald"));
    assert_eq!(params["text"], json!("New like\nAda liked your photo"));
    assert_eq!(params["client-ref"], json!(push.id));
}

#[tokio::test]
async fn vonage_status_codes_garbage_and_silence_are_classified() {
    let (fake, provider) = vonage().await;
    let cases: Vec<(Reply, &str)> = vec![
        (status_reply(1, "Throughput Rate Exceeded"), "throttled"),
        (status_reply(5, "Internal Error"), "transient"),
        (status_reply(9, "Partner quota exceeded"), "transient"),
        (
            status_reply(6, "Unroutable message - rejected"),
            "invalid-target",
        ),
        (status_reply(7, "Number barred"), "invalid-target"),
        (status_reply(12, "Message too long"), "permanent"),
        (
            Reply::json(
                200,
                &json!({"message-count": "2", "messages": [
                {"status": "0", "message-id": "A"}, {"status": "1", "error-text": "Throttled"}]}),
            ),
            // Part one is on its way: a retry would send it twice.
            "permanent",
        ),
        (
            Reply::json(200, &json!({"message-count": "0", "messages": []})),
            "permanent",
        ),
        (Reply::raw(200, "<xml/>"), "permanent"),
        (Reply::raw(500, "boom"), "transient"),
        (Reply::status(429).header("retry-after", "2"), "throttled"),
        // Our credentials or account, not the message (Vonage answers these with 200 and
        // a part status): the provider's circuit counts them.
        (status_reply(4, "Bad Credentials"), "transient"),
        (status_reply(8, "Partner Account Barred"), "transient"),
        (Reply::Hang, "transient"),
    ];
    for (reply, expected) in cases {
        let shown = format!("{reply:?}");
        fake.script().push(1, reply);
        let result = provider.send(&delivery(Channel::Sms, phone(TO))).await;
        assert_eq!(class(&result), expected, "{shown} gave {result:?}");
    }
}

/// A sender or account the provider refuses (`HERALD_TWILIO_FROM` not on the account, a
/// Vonage account not enabled for the API) fails every message alike: it counts against
/// the provider (transient, so its circuit opens and the channel fails over) instead of
/// dead-lettering each message as if the message were bad, and says what to check. A full
/// sender queue (Twilio 21611) is a throttle.
#[tokio::test]
async fn a_refused_sender_or_account_counts_against_the_provider() {
    let (fake, provider) = twilio().await;
    let cases = [
        (
            error_reply(
                400,
                21212,
                "The 'From' number +15005550006 is not a valid phone number",
            ),
            "HERALD_TWILIO_FROM",
        ),
        (
            error_reply(
                400,
                21606,
                "The 'From' phone number provided is not a valid message-capable Twilio phone number",
            ),
            "HERALD_TWILIO_FROM",
        ),
        (
            error_reply(
                400,
                21659,
                "'From' is not a Twilio phone number or Short Code country mismatch",
            ),
            "HERALD_TWILIO_FROM",
        ),
        (
            error_reply(404, 20404, "The requested resource was not found"),
            "HERALD_TWILIO_ACCOUNT_SID",
        ),
        (
            Reply::raw(404, "<html>not here</html>"),
            "HERALD_TWILIO_URL",
        ),
    ];
    for (reply, setting) in cases {
        let shown = format!("{reply:?}");
        fake.script().push(1, reply);
        let result = provider.send(&delivery(Channel::Sms, phone(TO))).await;
        assert!(
            matches!(&result, Err(SendError::Transient { detail, .. })
                if detail.contains("configuration") && detail.contains(setting)),
            "{shown} gave {result:?}"
        );
    }
    fake.script().push(
        1,
        error_reply(
            400,
            21611,
            "This 'From' number has exceeded the maximum number of queued messages",
        ),
    );
    let result = provider.send(&delivery(Channel::Sms, phone(TO))).await;
    assert_eq!(class(&result), "throttled", "{result:?}");

    let (fake, provider) = vonage().await;
    for (reply, setting) in [
        (
            status_reply(15, "Illegal Sender Address - rejected"),
            "HERALD_VONAGE_FROM",
        ),
        (status_reply(11, "Account not enabled for REST"), "API"),
        (Reply::raw(404, "not found"), "HERALD_VONAGE_URL"),
    ] {
        let shown = format!("{reply:?}");
        fake.script().push(1, reply);
        let result = provider.send(&delivery(Channel::Sms, phone(TO))).await;
        assert!(
            matches!(&result, Err(SendError::Transient { detail, .. })
                if detail.contains("configuration") && detail.contains(setting)),
            "{shown} gave {result:?}"
        );
    }
}

#[tokio::test]
async fn vonage_wrong_secret_is_retried_and_counts_against_the_provider() {
    let fake = VonageFake::start().await.expect("fake vonage starts");
    let provider = vonage_with_secret(&fake, "wrong");
    let result = provider.send(&delivery(Channel::Sms, phone(TO))).await;
    assert!(
        matches!(&result, Err(SendError::Transient { detail, .. })
            if detail.contains("status 4") && detail.contains("credentials refused")),
        "{result:?}"
    );
}

/// An endless answer (an error page, or a "success" that never ends) is read only up to a
/// bounded prefix by both SMS providers: a 5xx stays transient, a 2xx that cannot be read
/// whole is not retried (it may have been accepted).
#[tokio::test]
async fn sms_providers_read_only_a_bounded_prefix_of_an_endless_answer() {
    for (status, expected) in [(500, "transient"), (200, "permanent")] {
        let server = EndlessBody::start(status).await;
        let twilio = TwilioProvider::new(&TwilioConfig {
            base_url: server.url(""),
            account_sid: "AC0123".into(),
            auth_token: "token".into(),
            from: FROM.into(),
            http: http(None),
        })
        .expect("provider builds");
        let result = twilio.send(&delivery(Channel::Sms, phone(TO))).await;
        assert_eq!(class(&result), expected, "twilio {status}: {result:?}");
        let written = server.written_when_hung_up().await;
        assert!(
            written < ENDLESS_BODY_BUDGET,
            "twilio {status}: read {written} bytes"
        );

        let server = EndlessBody::start(status).await;
        let vonage = VonageProvider::new(&VonageConfig {
            base_url: server.url(""),
            api_key: "key".into(),
            api_secret: "secret".into(),
            from: "Herald".into(),
            http: http(None),
        })
        .expect("provider builds");
        let result = vonage.send(&delivery(Channel::Sms, phone(TO))).await;
        assert_eq!(class(&result), expected, "vonage {status}: {result:?}");
        let written = server.written_when_hung_up().await;
        assert!(
            written < ENDLESS_BODY_BUDGET,
            "vonage {status}: read {written} bytes"
        );
    }
}
