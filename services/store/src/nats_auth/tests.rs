use super::*;

/// A temp dir holding `files`.
fn files(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

#[test]
fn url_credentials_become_options_and_leave_the_addresses() {
    let servers = Servers::parse("nats://herald:p%40ss@n1:4222, nats://herald:p%40ss@n2:4222")
        .expect("parses");
    assert_eq!(
        servers.auth,
        NatsAuth::UserPassword {
            user: "herald".into(),
            password: Secret::new("p@ss"),
        }
    );
    let addrs: Vec<_> = servers.addrs.iter().map(|a| a.as_url_str()).collect();
    assert_eq!(addrs, ["nats://n1:4222", "nats://n2:4222"]);

    let token = Servers::parse("tls://s3cr3t@n1:4222").expect("parses");
    assert_eq!(token.auth, NatsAuth::Token(Secret::new("s3cr3t")));
    assert!(token.addrs[0].tls_required());

    let plain = Servers::parse("127.0.0.1:4222").expect("parses");
    assert_eq!(plain.auth, NatsAuth::None);
}

#[test]
fn urls_with_different_credentials_are_refused() {
    let err = Servers::parse("nats://a:1@n1,nats://a:2@n2").expect_err("differ");
    assert!(matches!(err, NatsOptionsError::DifferentUrlCredentials));
    let err = Servers::parse("nats://a:1@n1,nats://n2").expect_err("one without");
    assert!(matches!(err, NatsOptionsError::DifferentUrlCredentials));
}

#[test]
fn a_bad_url_is_named_without_its_password() {
    let err = Servers::parse("nats://u:secret@host:notaport").expect_err("bad port");
    let text = err.to_string();
    assert!(
        text.starts_with("nats_url nats://***@host:notaport"),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
}

#[test]
fn url_credentials_and_a_configured_way_do_not_mix() {
    let options = NatsOptions {
        auth: NatsAuth::Token(Secret::new("t")),
        ..NatsOptions::default()
    };
    let with_url = Servers::parse("nats://u:p@h").expect("parses");
    let err = options.auth_with(&with_url).expect_err("two ways");
    assert!(err.to_string().contains("nats_token"), "{err}");
    let bare = Servers::parse("nats://h").expect("parses");
    assert_eq!(
        options.auth_with(&bare).expect("one way"),
        NatsAuth::Token(Secret::new("t"))
    );
}

#[test]
fn secrets_never_show_in_debug_or_descriptions() {
    let options = NatsOptions {
        auth: NatsAuth::Token(Secret::new("tok-123")),
        ..NatsOptions::default()
    };
    let shown = format!("{options:?} {}", options.describe(&options.auth));
    assert!(!shown.contains("tok-123"), "{shown}");
    let user = NatsAuth::UserPassword {
        user: "herald".into(),
        password: Secret::new("pw-456"),
    };
    let shown = format!("{user:?} {}", options.describe(&user));
    assert!(
        !shown.contains("pw-456") && shown.contains("herald"),
        "{shown}"
    );
}

#[test]
fn missing_files_are_named_with_their_setting() {
    let options = NatsOptions {
        auth: NatsAuth::CredsFile("/nonexistent/herald.creds".into()),
        tls: NatsTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            client_cert: Some(ClientCert {
                cert_file: "/nonexistent/cert.pem".into(),
                key_file: "/nonexistent/key.pem".into(),
            }),
            required: false,
        },
    };
    let errors: Vec<String> = options.check().iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "nats_creds_file /nonexistent/herald.creds: cannot be read",
            "nats_tls_ca_file /nonexistent/ca.pem: cannot be read",
            "nats_tls_cert_file /nonexistent/cert.pem: cannot be read",
            "nats_tls_key_file /nonexistent/key.pem: cannot be read",
        ]
    );
}

#[test]
fn a_seed_file_must_hold_a_user_seed() {
    let user = nkeys::KeyPair::new_user();
    let account = nkeys::KeyPair::new_account();
    let seed = user.seed().expect("seed");
    let dir = files(&[
        ("user.nk", &format!("{seed}\n")),
        ("account.nk", &account.seed().expect("seed")),
        ("junk.nk", "not a seed"),
    ]);
    let check = |name: &str| {
        NatsOptions {
            auth: NatsAuth::NkeySeedFile(dir.path().join(name)),
            ..NatsOptions::default()
        }
        .check()
    };
    assert!(check("user.nk").is_empty());
    let account_err = check("account.nk").remove(0).to_string();
    assert!(account_err.contains("not a user seed"), "{account_err}");
    let junk_err = check("junk.nk").remove(0).to_string();
    assert!(
        junk_err.starts_with("nats_nkey_seed_file")
            && junk_err.contains("does not hold an nkey seed"),
        "{junk_err}"
    );
    // The loaded seed is the trimmed file, and stays masked.
    let Ok(Loaded::Seed(loaded)) =
        Loaded::load(&NatsAuth::NkeySeedFile(dir.path().join("user.nk")))
    else {
        panic!("seed not loaded");
    };
    assert_eq!(loaded.expose(), seed);
    assert_eq!(format!("{loaded:?}"), "***");
}

#[test]
fn a_creds_file_is_checked_with_the_clients_own_parser() {
    let user = nkeys::KeyPair::new_user();
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().expect("seed")
    );
    let dir = files(&[("good.creds", &creds), ("bad.creds", "just some text")]);
    let check = |name: &str| {
        NatsOptions {
            auth: NatsAuth::CredsFile(dir.path().join(name)),
            ..NatsOptions::default()
        }
        .check()
    };
    assert!(check("good.creds").is_empty());
    let err = check("bad.creds").remove(0).to_string();
    assert!(
        err.starts_with("nats_creds_file") && err.contains("not a .creds file"),
        "{err}"
    );
    let loaded = Loaded::load(&NatsAuth::CredsFile(dir.path().join("good.creds"))).expect("loads");
    assert!(loaded.options(&NatsTls::default()).is_ok());
}

#[test]
fn tls_files_must_hold_pem_certificates_and_a_key() {
    let dir = files(&[("ca.pem", "not pem at all"), ("key.pem", "")]);
    let options = NatsOptions {
        auth: NatsAuth::None,
        tls: NatsTls {
            ca_file: Some(dir.path().join("ca.pem")),
            client_cert: Some(ClientCert {
                cert_file: dir.path().join("ca.pem"),
                key_file: dir.path().join("key.pem"),
            }),
            required: false,
        },
    };
    let errors: Vec<String> = options.check().iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with("nats_tls_ca_file") && errors[0].contains("holds no certificate")
    );
    assert!(errors[1].starts_with("nats_tls_cert_file"));
    assert!(errors[2].starts_with("nats_tls_key_file") && errors[2].contains("no private key"));
}

#[test]
fn tls_files_imply_tls_is_required() {
    assert!(!NatsTls::default().is_required());
    let with_ca = NatsTls {
        ca_file: Some("ca.pem".into()),
        ..NatsTls::default()
    };
    assert!(with_ca.is_required());
    let asked = NatsTls {
        required: true,
        ..NatsTls::default()
    };
    assert!(asked.is_required());
}
