//! The NATS part of the settings: credentials and TLS, checked whole with the rest
//! ([`Settings::validate`]) into the [`herald_store::NatsOptions`] every role connects
//! with.

use super::Settings;

impl Settings {
    /// NATS credentials and TLS: one way to authenticate at most, certificate and key
    /// together, and every file readable and of the right kind.
    pub(super) fn nats(&self, errors: &mut Vec<String>) -> herald_store::NatsOptions {
        use herald_store::{ClientCert, NatsAuth, NatsOptions, NatsTls};
        let ways: Vec<(&str, NatsAuth)> = [
            self.nats_creds_file
                .clone()
                .map(|p| ("nats_creds_file", NatsAuth::CredsFile(p))),
            self.nats_nkey_seed_file
                .clone()
                .map(|p| ("nats_nkey_seed_file", NatsAuth::NkeySeedFile(p))),
            self.nats_token
                .clone()
                .map(|t| ("nats_token", NatsAuth::Token(t))),
        ]
        .into_iter()
        .flatten()
        .collect();
        if ways.len() > 1 {
            let names: Vec<&str> = ways.iter().map(|(name, _)| *name).collect();
            errors.push(format!(
                "{} are set, but NATS takes one way to authenticate: keep one",
                names.join(" and ")
            ));
        }
        let auth = ways.into_iter().next().map(|(_, a)| a).unwrap_or_default();
        let client_cert = match (&self.nats_tls_cert_file, &self.nats_tls_key_file) {
            (Some(cert_file), Some(key_file)) => Some(ClientCert {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            }),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                errors.push(
                    "nats_tls_cert_file and nats_tls_key_file go together (a client certificate and its private key); set both or neither".into(),
                );
                None
            }
        };
        let options = NatsOptions {
            auth,
            tls: NatsTls {
                ca_file: self.nats_tls_ca_file.clone(),
                client_cert,
                required: self.nats_require_tls,
            },
        };
        let chain = |e: &dyn std::error::Error| herald_api::error::error_chain(e);
        if let Some(url) = self.nats_url.as_deref().filter(|u| !u.trim().is_empty())
            && let Err(e) =
                herald_store::nats_auth::Servers::parse(url).and_then(|s| options.auth_with(&s))
        {
            errors.push(chain(&e));
        }
        errors.extend(options.check().iter().map(|e| chain(e)));
        options
    }

    /// These settings without what only connecting to NATS needs, for commands that do
    /// not connect (`herald token`): their files need not be readable there.
    pub fn without_nats(mut self) -> Self {
        self.nats_creds_file = None;
        self.nats_nkey_seed_file = None;
        self.nats_token = None;
        self.nats_tls_ca_file = None;
        self.nats_tls_cert_file = None;
        self.nats_tls_key_file = None;
        self.nats_require_tls = false;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_settings_name_what_to_fix() {
        let s = Settings {
            jwt_secret: Some("x".repeat(32)),
            nats_url: Some("nats://herald:pw@n1:4222".into()),
            nats_token: Some(herald_store::Secret::new("t0k3n")),
            nats_nkey_seed_file: Some("/nonexistent/herald.nk".into()),
            nats_tls_cert_file: Some("/nonexistent/cert.pem".into()),
            ..Settings::default()
        };
        let err = s.validate().expect_err("invalid NATS settings");
        let text = err.to_string();
        for expected in [
            "nats_nkey_seed_file and nats_token are set",
            "nats_tls_cert_file and nats_tls_key_file go together",
            "nats_url carries user:pass@ and nats_nkey_seed_file is set too",
            "nats_nkey_seed_file /nonexistent/herald.nk: cannot be read: No such file",
        ] {
            assert!(text.contains(expected), "{expected:?} not in {text}");
        }
        assert!(!text.contains("t0k3n") && !text.contains(":pw@"), "{text}");
        assert!(!format!("{s:?}").contains("t0k3n"));
    }

    #[test]
    fn tls_settings_build_the_nats_options() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "no certificate here").expect("write");
        let s = Settings {
            jwt_secret: Some("x".repeat(32)),
            nats_tls_ca_file: Some(ca.clone()),
            ..Settings::default()
        };
        let err = s.validate().expect_err("a CA file without a certificate");
        assert!(
            err.0.len() == 1 && err.0[0].starts_with(&format!("nats_tls_ca_file {}", ca.display())),
            "{err}"
        );
        let v = Settings {
            nats_tls_ca_file: None,
            nats_require_tls: true,
            ..s
        }
        .validate()
        .expect("valid");
        assert!(v.nats.tls.is_required());
        assert_eq!(v.nats.auth, herald_store::NatsAuth::None);
    }
}
