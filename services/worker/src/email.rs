//! The email provider: SMTP through lettre's pooled async transport, configured by one
//! URL (`smtp://user:pass@host:port`, `smtps://…`, `smtp://…?tls=required`) and a sender
//! address.
//!
//! Each notification becomes one multipart/alternative message whose text and HTML parts
//! come from the same title and body (HTML-escaped), with `Message-ID` derived from the
//! notification id (so a resend is recognisable as the same message), and, when the worker
//! provides an unsubscribe URL, `List-Unsubscribe` and `List-Unsubscribe-Post:
//! List-Unsubscribe=One-Click` (RFC 8058).
//!
//! SMTP replies map onto the error classes: 4xx and connection trouble are transient,
//! 5xx permanent, and 550/551/553 "mailbox unknown" answers mean the address is invalid.

use herald_channels::{Delivery, Provider, SendError, Sent, Target};
use herald_protocol::Channel;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use std::time::Duration;

/// The SMTP provider.
#[derive(Clone)]
pub struct SmtpProvider {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    domain: String,
}

impl std::fmt::Debug for SmtpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpProvider")
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

/// Bad SMTP configuration.
#[derive(Debug, thiserror::Error)]
pub enum SmtpConfigError {
    /// The URL does not parse or names an unknown scheme.
    #[error("smtp_url: {0}")]
    Url(String),
    /// The sender is not an email address.
    #[error("email_from: {0}")]
    From(String),
}

/// A URL with a user and password but no TLS (`smtp://user:pass@host` without `?tls=`)
/// would send the password in the clear: refused, unless the relay is on loopback.
fn refuse_cleartext_login(url: &str) -> Result<(), SmtpConfigError> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(()); // lettre reports the malformed URL
    };
    let has_login = !parsed.username().is_empty() || parsed.password().is_some();
    let tls = parsed.query_pairs().any(|(k, _)| k == "tls");
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        // `smtp` is not a scheme the URL standard knows, so an IP comes as a name.
        Some(url::Host::Domain(d)) => {
            d == "localhost"
                || d.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    };
    if parsed.scheme() == "smtp" && has_login && !tls && !loopback {
        return Err(SmtpConfigError::Url(
            "smtp:// with a user and password and no TLS would send the password in the clear: \
             use smtps://…:465, or add ?tls=required (STARTTLS)"
                .into(),
        ));
    }
    Ok(())
}

impl SmtpProvider {
    /// A provider sending through `url` as `from`, with up to `pool_size` connections.
    ///
    /// # Errors
    /// [`SmtpConfigError`] when the URL or the sender is invalid.
    pub fn new(url: &str, from: &str, pool_size: u32) -> Result<Self, SmtpConfigError> {
        let from: Mailbox = from
            .parse()
            .map_err(|e: lettre::address::AddressError| SmtpConfigError::From(e.to_string()))?;
        refuse_cleartext_login(url)?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| SmtpConfigError::Url(e.to_string()))?
            .timeout(Some(Duration::from_secs(10)))
            .pool_config(PoolConfig::new().max_size(pool_size.max(1)))
            .build();
        let domain = from.email.domain().to_string();
        Ok(Self {
            transport,
            from,
            domain,
        })
    }

    /// Checks a configuration without connecting (and without a runtime).
    ///
    /// # Errors
    /// [`SmtpConfigError`] when the URL or the sender is invalid.
    pub fn check(url: &str, from: &str) -> Result<(), SmtpConfigError> {
        from.parse::<Mailbox>()
            .map_err(|e| SmtpConfigError::From(e.to_string()))?;
        AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| SmtpConfigError::Url(e.to_string()))?;
        Ok(())
    }

    /// The message for one delivery.
    ///
    /// # Errors
    /// [`SendError::InvalidTarget`] when the address does not parse;
    /// [`SendError::Permanent`] when the message cannot be built.
    pub fn message(&self, delivery: &Delivery) -> Result<Message, SendError> {
        let Target::Email { address } = &delivery.target else {
            return Err(SendError::Permanent {
                detail: "the email provider only sends to email targets".into(),
            });
        };
        let to: Mailbox = address.parse().map_err(
            // Not the address itself: the detail reaches logs, the delivery status
            // producers read, and the dead-letter queue; contact data stays sealed.
            |e: lettre::address::AddressError| SendError::InvalidTarget {
                detail: format!("the address is not valid: {e}"),
            },
        )?;
        let subject = delivery
            .title
            .clone()
            .or_else(|| delivery.body.as_ref().map(|b| b.chars().take(78).collect()))
            .unwrap_or_else(|| "Notification".into());
        let (text, html) = render(delivery);
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{}@{}>", delivery.id, self.domain)));
        if let Some(url) = &delivery.unsubscribe_url {
            builder = builder
                .raw_header(header("List-Unsubscribe", format!("<{url}>"))?)
                .raw_header(header(
                    "List-Unsubscribe-Post",
                    "List-Unsubscribe=One-Click".into(),
                )?);
        }
        builder
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|e| SendError::Permanent {
                detail: format!("building the message: {e}"),
            })
    }
}

fn header(name: &str, value: String) -> Result<HeaderValue, SendError> {
    let name = HeaderName::new_from_ascii(name.to_string()).map_err(|e| SendError::Permanent {
        detail: format!("header {name}: {e}"),
    })?;
    Ok(HeaderValue::new(name, value))
}

/// Text and HTML bodies from the same content, or the HTML a template rendered (an email
/// digest: the text is then the body alone, the title being the subject).
pub fn render(delivery: &Delivery) -> (String, String) {
    if let Some(html) = &delivery.html {
        let mut text = delivery.body.clone().unwrap_or_default();
        let mut html = html.clone();
        if let Some(url) = &delivery.unsubscribe_url {
            text.push_str(&format!("\n--\nUnsubscribe: {url}\n"));
            let link = format!(
                "<hr><p><a href=\"{}\">Unsubscribe</a></p>",
                html_escape::encode_double_quoted_attribute(url)
            );
            match html.rfind("</body>") {
                Some(at) => html.insert_str(at, &link),
                None => html.push_str(&link),
            }
        }
        return (text, html);
    }
    let title = delivery.title.as_deref().unwrap_or_default();
    let body = delivery.body.as_deref().unwrap_or_default();
    let mut text = String::new();
    let mut html = String::from("<!doctype html><html><body>");
    if !title.is_empty() {
        text.push_str(title);
        text.push_str("\n\n");
        html.push_str(&format!("<h1>{}</h1>", html_escape::encode_text(title)));
    }
    if !body.is_empty() {
        text.push_str(body);
        text.push('\n');
        for para in body.split("\n\n") {
            let escaped = html_escape::encode_text(para).replace('\n', "<br>");
            html.push_str(&format!("<p>{escaped}</p>"));
        }
    }
    if let Some(url) = &delivery.unsubscribe_url {
        text.push_str(&format!("\n--\nUnsubscribe: {url}\n"));
        html.push_str(&format!(
            "<hr><p><a href=\"{}\">Unsubscribe</a></p>",
            html_escape::encode_double_quoted_attribute(url)
        ));
    }
    html.push_str("</body></html>");
    (text, html)
}

/// The class of an SMTP failure.
pub fn classify(e: &lettre::transport::smtp::Error) -> SendError {
    let detail: String = e.to_string().chars().take(500).collect();
    let code = e.status().map(|c| c.to_string()).unwrap_or_default();
    classify_answer(e.is_permanent(), &code, detail)
}

/// [`classify`] by the answer's parts: whether it is permanent (5xx), its reply code
/// (empty when there was no answer) and its text.
fn classify_answer(permanent: bool, code: &str, detail: String) -> SendError {
    let enhanced = enhanced_code(&detail);
    let lower = detail.to_ascii_lowercase();
    let says_rate = ["rate", "too many", "throttl", "quota"]
        .iter()
        .any(|m| lower.contains(m));
    let says_auth = ["auth", "credential", "password"]
        .iter()
        .any(|m| lower.contains(m));
    // Our login refused (530/535, 5.7.8, 4.7.8; a 454 or 4.7.0/5.7.0 that says so): every
    // message fails alike until the configuration is fixed; retried and counted by the
    // circuit, never dead-lettered at once. Amazon SES answers 454 for its throttling too
    // ("Throttling failure: Maximum sending rate exceeded"), and Postfix for TLS trouble:
    // a 454 is our credentials only when it says so.
    if matches!(code, "530" | "535")
        || (code == "454" || matches!(enhanced, Some("5.7.8" | "4.7.8" | "5.7.0" | "4.7.0")))
            && says_auth
            && !says_rate
    {
        return SendError::transient(format!(
            "{detail} (credentials refused: check the SMTP user and password)"
        ));
    }
    if !permanent {
        // A rate limit (a 454 or 421/450/451 saying so, or 4.7.x other than a 454's) is
        // throttling: retried later, not counted against the relay's health.
        let throttled = if code == "454" {
            says_rate
        } else {
            enhanced.is_some_and(|c| c.starts_with("4.7."))
                || (matches!(code, "421" | "450" | "451") && says_rate)
        };
        if throttled {
            return SendError::Throttled {
                retry_after: None,
                detail,
            };
        }
        // 4xx, timeouts, refused connections, TLS trouble: may pass.
        return SendError::transient(detail);
    }
    if mailbox_unknown(code, &detail) {
        SendError::InvalidTarget { detail }
    } else if relay_refuses_us(&detail) {
        // Every user's mail fails the same way until an operator acts: counted by the
        // circuit (which opens, and the channel holds its jobs at the gate) instead of
        // dead-lettering the whole backlog at full speed, one job after another.
        SendError::transient(format!(
            "{detail} (the relay refuses our mail: check relay permissions, the sender address and SPF/DKIM/DMARC)"
        ))
    } else {
        SendError::Permanent { detail }
    }
}

/// Whether a permanent answer refuses *us* rather than this message: relaying denied,
/// our sender address refused (5.1.7, 5.1.8), or our domain failing sender
/// authentication (5.7.23 SPF, 5.7.25 reverse DNS, 5.7.26 DMARC/DKIM, 5.7.27 null MX of
/// the sender's domain; RFC 7372). A message refused for what it says (5.7.1 spam) is not.
fn relay_refuses_us(detail: &str) -> bool {
    if matches!(
        enhanced_code(detail),
        Some("5.1.7" | "5.1.8" | "5.7.23" | "5.7.25" | "5.7.26" | "5.7.27")
    ) {
        return true;
    }
    let lower = detail.to_ascii_lowercase();
    [
        "relay access denied",
        "relaying denied",
        "relay not permitted",
        "not permitted to relay",
        "unable to relay",
    ]
    .iter()
    .any(|m| lower.contains(m))
}

/// Whether a permanent (5xx) answer says the recipient's mailbox does not exist — the
/// only answer that removes a user's address. A relay that blocks us (5.7.x), refuses
/// our sender (5.1.7, 5.1.8) or fails for any other reason says nothing about the
/// address, and every user's mail would fail the same way: those are dead-lettered,
/// never taken as a bad address.
///
/// An enhanced status code (RFC 3463), when the answer has one, decides: 5.1.1 (no such
/// mailbox), 5.1.2 (no such domain) and 5.1.10 (the domain takes no mail, RFC 7505).
/// Without one, a 550/551/553 whose text says the user is unknown.
fn mailbox_unknown(code: &str, detail: &str) -> bool {
    if let Some(enhanced) = enhanced_code(detail).filter(|c| c.starts_with("5.")) {
        return matches!(enhanced, "5.1.1" | "5.1.2" | "5.1.10");
    }
    let lower = detail.to_lowercase();
    matches!(code, "550" | "551" | "553")
        && [
            "user unknown",
            "unknown user",
            "no such user",
            "no such mailbox",
            "mailbox not found",
            "does not exist",
            "recipient not found",
            "address rejected: user",
        ]
        .iter()
        .any(|m| lower.contains(m))
}

/// The first enhanced status code (`5.x.y` or `4.x.y`, RFC 3463) in an SMTP answer's
/// text.
fn enhanced_code(text: &str) -> Option<&str> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|t| t.trim_end_matches('.'))
        .find(|t| {
            let mut parts = t.split('.');
            matches!(parts.next(), Some("5" | "4"))
                && parts
                    .by_ref()
                    .take(2)
                    .filter(|p| (1..=3).contains(&p.len()))
                    .count()
                    == 2
                && parts.next().is_none()
        })
}

#[async_trait::async_trait]
impl Provider for SmtpProvider {
    fn name(&self) -> &str {
        "smtp"
    }

    fn channel(&self) -> Channel {
        Channel::Email
    }

    fn accepts(&self, target: &Target) -> bool {
        matches!(target, Target::Email { .. })
    }

    async fn send(&self, delivery: &Delivery) -> Result<Sent, SendError> {
        let message = self.message(delivery)?;
        let response = self
            .transport
            .send(message)
            .await
            .map_err(|e| classify(&e))?;
        // Servers answer "250 2.0.0 Ok: queued as <queue id>"; the queue id is their id.
        let text = response.message().collect::<Vec<_>>().join(" ");
        let provider_message_id = text
            .rsplit_once("queued as ")
            .map(|(_, id)| id.trim().to_string())
            .or_else(|| Some(format!("<{}@{}>", delivery.id, self.domain)));
        Ok(Sent {
            provider_message_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::{Priority, UserId};

    fn delivery(target: Target) -> Delivery {
        Delivery {
            id: "0193-abc".into(),
            seq: 7,
            user_id: UserId::new("ann").expect("valid"),
            channel: Channel::Email,
            priority: Priority::Normal,
            category: Some("like".into()),
            title: Some("Bob <liked> your photo".into()),
            body: Some("Nice & sunny\nsecond line".into()),
            data: Default::default(),
            collapse_key: None,
            expires_at: None,
            target,
            unsubscribe_url: Some("https://h.example/v1/unsubscribe?token=a.b".into()),
            html: None,
        }
    }

    // The pooled transport starts its pool on the runtime.
    #[tokio::test]
    async fn the_message_is_multipart_with_unsubscribe_headers_and_our_id() {
        let p = SmtpProvider::new(
            "smtp://127.0.0.1:2525",
            "Herald <noreply@herald.example>",
            2,
        )
        .expect("config");
        let m = p
            .message(&delivery(Target::Email {
                address: "ann@example.com".into(),
            }))
            .expect("message");
        let raw = String::from_utf8(m.formatted()).expect("utf8");
        assert!(
            raw.contains("Message-ID: <0193-abc@herald.example>"),
            "{raw}"
        );
        assert!(
            raw.contains("List-Unsubscribe: <https://h.example/v1/unsubscribe?token=a.b>"),
            "{raw}"
        );
        assert!(
            raw.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
            "{raw}"
        );
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("Bob &lt;liked&gt; your photo"), "{raw}");
        // The HTML part is quoted-printable (soft line breaks); check the rendering itself.
        let (text, html) = render(&delivery(Target::Email {
            address: "ann@example.com".into(),
        }));
        assert!(
            html.contains("<p>Nice &amp; sunny<br>second line</p>"),
            "{html}"
        );
        assert!(text.contains("Nice & sunny\nsecond line"), "{text}");
    }

    #[tokio::test]
    async fn a_malformed_address_is_an_invalid_target() {
        let p = SmtpProvider::new("smtp://127.0.0.1:2525", "noreply@herald.example", 2)
            .expect("config");
        let err = p
            .message(&delivery(Target::Email {
                address: "not an address".into(),
            }))
            .expect_err("invalid");
        assert!(matches!(err, SendError::InvalidTarget { .. }), "{err:?}");
    }

    #[test]
    fn only_an_unknown_mailbox_removes_the_address() {
        let unknown = [
            (
                "550",
                "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown",
            ),
            (
                "550",
                "550-5.1.1 The email account that you tried to reach does not exist.",
            ),
            (
                "550",
                "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
            ),
            ("553", "553 5.1.2 the recipient's domain does not exist"),
            ("550", "550 No such user here"),
            ("550", "550 Requested action not taken: user unknown"),
        ];
        for (code, text) in unknown {
            assert!(mailbox_unknown(code, text), "{text}");
        }
        let not_the_address = [
            (
                "550",
                "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP",
            ),
            (
                "553",
                "553 5.1.8 <noreply@herald.example>: Sender address rejected: Domain not found",
            ),
            ("550", "550 5.7.1 Relaying denied"),
            (
                "554",
                "554 5.7.1 Message rejected as spam; does not exist in our allow list",
            ),
            ("550", "550 5.1.7 Invalid sender address, user unknown"),
            ("552", "552 5.3.4 Message size exceeds fixed limit"),
            ("550", "550 Service unavailable"),
            ("550", "550 Access denied"),
        ];
        for (code, text) in not_the_address {
            assert!(!mailbox_unknown(code, text), "{text}");
        }
    }

    #[test]
    fn enhanced_codes_are_found_in_answers() {
        assert_eq!(enhanced_code("550 5.1.1 <a@b>: no"), Some("5.1.1"));
        assert_eq!(enhanced_code("550-5.7.26 Unauthenticated"), Some("5.7.26"));
        assert_eq!(enhanced_code("550 5.1.10 RESOLVER"), Some("5.1.10"));
        assert_eq!(enhanced_code("550 version 5.1 of 2020."), None);
        assert_eq!(enhanced_code("550 No such user"), None);
    }

    #[tokio::test]
    async fn bad_configuration_is_reported() {
        assert!(SmtpProvider::new("http://x", "a@b.c", 1).is_err());
        assert!(SmtpProvider::new("smtp://x:25", "not-an-address", 1).is_err());
        // A password over a connection without TLS, to another machine.
        let cleartext = SmtpProvider::new("smtp://u:p@mail.example.com:587", "a@b.c", 1);
        assert!(
            matches!(&cleartext, Err(SmtpConfigError::Url(m)) if m.contains("tls=required")),
            "{:?}",
            cleartext.err()
        );
        for ok in [
            "smtp://u:p@mail.example.com:587?tls=required",
            "smtps://u:p@mail.example.com:465",
            "smtp://u:p@127.0.0.1:2525",
            "smtp://mail.example.com:25",
        ] {
            let made = SmtpProvider::new(ok, "a@b.c", 1);
            assert!(made.is_ok(), "{ok}: {:?}", made.err());
        }
    }

    #[test]
    fn refused_logins_and_rate_limits_have_their_own_class() {
        let class = |permanent, code: &str, text: &str| match classify_answer(
            permanent,
            code,
            text.to_owned(),
        ) {
            SendError::Transient { detail, .. } if detail.contains("credentials refused") => {
                "credentials"
            }
            SendError::Transient { .. } => "transient",
            SendError::Throttled { .. } => "throttled",
            SendError::Permanent { .. } => "permanent",
            SendError::InvalidTarget { .. } => "invalid-target",
        };
        assert_eq!(
            class(true, "535", "535 5.7.8 Authentication credentials invalid"),
            "credentials"
        );
        assert_eq!(
            class(true, "530", "530 5.7.0 Authentication required"),
            "credentials"
        );
        assert_eq!(
            class(
                false,
                "451",
                "451 4.7.1 Rate limit exceeded, try again later"
            ),
            "throttled"
        );
        assert_eq!(
            class(false, "421", "421 Too many connections from your IP"),
            "throttled"
        );
        assert_eq!(
            class(false, "451", "451 4.3.0 Try again later"),
            "transient"
        );
        assert_eq!(class(false, "", "connection refused"), "transient");
        // 454: Amazon SES throttling, Postfix's TLS trouble, or really our login.
        for (text, expected) in [
            (
                "454 Throttling failure: Maximum sending rate exceeded.",
                "throttled",
            ),
            (
                "454 Throttling failure: Daily message quota exceeded.",
                "throttled",
            ),
            (
                "454 4.7.0 TLS not available due to local problem",
                "transient",
            ),
            ("454 4.7.0 Temporary authentication failure", "credentials"),
        ] {
            assert_eq!(class(false, "454", text), expected, "{text}");
        }
        assert_eq!(
            class(true, "550", "550 5.1.1 <a@b>: User unknown"),
            "invalid-target"
        );
        assert_eq!(
            class(true, "550", "550 5.7.1 Message rejected as spam"),
            "permanent"
        );
        // The relay refusing us, not this message: counted by the circuit, retried.
        for refused in [
            "554 5.7.1 <x@y.z>: Relay access denied",
            "550 5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy",
            "553 5.1.8 <noreply@example.com>: Sender address rejected: Domain not found",
            "550 Relaying denied",
        ] {
            assert_eq!(
                class(true, &refused[..3], refused),
                "transient",
                "{refused}"
            );
        }
    }
}
