//! Reading a templates folder: every `*.toml` file is one template; every problem in
//! every file is collected, so an operator fixes them in one pass.

use crate::{DEFAULT_LOCALE, FIELDS, TemplateSet};
use minijinja::{Environment, UndefinedBehavior};
use std::collections::BTreeMap;
use std::path::Path;

/// Longest template file, bytes.
const MAX_FILE_BYTES: u64 = 256 * 1024;

/// A templates folder that could not be loaded: every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("templates: {}", .0.join("; "))]
pub struct LoadError(pub Vec<String>);

/// The minijinja name of one field of one locale. Names ending in `.html` get HTML
/// auto-escaping.
pub(crate) fn template_name(template: &str, locale: &str, field: &str) -> String {
    format!("{template}/{locale}/{field}")
}

pub(crate) fn load_dir(dir: &Path) -> Result<TemplateSet, LoadError> {
    let mut errors = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| LoadError(vec![format!("cannot read folder {}: {e}", dir.display())]))?;
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    let mut index = BTreeMap::new();
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        if name.is_empty()
            || name.len() > 256
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            errors.push(format!(
                "{file}: a template name may hold only letters, digits, '_', '-' and '.'"
            ));
            continue;
        }
        match read(&path) {
            Ok(doc) => {
                if let Some(locales) = add_template(&mut env, &name, &file, doc, &mut errors) {
                    index.insert(name, locales);
                }
            }
            Err(e) => errors.push(format!("{file}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(TemplateSet { env, index })
    } else {
        Err(LoadError(errors))
    }
}

fn read(path: &Path) -> Result<toml::Table, String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    text.parse::<toml::Table>().map_err(|e| e.to_string())
}

/// Registers one template's locales; `None` when it has errors (recorded).
fn add_template(
    env: &mut Environment<'static>,
    name: &str,
    file: &str,
    doc: toml::Table,
    errors: &mut Vec<String>,
) -> Option<BTreeMap<String, Vec<&'static str>>> {
    let before = errors.len();
    if !doc.contains_key(DEFAULT_LOCALE) {
        errors.push(format!("{file}: needs a [{DEFAULT_LOCALE}] table"));
    }
    let mut locales = BTreeMap::new();
    for (locale, table) in doc {
        let toml::Value::Table(table) = table else {
            errors.push(format!(
                "{file}: `{locale}` must be a table of texts ([{locale}])"
            ));
            continue;
        };
        let locale = locale.to_ascii_lowercase();
        let mut fields = Vec::new();
        for (key, value) in flatten(&table) {
            let Some(field) = FIELDS.iter().find(|f| **f == key) else {
                errors.push(format!(
                    "{file}: [{locale}] {key} is not a template field; use {}",
                    FIELDS.join(", ")
                ));
                continue;
            };
            let Some(source) = value else {
                errors.push(format!("{file}: [{locale}] {key} must be a string"));
                continue;
            };
            if let Err(e) = env.add_template_owned(template_name(name, &locale, field), source) {
                errors.push(format!("{file}: [{locale}] {key}: {e}"));
                continue;
            }
            fields.push(*field);
        }
        locales.insert(locale, fields);
    }
    (errors.len() == before).then_some(locales)
}

/// `title`, `push.title`, …: dotted keys of a locale table, with `None` for non-strings.
fn flatten(table: &toml::Table) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::String(s) => out.push((key.clone(), Some(s.clone()))),
            toml::Value::Table(inner) => {
                for (sub, v) in inner {
                    out.push((format!("{key}.{sub}"), v.as_str().map(str::to_owned)));
                }
            }
            _ => out.push((key.clone(), None)),
        }
    }
    out
}
