//! Locales: the fallback chain a recipient's `locale` preference walks (`de-AT` → `de` →
//! `default`), and the per-locale texts of a topic publish.
//!
//! A notification to one user is rendered in that user's locale when it is accepted. A
//! topic publish has many recipients, so its template is rendered once per locale the
//! template defines, at the publish ([`Localized`] variants beside the default texts in
//! [`StoredNotification::variants`]), and each recipient's copy picks its variant with
//! [`StoredNotification::localize`] — no template, variables or renderer is needed after
//! the publish, and a retry or a replay never renders differently. A fan-out on write
//! stores each subscriber's copy already localized; a big topic's stored publish keeps
//! every variant, and whoever turns it into one subscriber's copy (the view, the gateway,
//! the channel worker) localizes it for that subscriber.

use crate::notification::{Rendered, StoredNotification};
use serde::{Deserialize, Serialize};

/// The locale every template defines, and the name of the texts used when no variant
/// matches.
pub const DEFAULT_LOCALE: &str = "default";

/// One locale's texts of a templated topic publish.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Localized {
    /// Title in this locale (the producer's own title, when it sent one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Body in this locale (likewise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Channel texts in this locale.
    pub rendered: Rendered,
}

/// `de-AT` → [`de-at`, `de`, `default`]: the locales tried, most specific first; tags
/// compare case-insensitively.
pub fn locale_chain(locale: Option<&str>) -> Vec<String> {
    let mut chain = Vec::new();
    if let Some(tag) = locale.map(str::to_ascii_lowercase) {
        let mut parts: Vec<&str> = tag.split('-').filter(|p| !p.is_empty()).collect();
        while !parts.is_empty() {
            chain.push(parts.join("-"));
            parts.pop();
        }
    }
    chain.push(DEFAULT_LOCALE.to_owned());
    chain
}

impl StoredNotification {
    /// This notification as a recipient whose `locale` preference is `locale` sees it:
    /// the first variant along [`locale_chain`] replaces the default texts (the default
    /// ones stay when none matches). The variants are dropped either way, so a copy
    /// stored or sent on carries only its recipient's texts.
    #[must_use]
    pub fn localize(mut self, locale: Option<&str>) -> Self {
        if self.variants.is_empty() {
            return self;
        }
        let mut variants = std::mem::take(&mut self.variants);
        let chosen = locale_chain(locale)
            .into_iter()
            .find_map(|l| variants.remove(&l));
        if let Some(v) = chosen {
            self.title = v.title;
            self.body = v.body;
            self.rendered = Some(v.rendered);
        }
        self
    }

    /// The locale of its channel texts (`None` when no template rendered them).
    pub fn rendered_locale(&self) -> Option<&str> {
        self.rendered.as_ref().map(|r| r.locale.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NotifyRequest;

    fn publish() -> StoredNotification {
        let req = NotifyRequest::from_json(br#"{"user_id":"topic:t","title":"Hello"}"#)
            .and_then(NotifyRequest::validate)
            .expect("valid");
        let mut n =
            StoredNotification::from_request(req, "p1".into(), time::OffsetDateTime::UNIX_EPOCH);
        n.rendered = Some(Rendered {
            template: "hi".into(),
            locale: DEFAULT_LOCALE.into(),
            push_title: Some("Hi".into()),
            ..Rendered::default()
        });
        for (locale, title) in [("de", "Hallo"), ("pt-br", "Olá")] {
            n.variants.insert(
                locale.into(),
                Localized {
                    title: Some(title.into()),
                    body: None,
                    rendered: Rendered {
                        template: "hi".into(),
                        locale: locale.into(),
                        push_title: Some(title.into()),
                        ..Rendered::default()
                    },
                },
            );
        }
        n
    }

    #[test]
    fn the_chain_goes_from_specific_to_default() {
        assert_eq!(locale_chain(Some("de-AT")), ["de-at", "de", "default"]);
        assert_eq!(locale_chain(None), ["default"]);
    }

    #[test]
    fn each_recipient_gets_the_nearest_variant_and_no_other() {
        let de = publish().localize(Some("de-AT"));
        assert_eq!(de.title.as_deref(), Some("Hallo"));
        assert_eq!(de.rendered_locale(), Some("de"));
        assert!(de.variants.is_empty(), "variants are not carried on");
        let br = publish().localize(Some("PT-BR"));
        assert_eq!(br.title.as_deref(), Some("Olá"));
        let fr = publish().localize(Some("fr"));
        assert_eq!(fr.title.as_deref(), Some("Hello"));
        assert_eq!(fr.rendered_locale(), Some("default"));
        assert!(fr.variants.is_empty());
        let none = publish().localize(None);
        assert_eq!(none.title.as_deref(), Some("Hello"));
        // Round trip: variants survive storage, and a stored copy without any reads as before.
        let bytes = serde_json::to_vec(&publish()).expect("serialize");
        let back: StoredNotification = serde_json::from_slice(&bytes).expect("deserialize");
        assert_eq!(back.variants.len(), 2);
        let plain = serde_json::to_string(&de).expect("serialize");
        assert!(!plain.contains("variants"), "{plain}");
    }
}
