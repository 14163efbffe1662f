//! Named notification templates: one TOML file per template in a templates folder, a
//! table per locale, a text per channel, rendered with minijinja.
//!
//! ```toml
//! # templates/order_shipped.toml
//! [default]
//! title = "Your order {{ order }} shipped"
//! body = "It arrives {{ eta }}."
//! push.title = "Shipped!"
//! email.subject = "Order {{ order }} shipped"
//! email.html = "<p>Order <b>{{ order }}</b> arrives {{ eta }}.</p>"
//! sms.text = "Order {{ order }} shipped, ETA {{ eta }}"
//! # for notifications folded by `group_key`: `count`, `others`, `actors`, `actor` added
//! group.title = "{{ actor }} and {{ others }} others liked your photo"
//!
//! [de]
//! title = "Deine Bestellung {{ order }} ist unterwegs"
//! ```
//!
//! Why this shape: producers send a template name and variables, never text per channel,
//! so copy changes need no deploy of theirs. A locale is chosen from the recipient's
//! preferences with fallback (`de-AT` → `de` → `default`), field by field. Missing
//! variables are caught before anything renders (400 naming `vars.<name>`), and rendering
//! is strict, so no half-rendered message ever leaves. HTML is auto-escaped.
//!
//! [`Templates`] holds the loaded set and swaps in a new one on [`Templates::reload`];
//! a folder with errors is refused whole and the previous set stays.

mod digest;
mod load;

pub use digest::{DIGEST_TEMPLATE, DigestTexts};

pub use load::LoadError;

use herald_protocol::locale::{Localized, locale_chain};
use herald_protocol::{FieldError, Rendered};
use minijinja::Environment;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The texts a template may define, per locale.
pub const FIELDS: [&str; 10] = [
    "title",
    "body",
    "push.title",
    "push.body",
    "email.subject",
    "email.text",
    "email.html",
    "sms.text",
    "group.title",
    "group.body",
];

/// The fields rendered for an aggregation group (with the group's variables), not for a
/// single notification.
pub const GROUP_FIELDS: [&str; 2] = ["group.title", "group.body"];

/// The locale every template must define.
pub use herald_protocol::locale::DEFAULT_LOCALE;

/// One loaded set of templates.
#[derive(Debug, Default)]
struct TemplateSet {
    env: Environment<'static>,
    /// template name → locale → fields defined there.
    index: BTreeMap<String, BTreeMap<String, Vec<&'static str>>>,
}

/// The templates in use, reloadable while serving.
#[derive(Debug)]
pub struct Templates {
    dir: Option<PathBuf>,
    current: RwLock<Arc<TemplateSet>>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::none()
    }
}

impl Templates {
    /// No templates: every notify must carry its own title or body.
    pub fn none() -> Self {
        Self {
            dir: None,
            current: RwLock::new(Arc::new(TemplateSet::default())),
        }
    }

    /// Loads every `*.toml` in `dir`.
    ///
    /// # Errors
    /// [`LoadError`] listing every problem in every file.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let set = load::load_dir(dir)?;
        Ok(Self {
            dir: Some(dir.to_owned()),
            current: RwLock::new(Arc::new(set)),
        })
    }

    /// Reads the folder again; on success the new set serves the next render. Returns the
    /// number of templates now loaded.
    ///
    /// # Errors
    /// [`LoadError`] when the folder has problems; the previous set stays in use.
    pub fn reload(&self) -> Result<usize, LoadError> {
        let Some(dir) = &self.dir else {
            return Ok(0);
        };
        let set = load::load_dir(dir)?;
        let count = set.index.len();
        match self.current.write() {
            Ok(mut current) => *current = Arc::new(set),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(set),
        }
        tracing::info!(templates = count, dir = %dir.display(), "templates reloaded");
        Ok(count)
    }

    /// Names of the loaded templates.
    pub fn names(&self) -> Vec<String> {
        self.set().index.keys().cloned().collect()
    }

    fn set(&self) -> Arc<TemplateSet> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Renders template `name` for a recipient whose locale is `locale`.
    ///
    /// # Errors
    /// [`FieldError`] on `template` for an unknown template, on `vars.<name>` for a
    /// missing variable, on `vars` when rendering fails (e.g. a missing attribute).
    pub fn render(
        &self,
        name: &str,
        locale: Option<&str>,
        vars: &Map<String, Value>,
    ) -> Result<RenderedTexts, FieldError> {
        let single: Vec<&str> = FIELDS
            .into_iter()
            .filter(|f| !GROUP_FIELDS.contains(f))
            .collect();
        let (chosen, texts) = self.render_fields(name, locale, vars, &single)?;
        // The group texts render later, at a group's second notification, with the
        // group's variables added: a variable they need beyond those is checked now, or
        // the first notification would be accepted and every later one refused.
        let mut with_group = vars.clone();
        with_group.extend(herald_protocol::group::group_vars(2, &[String::new()]));
        self.missing_vars(name, locale, &with_group, &GROUP_FIELDS)?;
        Ok(RenderedTexts {
            title: texts.get("title").cloned(),
            body: texts.get("body").cloned(),
            channels: Rendered {
                template: name.to_owned(),
                locale: chosen,
                push_title: texts.get("push.title").cloned(),
                push_body: texts.get("push.body").cloned(),
                email_subject: texts.get("email.subject").cloned(),
                email_text: texts.get("email.text").cloned(),
                email_html: texts.get("email.html").cloned(),
                sms_text: texts.get("sms.text").cloned(),
            },
        })
    }

    /// Renders template `name` in every locale it defines, for a topic publish whose
    /// recipients' locales are not known yet: the default locale's texts, and the
    /// others by locale (each with the same per-field fallback as [`Templates::render`]).
    /// Every locale must render, so no recipient can get a half-rendered message.
    ///
    /// # Errors
    /// As [`Templates::render`], for the first locale that fails.
    pub fn render_all(
        &self,
        name: &str,
        vars: &Map<String, Value>,
    ) -> Result<(RenderedTexts, BTreeMap<String, RenderedTexts>), FieldError> {
        let default = self.render(name, None, vars)?;
        let locales: Vec<String> = self
            .set()
            .index
            .get(name)
            .map(|l| l.keys().filter(|l| *l != DEFAULT_LOCALE).cloned().collect())
            .unwrap_or_default();
        let mut others = BTreeMap::new();
        for locale in locales {
            let texts = self.render(name, Some(&locale), vars)?;
            others.insert(locale, texts);
        }
        Ok((default, others))
    }

    /// Renders the folded texts (`group.title`, `group.body`) of template `name` with
    /// `vars` (the notify's, plus the group's `count`, `others`, `actors`, `actor`);
    /// `(None, None)` when the template defines neither.
    ///
    /// # Errors
    /// As [`Templates::render`].
    pub fn render_group(
        &self,
        name: &str,
        locale: Option<&str>,
        vars: &Map<String, Value>,
    ) -> Result<(Option<String>, Option<String>), FieldError> {
        let (_, texts) = self.render_fields(name, locale, vars, &GROUP_FIELDS)?;
        Ok((
            texts.get("group.title").cloned(),
            texts.get("group.body").cloned(),
        ))
    }

    fn render_fields(
        &self,
        name: &str,
        locale: Option<&str>,
        vars: &Map<String, Value>,
        fields: &[&'static str],
    ) -> Result<(String, BTreeMap<&'static str, String>), FieldError> {
        let set = self.set();
        let (chosen, sources) = sources(&set, name, locale, fields)?;
        check_vars(&set, name, vars, &sources)?;
        let context = Value::Object(vars.clone());
        let mut texts = BTreeMap::new();
        for (field, source) in sources {
            let text = set
                .env
                .get_template(&source)
                .and_then(|t| t.render(&context))
                .map_err(|e| render_error(name, &e))?;
            texts.insert(field, text);
        }
        Ok((chosen, texts))
    }

    /// Checks that `vars` holds every variable `fields` of template `name` need.
    fn missing_vars(
        &self,
        name: &str,
        locale: Option<&str>,
        vars: &Map<String, Value>,
        fields: &[&'static str],
    ) -> Result<(), FieldError> {
        let set = self.set();
        let (_, sources) = sources(&set, name, locale, fields)?;
        check_vars(&set, name, vars, &sources)
    }
}

/// A field and the name of its template source.
type Source = (&'static str, String);

/// The locale chosen for template `name`, and the source of each of `fields` it defines:
/// per field, the first locale in the chain that defines it.
fn sources(
    set: &TemplateSet,
    name: &str,
    locale: Option<&str>,
    fields: &[&'static str],
) -> Result<(String, Vec<Source>), FieldError> {
    let Some(locales) = set.index.get(name) else {
        let known = set.index.keys().cloned().collect::<Vec<_>>().join(", ");
        return Err(FieldError::new(
            "template",
            if known.is_empty() {
                format!("no template named {name:?}; none are configured")
            } else {
                format!("no template named {name:?}; configured: {known}")
            },
        ));
    };
    let chain = locale_chain(locale);
    let chosen = chain
        .iter()
        .find(|l| locales.contains_key(l.as_str()))
        .cloned()
        .unwrap_or_else(|| DEFAULT_LOCALE.to_owned());
    let mut sources = Vec::new();
    for field in fields.iter().copied() {
        if let Some(loc) = chain
            .iter()
            .find(|l| locales.get(l.as_str()).is_some_and(|f| f.contains(&field)))
        {
            sources.push((field, load::template_name(name, loc, field)));
        }
    }
    Ok((chosen, sources))
}

/// A 400 naming the first variable `sources` need that `vars` lacks.
fn check_vars(
    set: &TemplateSet,
    name: &str,
    vars: &Map<String, Value>,
    sources: &[Source],
) -> Result<(), FieldError> {
    let mut missing = std::collections::BTreeSet::new();
    for (_, source) in sources {
        let template = set
            .env
            .get_template(source)
            .map_err(|e| render_error(name, &e))?;
        missing.extend(
            template
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !vars.contains_key(v) && set.env.globals().all(|(g, _)| g != v)),
        );
    }
    if let Some(first) = missing.first() {
        let all: Vec<&str> = missing.iter().map(String::as_str).collect();
        return Err(FieldError::new(
            format!("vars.{first}"),
            format!(
                "template {name:?} needs variables {}; add them to vars",
                all.join(", ")
            ),
        ));
    }
    Ok(())
}

/// What [`Templates::render`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedTexts {
    /// The notification's title (inbox, live, and the fallback of every channel).
    pub title: Option<String>,
    /// The notification's body.
    pub body: Option<String>,
    /// Channel-specific texts.
    pub channels: Rendered,
}

impl RenderedTexts {
    /// These texts as one locale's variant of a topic publish; the producer's own
    /// `title`/`body`, when it sent them, win as they do for the default texts.
    pub fn into_localized(self, title: Option<&str>, body: Option<&str>) -> Localized {
        Localized {
            title: title.map(str::to_owned).or(self.title),
            body: body.map(str::to_owned).or(self.body),
            rendered: self.channels,
        }
    }
}

fn render_error(name: &str, e: &minijinja::Error) -> FieldError {
    FieldError::new("vars", format!("template {name:?} could not render: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write template");
        }
        dir
    }

    const SHIPPED: &str = r#"
[default]
title = "Your order {{ order }} shipped"
body = "It arrives {{ eta }}."
push.title = "Shipped!"
email.subject = "Order {{ order }} shipped"
email.html = "<p>Order <b>{{ order }}</b> for {{ name }}</p>"
sms.text = "Order {{ order }}: ETA {{ eta }}"

[de]
title = "Bestellung {{ order }} ist unterwegs"
"#;

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("an object")
    }

    #[test]
    fn renders_every_channel_with_locale_fallback_per_field() {
        let dir = folder(&[("order_shipped.toml", SHIPPED)]);
        let t = Templates::load(dir.path()).expect("loads");
        let v = vars(json!({"order": 42, "eta": "Monday", "name": "<Ann & Bob>"}));
        let en = t
            .render("order_shipped", Some("en-GB"), &v)
            .expect("renders");
        assert_eq!(en.title.as_deref(), Some("Your order 42 shipped"));
        assert_eq!(en.channels.locale, "default");
        assert_eq!(en.channels.push_title.as_deref(), Some("Shipped!"));
        assert_eq!(
            en.channels.email_html.as_deref(),
            Some("<p>Order <b>42</b> for &lt;Ann &amp; Bob&gt;</p>"),
            "HTML is escaped"
        );
        let de = t
            .render("order_shipped", Some("de-AT"), &v)
            .expect("renders");
        assert_eq!(de.title.as_deref(), Some("Bestellung 42 ist unterwegs"));
        assert_eq!(
            de.body.as_deref(),
            Some("It arrives Monday."),
            "falls back per field"
        );
        assert_eq!(de.channels.locale, "de");
    }

    #[test]
    fn group_texts_render_with_the_group_variables_only_when_asked() {
        let like = "[default]\ntitle = \"{{ actor }} liked your photo\"\n\
                    group.title = \"{{ actor }} and {{ others }} others liked your photo\"\n";
        let dir = folder(&[("like.toml", like)]);
        let t = Templates::load(dir.path()).expect("loads");
        let own = t
            .render("like", None, &vars(json!({"actor": "Jane"})))
            .expect("a single like needs no group variables");
        assert_eq!(own.title.as_deref(), Some("Jane liked your photo"));
        let folded = t
            .render_group("like", None, &vars(json!({"actor": "Jane", "others": 4})))
            .expect("renders");
        assert_eq!(
            folded,
            (Some("Jane and 4 others liked your photo".into()), None)
        );
        let err = t
            .render_group("like", None, &vars(json!({"actor": "Jane"})))
            .expect_err("others missing");
        assert_eq!(err.field, "vars.others");
    }

    #[test]
    fn a_variable_only_the_group_texts_need_is_asked_for_at_once() {
        let comment = "[default]\ntitle = \"{{ actor }} commented\"\n\
                       group.title = \"{{ actor }} and {{ others }} others commented on {{ post }}\"\n";
        let dir = folder(&[("comment.toml", comment)]);
        let t = Templates::load(dir.path()).expect("loads");
        // Refused on the first notification, not only once a group forms at the second.
        let err = t
            .render("comment", None, &vars(json!({"actor": "Jane"})))
            .expect_err("post missing");
        assert_eq!(err.field, "vars.post");
        t.render(
            "comment",
            None,
            &vars(json!({"actor": "Jane", "post": "Hi"})),
        )
        .expect("every variable given");
    }

    #[test]
    fn missing_variables_are_named_before_anything_renders() {
        let dir = folder(&[("order_shipped.toml", SHIPPED)]);
        let t = Templates::load(dir.path()).expect("loads");
        let err = t
            .render("order_shipped", None, &vars(json!({"order": 1})))
            .expect_err("eta and name missing");
        assert_eq!(err.field, "vars.eta");
        assert!(err.message.contains("name"), "{err}");
        let unknown = t.render("nope", None, &Map::new()).expect_err("unknown");
        assert_eq!(unknown.field, "template");
        assert!(unknown.message.contains("order_shipped"), "{unknown}");
    }

    #[test]
    fn broken_folders_are_refused_whole_and_reload_keeps_the_old_set() {
        let dir = folder(&[("order_shipped.toml", SHIPPED)]);
        let t = Templates::load(dir.path()).expect("loads");
        std::fs::write(
            dir.path().join("bad.toml"),
            "[default]\ntitle = \"{{ oops\"\nfax = 1\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("nodefault.toml"), "[de]\ntitle = \"x\"\n").expect("write");
        let err = t.reload().expect_err("broken folder");
        let text = err.to_string();
        assert!(text.contains("bad.toml") && text.contains("fax"), "{text}");
        assert!(text.contains("nodefault.toml"), "{text}");
        assert_eq!(t.names(), vec!["order_shipped".to_owned()], "old set kept");
        std::fs::remove_file(dir.path().join("bad.toml")).expect("rm");
        std::fs::remove_file(dir.path().join("nodefault.toml")).expect("rm");
        std::fs::write(
            dir.path().join("welcome.toml"),
            "[default]\ntitle = \"Hi {{ name }}\"\n",
        )
        .expect("write");
        assert_eq!(t.reload().expect("reloads"), 2);
    }
}
