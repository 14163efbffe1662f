//! Every setting the configuration code accepts is documented: in README.md (as its
//! `HERALD_*` variable, or as its TOML key when only the file can set it) and in
//! `deploy/herald.toml.example`, which says it lists every setting. The provider settings
//! were once read but documented nowhere, so operators could not configure push or SMS.

use herald::config::Settings;
use std::collections::BTreeSet;

fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every key the TOML file accepts: the fields of `Settings`, the flattened provider
/// settings included.
fn setting_keys() -> BTreeSet<String> {
    let value = serde_json::to_value(Settings::default()).expect("settings serialize");
    value
        .as_object()
        .expect("settings are a table")
        .keys()
        .cloned()
        .collect()
}

#[test]
fn the_environment_reads_only_settings() {
    let keys = setting_keys();
    for key in Settings::env_keys() {
        assert!(
            keys.contains(key),
            "HERALD_{} is no setting",
            key.to_uppercase()
        );
    }
    // The provider settings are among them.
    for key in herald_channels::ENV_KEYS {
        assert!(keys.contains(key), "{key} is not read from the file");
    }
}

#[test]
fn every_setting_is_in_the_readme() {
    let readme = repo_file("README.md");
    let env: BTreeSet<&str> = Settings::env_keys().into_iter().collect();
    let missing: Vec<String> = setting_keys()
        .into_iter()
        .filter_map(|key| {
            // A setting of the environment by its variable; one of the file alone by its
            // key, or by a table of it in an example (`[categories.security]`).
            let names = if env.contains(key.as_str()) {
                vec![format!("`HERALD_{}`", key.to_uppercase())]
            } else {
                vec![
                    format!("`{key}`"),
                    format!("\n[{key}."),
                    format!("\n[[{key}]]"),
                ]
            };
            (!names.iter().any(|n| readme.contains(n.as_str()))).then(|| names[0].clone())
        })
        .collect();
    assert!(missing.is_empty(), "not in README.md: {missing:?}");
}

#[test]
fn every_setting_is_in_the_example_config() {
    let example = repo_file("deploy/herald.toml.example");
    let missing: Vec<String> = setting_keys()
        .into_iter()
        .filter(|key| {
            !example.lines().any(|line| {
                let line = line.trim_start_matches(['#', ' ', '[']);
                line.starts_with(&format!("{key} ="))
                    || line.starts_with(&format!("{key}."))
                    || line.starts_with(&format!("{key}]"))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not in deploy/herald.toml.example: {missing:?}"
    );
}

/// The example loads, and every key it names, set or commented out, is a setting: a typo
/// there would be ignored without a word.
#[test]
fn the_example_config_names_only_settings() {
    use figment::providers::{Format as _, Toml};
    let example = repo_file("deploy/herald.toml.example");
    let settings: Settings = figment::Figment::from(Toml::string(&example))
        .extract()
        .expect("the example loads");
    assert_eq!(settings.replicas, 3);
    let keys = setting_keys();
    for line in example.lines() {
        let line = line.trim_start_matches(['#', ' ']);
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        let key = key.trim();
        let top_level = key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        // Keys of tables ([[api_keys]] producer = …) are not settings themselves.
        let in_table = [
            "producer",
            "key",
            "key_sha256",
            "scopes",
            "rate_per_s",
            "critical",
        ]
        .contains(&key)
            || ["sms", "category", "limit", "window_s", "over"].contains(&key);
        if top_level && !in_table {
            assert!(keys.contains(key), "{key} in the example is no setting");
        }
    }
}
