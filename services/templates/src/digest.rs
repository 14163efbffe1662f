//! The email digest's texts: the `digest` template of the templates folder when there is
//! one (per locale, with fallback, like any template), otherwise a built-in one.
//!
//! A `digest.toml` defines `email.subject`, `email.text` and `email.html` (or `title` and
//! `body`, used for the subject and text when the email fields are absent), rendered with:
//! `count` (notifications listed), `frequency` (`hourly` or `daily`), `period_end` (the
//! period's end in the user's time zone, `YYYY-MM-DD HH:MM`), and `items`, each with
//! `id`, `title`, `body`, `category` and `created_at`.
//!
//! ```toml
//! [default]
//! email.subject = "{{ count }} notifications you missed"
//! email.text = "{% for n in items %}- {{ n.title }}\n{% endfor %}"
//! email.html = "<ul>{% for n in items %}<li>{{ n.title }}</li>{% endfor %}</ul>"
//! ```

use crate::Templates;
use herald_protocol::FieldError;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};

/// The template name the digest uses.
pub const DIGEST_TEMPLATE: &str = "digest";

const BUILTIN_SUBJECT: &str = "{{ count }} notification{% if count != 1 %}s{% endif %} you missed";
const BUILTIN_TEXT: &str = "You have {{ count }} notification{% if count != 1 %}s{% endif %} \
you have not seen yet:\n\n{% for n in items %}- {{ n.title or n.body or \"(no title)\" }}\
{% if n.title and n.body %}\n  {{ n.body }}{% endif %}\n{% endfor %}";
const BUILTIN_HTML: &str = "<!doctype html><html><body><p>You have {{ count }} \
notification{% if count != 1 %}s{% endif %} you have not seen yet:</p><ul>\
{% for n in items %}<li><b>{{ n.title or n.body or \"(no title)\" }}</b>\
{% if n.title and n.body %}<br>{{ n.body }}{% endif %}</li>{% endfor %}</ul></body></html>";

/// What a digest email says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestTexts {
    /// Subject.
    pub subject: String,
    /// Plain-text part.
    pub text: String,
    /// HTML part (escaped by the template engine).
    pub html: String,
}

impl Templates {
    /// Renders the digest email for a recipient whose locale is `locale`, with `vars` as
    /// described in the module docs.
    ///
    /// # Errors
    /// [`FieldError`] when the configured `digest` template fails to render (e.g. it
    /// uses a variable the digest does not provide).
    pub fn render_digest(
        &self,
        locale: Option<&str>,
        vars: &Map<String, Value>,
    ) -> Result<DigestTexts, FieldError> {
        let mut texts = if self.names().iter().any(|n| n == DIGEST_TEMPLATE) {
            let (_, t) = self.render_fields(
                DIGEST_TEMPLATE,
                locale,
                vars,
                &["title", "body", "email.subject", "email.text", "email.html"],
            )?;
            t
        } else {
            Default::default()
        };
        let builtin = |name: &str, source: &str| -> Result<String, FieldError> {
            let mut env = Environment::new();
            env.set_undefined_behavior(UndefinedBehavior::Lenient);
            env.add_template_owned(name.to_owned(), source.to_owned())
                .and_then(|()| env.get_template(name)?.render(Value::Object(vars.clone())))
                .map_err(|e| FieldError::new("template", format!("built-in digest: {e}")))
        };
        let subject = match texts
            .remove("email.subject")
            .or_else(|| texts.remove("title"))
        {
            Some(s) => s,
            None => builtin("subject.txt", BUILTIN_SUBJECT)?,
        };
        let text = match texts.remove("email.text").or_else(|| texts.remove("body")) {
            Some(t) => t,
            None => builtin("text.txt", BUILTIN_TEXT)?,
        };
        let html = match texts.remove("email.html") {
            Some(h) => h,
            None => builtin("digest.html", BUILTIN_HTML)?,
        };
        Ok(DigestTexts {
            subject: subject.trim().to_owned(),
            text,
            html,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars() -> Map<String, Value> {
        let Value::Object(map) = json!({
            "count": 2, "frequency": "hourly", "period_end": "2026-05-01 13:00",
            "items": [
                {"id": "a", "title": "Bob <liked> your photo", "body": null, "category": "like", "created_at": "x"},
                {"id": "b", "title": "New comment", "body": "Nice & sunny", "category": null, "created_at": "y"}
            ]
        }) else {
            unreachable!("an object")
        };
        map
    }

    #[test]
    fn the_builtin_digest_lists_every_item_and_escapes_html() {
        let t = Templates::none()
            .render_digest(None, &vars())
            .expect("renders");
        assert_eq!(t.subject, "2 notifications you missed");
        assert!(t.text.contains("- Bob <liked> your photo\n"), "{}", t.text);
        assert!(
            t.text.contains("- New comment\n  Nice & sunny"),
            "{}",
            t.text
        );
        assert!(
            t.html.contains("<b>Bob &lt;liked&gt; your photo</b>"),
            "{}",
            t.html
        );
        assert!(t.html.contains("Nice &amp; sunny"), "{}", t.html);
    }

    #[test]
    fn a_configured_digest_template_is_used_per_locale() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("digest.toml"),
            r#"[default]
email.subject = "{{ count }} missed"
email.html = "<ul>{% for n in items %}<li>{{ n.title }}</li>{% endfor %}</ul>"
[de]
email.subject = "{{ count }} verpasst"
"#,
        )
        .expect("write");
        let templates = Templates::load(dir.path()).expect("loads");
        let de = templates
            .render_digest(Some("de-AT"), &vars())
            .expect("renders");
        assert_eq!(de.subject, "2 verpasst");
        assert!(
            de.html.contains("<li>Bob &lt;liked&gt; your photo</li>"),
            "{}",
            de.html
        );
        // No text defined anywhere: the built-in text.
        assert!(de.text.contains("- New comment"), "{}", de.text);
        let en = templates
            .render_digest(Some("en"), &vars())
            .expect("renders");
        assert_eq!(en.subject, "2 missed");
    }
}
