//! The digest email, bounded so that its job fits the email work queue.
//!
//! A digest job carries the whole rendered email (the notifications it lists may be gone
//! from the inbox by the time a worker sends it), and the email work stream refuses a
//! message over its maximum size (64 KiB). Without a bound, a busy period — dozens of
//! notifications with bodies of up to 16 KiB, each in the text and the HTML part — makes
//! a job JetStream can never take. So the email lists at most [`MAX_ITEMS`] of the
//! newest notifications, each title and body shortened, says how many more the inbox
//! holds, and lists fewer still while the job would not fit.

use herald_protocol::FieldError;
use herald_protocol::digest::{DigestEntry, DigestMail};
use herald_templates::DIGEST_TEMPLATE;
use herald_templates::Templates;
use serde_json::{Value, json};

/// Most notifications one digest email lists; the rest are counted and left to the inbox.
pub(crate) const MAX_ITEMS: usize = 50;
/// Longest title listed, in characters.
const TITLE_CHARS: usize = 200;
/// Longest body listed, in characters.
const BODY_CHARS: usize = 300;

/// What a digest period's email is built from.
pub(crate) struct DigestInput<'a> {
    /// The user's locale.
    pub locale: Option<&'a str>,
    /// `hourly` or `daily`.
    pub frequency: &'a str,
    /// The period's end in the user's time zone.
    pub period_end: String,
    /// What the email is about, oldest first.
    pub unread: &'a [&'a DigestEntry],
}

/// Renders the digest of `input` with `templates`, listing fewer notifications while
/// `fits` says the email is too big for its job, down to none; a configured `digest`
/// template that is still too big then gives way to the built-in one. The result may
/// still not fit (a work queue configured smaller than any email): the publish says so.
///
/// # Errors
/// [`FieldError`] when even the built-in template fails to render.
pub(crate) fn build(
    templates: &Templates,
    input: &DigestInput<'_>,
    fits: impl Fn(&DigestMail) -> bool,
) -> Result<DigestMail, FieldError> {
    let builtin = Templates::none();
    let mut current = templates;
    let total = input.unread.len();
    let mut shown = total.min(MAX_ITEMS);
    loop {
        let listed = &input.unread[total - shown..];
        let mail = match render(current, input, listed, total) {
            Ok(mail) => mail,
            // A broken `digest` template must not swallow the digest: the built-in one.
            Err(e) if !std::ptr::eq(current, &builtin) => {
                tracing::warn!(error = %e.message, "the digest template failed; using the built-in one");
                current = &builtin;
                shown = total.min(MAX_ITEMS);
                continue;
            }
            Err(e) => return Err(e),
        };
        if fits(&mail) {
            return Ok(mail);
        }
        if shown > 0 {
            shown /= 2;
        } else if !std::ptr::eq(current, &builtin) {
            tracing::warn!(
                "the digest template renders an email too big for the email work queue even without items; using the built-in one"
            );
            current = &builtin;
            shown = total.min(MAX_ITEMS);
        } else {
            return Ok(mail);
        }
    }
}

fn render(
    templates: &Templates,
    input: &DigestInput<'_>,
    listed: &[&DigestEntry],
    total: usize,
) -> Result<DigestMail, FieldError> {
    let more = total - listed.len();
    let items: Vec<Value> = listed
        .iter()
        .map(|e| {
            json!({"id": e.id,
                   "title": e.title.as_deref().map(|t| shorten(t, TITLE_CHARS)),
                   "body": e.body.as_deref().map(|b| shorten(b, BODY_CHARS)),
                   "category": e.category, "created_at": e.created_at})
        })
        .collect();
    let vars = json!({
        "count": total,
        "listed": listed.len(),
        "more": more,
        "frequency": input.frequency,
        "period_end": input.period_end,
        "items": items,
    });
    let Value::Object(vars) = vars else {
        unreachable!("json! of an object literal is an object")
    };
    let mut texts = templates.render_digest(input.locale, &vars)?;
    // The built-in texts know nothing of what is left out; a configured template is
    // given `more` and says it in its own words.
    if more > 0 && !templates.names().iter().any(|n| n == DIGEST_TEMPLATE) {
        let line = format!(
            "…and {more} more notification{}: open your inbox to see them all.",
            if more == 1 { "" } else { "s" }
        );
        texts.text = format!("{}\n{line}\n", texts.text.trim_end());
        let para = format!("<p>{line}</p>");
        texts.html = match texts.html.rfind("</body>") {
            Some(at) => format!("{}{para}{}", &texts.html[..at], &texts.html[at..]),
            None => format!("{}{para}", texts.html),
        };
    }
    Ok(DigestMail {
        subject: texts.subject,
        text: texts.text,
        html: texts.html,
        count: total as u64,
    })
}

/// `text` cut to at most `chars` characters, ending with `…` when cut.
fn shorten(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        None => text.to_owned(),
        Some(_) => {
            let cut = text
                .char_indices()
                .nth(chars.saturating_sub(1))
                .map_or(text.len(), |(at, _)| at);
            format!("{}…", text[..cut].trim_end())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize, body: &str) -> DigestEntry {
        DigestEntry {
            id: format!("id-{n}"),
            seq: n as u64,
            period_end: "2026-05-01T13:00:00Z".into(),
            title: Some(format!("title {n}")),
            body: Some(body.to_owned()),
            category: None,
            created_at: "2026-05-01T12:00:00Z".into(),
        }
    }

    fn input<'a>(unread: &'a [&'a DigestEntry]) -> DigestInput<'a> {
        DigestInput {
            locale: None,
            frequency: "hourly",
            period_end: "2026-05-01 13:00".into(),
            unread,
        }
    }

    #[test]
    fn a_long_period_lists_the_newest_shortened_and_counts_the_rest() {
        let body = "x".repeat(16 * 1024);
        let entries: Vec<DigestEntry> = (1..=80).map(|n| entry(n, &body)).collect();
        let unread: Vec<&DigestEntry> = entries.iter().collect();
        let mail = build(&Templates::none(), &input(&unread), |_| true).expect("renders");
        assert_eq!(mail.count, 80);
        assert!(mail.subject.contains("80"), "{}", mail.subject);
        assert!(mail.text.contains("title 80") && mail.text.contains("title 31"));
        assert!(!mail.text.contains("title 30\n"), "only the newest 50");
        assert!(
            mail.text.contains("…and 30 more notifications"),
            "{}",
            mail.text
        );
        assert!(mail.html.contains("…and 30 more notifications"));
        assert!(
            mail.text.len() < 50 * (BODY_CHARS + 100) + 500,
            "bodies shortened"
        );
    }

    #[test]
    fn fewer_are_listed_until_the_email_fits() {
        let body = "y".repeat(BODY_CHARS);
        let entries: Vec<DigestEntry> = (1..=50).map(|n| entry(n, &body)).collect();
        let unread: Vec<&DigestEntry> = entries.iter().collect();
        let limit = 4_000;
        let mail = build(&Templates::none(), &input(&unread), |m| {
            m.text.len() + m.html.len() <= limit
        })
        .expect("renders");
        assert!(mail.text.len() + mail.html.len() <= limit);
        assert_eq!(mail.count, 50);
        assert!(mail.text.contains("title 50"), "the newest stays listed");
        assert!(mail.text.contains("more notifications"));
    }

    #[test]
    fn shortening_cuts_at_characters() {
        assert_eq!(shorten("héllo", 10), "héllo");
        assert_eq!(shorten("héllo wörld", 5), "héll…");
        assert_eq!(shorten("ab cd", 4), "ab…");
    }
}
