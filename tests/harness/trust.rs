//! Credentials and certificates for a nats-server that demands them, made fresh for each
//! test in a temp dir, with the server configuration that trusts them
//! ([`crate::Nats::single_with`] starts it):
//!
//! - [`NkeyUser`]: a user nkey; the server lists its public key, Herald reads the seed
//!   from a file.
//! - [`Pki`]: a CA, a server certificate for `localhost`/`127.0.0.1` and a client
//!   certificate, as PEM files.
//! - [`Operator`]: operator mode — an operator key the server trusts, an account with
//!   JetStream preloaded into a memory resolver, and a user `.creds` file.
//!
//! The JWTs of operator mode are written here with `nkeys` signing them: a NATS JWT is
//! base64url JSON signed with ed25519 (`"alg":"ed25519-nkey"`), which general JWT crates
//! do not produce. The claims are the few nats-server needs; `nsc` writes the same.

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Writes `text` to `dir/name`, readable by its owner only, as a secret file should be.
///
/// # Errors
/// When the file cannot be written.
pub fn secret_file(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A user nkey.
pub struct NkeyUser {
    pair: nkeys::KeyPair,
}

impl NkeyUser {
    /// A fresh user key.
    pub fn new() -> Self {
        NkeyUser {
            pair: nkeys::KeyPair::new_user(),
        }
    }

    /// Its seed (`SU…`), written to `dir/name` (0600).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn seed_file(&self, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let seed = self.pair.seed().context("nkey seed")?;
        secret_file(dir, name, &format!("{seed}\n"))
    }

    /// The server configuration that admits exactly these users.
    pub fn authorization(users: &[&NkeyUser]) -> String {
        let users: Vec<String> = users
            .iter()
            .map(|u| format!("{{ nkey: {} }}", u.pair.public_key()))
            .collect();
        format!("authorization {{\n  users: [ {} ]\n}}", users.join(", "))
    }
}

impl Default for NkeyUser {
    fn default() -> Self {
        Self::new()
    }
}

/// A test CA with a server and a client certificate, as PEM files in a directory.
pub struct Pki {
    /// The CA certificate: what clients (and a server verifying clients) trust.
    pub ca: PathBuf,
    /// The server certificate, for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate (client auth), signed by the same CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl Pki {
    /// Generates the CA and both certificates into `dir` (which must exist).
    ///
    /// # Errors
    /// When generation or writing fails.
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Herald test NATS CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let server_key = KeyPair::generate()?;
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &ca)?;

        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, "herald");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &ca)?;

        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        Ok(Pki {
            ca: write("ca.pem", &ca.pem())?,
            server_cert: write("server.pem", &server_cert.pem())?,
            server_key: secret_file(dir, "server-key.pem", &server_key.serialize_pem())?,
            client_cert: write("client.pem", &client_cert.pem())?,
            client_key: secret_file(dir, "client-key.pem", &client_key.serialize_pem())?,
        })
    }

    /// The server's `tls` block; with `verify_clients`, clients must present a
    /// certificate this CA signed (mutual TLS).
    pub fn server_tls(&self, verify_clients: bool) -> String {
        let verify = if verify_clients {
            format!(
                "\n  ca_file: {:?}\n  verify: true",
                self.ca.display().to_string()
            )
        } else {
            String::new()
        };
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}{verify}\n}}",
            self.server_cert.display().to_string(),
            self.server_key.display().to_string(),
        )
    }

    /// Herald's TLS options trusting this CA, with the client certificate or not.
    pub fn client_tls(&self, with_certificate: bool) -> herald_store::NatsTls {
        herald_store::NatsTls {
            ca_file: Some(self.ca.clone()),
            client_cert: with_certificate.then(|| herald_store::ClientCert {
                cert_file: self.client_cert.clone(),
                key_file: self.client_key.clone(),
            }),
            required: true,
        }
    }
}

/// Operator mode: an operator, one account with JetStream, its users, and the system
/// account JetStream needs.
pub struct Operator {
    operator: nkeys::KeyPair,
    account: nkeys::KeyPair,
    account_jwt: String,
    system: nkeys::KeyPair,
    system_jwt: String,
}

impl Operator {
    /// A fresh operator and account.
    ///
    /// # Errors
    /// When signing fails.
    pub fn new() -> anyhow::Result<Operator> {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let unlimited = -1;
        let account_jwt = sign(
            &operator,
            &account.public_key(),
            "HERALD",
            json!({
                "type": "account",
                "version": 2,
                "limits": {
                    "subs": unlimited, "data": unlimited, "payload": unlimited,
                    "imports": unlimited, "exports": unlimited, "wildcards": true,
                    "conn": unlimited, "leaf": unlimited,
                    // JetStream is on for an account whose storage limits are not 0.
                    "mem_storage": unlimited, "disk_storage": unlimited,
                    "streams": unlimited, "consumer": unlimited,
                },
                "default_permissions": { "pub": {}, "sub": {} },
            }),
        )?;
        let system = nkeys::KeyPair::new_account();
        let system_jwt = sign(
            &operator,
            &system.public_key(),
            "SYS",
            json!({"type": "account", "version": 2}),
        )?;
        Ok(Operator {
            operator,
            account,
            account_jwt,
            system,
            system_jwt,
        })
    }

    /// The server configuration: trust the operator's key, resolve both accounts from
    /// memory.
    pub fn server_config(&self) -> String {
        format!(
            "trusted_keys: [ {} ]\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: {:?}\n  {}: {:?}\n}}",
            self.operator.public_key(),
            self.system.public_key(),
            self.account.public_key(),
            self.account_jwt,
            self.system.public_key(),
            self.system_jwt,
        )
    }

    /// A new user of the account, its `.creds` file written to `dir/name` (0600).
    ///
    /// # Errors
    /// When signing or writing fails.
    pub fn user_creds(&self, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        creds_file(&self.account, dir, name)
    }

    /// A `.creds` file of a user signed by an account the server has never heard of.
    ///
    /// # Errors
    /// When signing or writing fails.
    pub fn stranger_creds(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        creds_file(&nkeys::KeyPair::new_account(), dir, name)
    }
}

fn creds_file(account: &nkeys::KeyPair, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let user = nkeys::KeyPair::new_user();
    let jwt = sign(
        account,
        &user.public_key(),
        "herald",
        json!({
            "type": "user",
            "version": 2,
            "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
        }),
    )?;
    let seed = user.seed().context("user seed")?;
    // The layout `nsc generate creds` writes.
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    );
    secret_file(dir, name, &creds)
}

/// A NATS JWT for `subject`, issued and signed by `issuer`, with `nats` claims.
fn sign(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> anyhow::Result<String> {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        // nats-server does not check the id; nsc makes it a hash of the claims.
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?);
    let signed = format!("{header}.{payload}");
    let signature = issuer
        .sign(signed.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing a NATS JWT: {e}"))?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}
