//! How a Herald process proves who it is to NATS, and checks that NATS is who it says:
//! a `.creds` file (operator mode: user JWT + nkey seed), an nkey seed file, a token, or
//! the `user:pass@` of the URL; and TLS with a CA of your own, optionally with a client
//! certificate (mutual TLS).
//!
//! A type of its own because every process (api, gateway, router, workers, provision)
//! must connect with the same [`NatsOptions`], and because they are checked whole before
//! anything connects ([`NatsOptions::check`]): a missing file is a configuration error
//! that names its setting and path, not a connection retried forever. Secrets come from
//! files (or the environment, for a token), never from the command line, and no `Debug`
//! output shows them ([`Secret`]).
//!
//! async-nats sends nothing of a URL's `user:pass@` (nats.rs issue #1623), so the
//! credentials of the URL are taken out here ([`Servers::parse`]) and given to the client
//! as options, like every other way to authenticate.

use async_nats::ServerAddr;
use async_nats::rustls::pki_types::pem::PemObject as _;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};

/// How to authenticate and whether and how to use TLS; the same for every connection a
/// process opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsOptions {
    /// Who Herald is to NATS.
    pub auth: NatsAuth,
    /// TLS to NATS.
    pub tls: NatsTls,
}

/// One way to authenticate. NATS takes one per connection, so there is one here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// None beyond what the URL carries.
    #[default]
    None,
    /// A `.creds` file: a user JWT and its nkey seed (operator mode).
    CredsFile(PathBuf),
    /// A file holding a user nkey seed (`SU…`); the server lists the public key.
    NkeySeedFile(PathBuf),
    /// A token (`authorization { token: … }`).
    Token(Secret),
    /// User and password, as a URL's `user:pass@` gives them.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
}

impl NatsAuth {
    /// The setting this way of authenticating comes from, for messages.
    pub fn setting(&self) -> Option<Setting> {
        match self {
            NatsAuth::None => None,
            NatsAuth::CredsFile(_) => Some(Setting::CredsFile),
            NatsAuth::NkeySeedFile(_) => Some(Setting::NkeySeedFile),
            NatsAuth::Token(_) => Some(Setting::Token),
            NatsAuth::UserPassword { .. } => Some(Setting::Url),
        }
    }
}

/// TLS to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM certificate(s) of the CA that signed the servers' certificates. Replaces the
    /// system's trust roots for NATS.
    pub ca_file: Option<PathBuf>,
    /// A client certificate, for servers that verify clients (mutual TLS).
    pub client_cert: Option<ClientCert>,
    /// Refuse to talk to NATS without TLS, even when a server does not ask for it.
    pub required: bool,
}

impl NatsTls {
    /// Whether TLS is required: asked for, or implied by a CA or client certificate (a
    /// server that stopped offering TLS must not get the connection in clear text).
    pub fn is_required(&self) -> bool {
        self.required || self.ca_file.is_some() || self.client_cert.is_some()
    }
}

/// A client certificate and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The certificate (chain), PEM.
    pub cert_file: PathBuf,
    /// Its private key, PEM.
    pub key_file: PathBuf,
}

/// A secret string: `Debug` shows `***`, and there is no `Display`.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The settings of Herald's configuration these options come from; messages name them
/// (`HERALD_` + upper case in the environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `nats_url`.
    Url,
    /// `nats_creds_file`.
    CredsFile,
    /// `nats_nkey_seed_file`.
    NkeySeedFile,
    /// `nats_token`.
    Token,
    /// `nats_tls_ca_file`.
    TlsCaFile,
    /// `nats_tls_cert_file`.
    TlsCertFile,
    /// `nats_tls_key_file`.
    TlsKeyFile,
}

impl Setting {
    /// The configuration key.
    pub const fn key(self) -> &'static str {
        match self {
            Setting::Url => "nats_url",
            Setting::CredsFile => "nats_creds_file",
            Setting::NkeySeedFile => "nats_nkey_seed_file",
            Setting::Token => "nats_token",
            Setting::TlsCaFile => "nats_tls_ca_file",
            Setting::TlsCertFile => "nats_tls_cert_file",
            Setting::TlsKeyFile => "nats_tls_key_file",
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// NATS options that cannot be used. Messages name the setting and say what to change;
/// none contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum NatsOptionsError {
    /// A file cannot be read.
    #[error("{setting} {}: cannot be read", path.display())]
    Unreadable {
        /// The setting naming the file.
        setting: Setting,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but does not hold what the setting needs.
    #[error("{setting} {}: {problem}", path.display())]
    Malformed {
        /// The setting naming the file.
        setting: Setting,
        /// The file.
        path: PathBuf,
        /// What is wrong, and what the file should hold.
        problem: String,
    },
    /// A URL of `nats_url` does not parse.
    #[error("nats_url {url}: not a NATS URL (nats://host:port, tls://host:port, comma-separated)")]
    BadUrl {
        /// The URL, credentials masked.
        url: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The URLs of a cluster carry different credentials; a client has one identity.
    #[error(
        "nats_url: the URLs carry different credentials; give every URL the same user:pass@ (or none, and set the credentials once)"
    )]
    DifferentUrlCredentials,
    /// Two ways to authenticate were given.
    #[error(
        "nats_url carries user:pass@ and {0} is set too: NATS takes one way to authenticate; keep one"
    )]
    TwoWaysToAuthenticate(Setting),
    /// An empty token.
    #[error("nats_token is empty; set the token, or remove the setting")]
    EmptyToken,
}

impl NatsOptions {
    /// Checks every file these options name: that it can be read and holds what its
    /// setting needs (a `.creds` file, a user nkey seed, PEM certificates, a PEM private
    /// key). Files are read again when connecting; TLS files at every (re)connect, so a
    /// renewed certificate is picked up without a restart.
    pub fn check(&self) -> Vec<NatsOptionsError> {
        let mut errors = Vec::new();
        let auth = match &self.auth {
            NatsAuth::CredsFile(path) => load_creds(path).err(),
            NatsAuth::NkeySeedFile(path) => load_seed(path).err(),
            NatsAuth::Token(token) if token.expose().trim().is_empty() => {
                Some(NatsOptionsError::EmptyToken)
            }
            NatsAuth::Token(_) | NatsAuth::UserPassword { .. } | NatsAuth::None => None,
        };
        errors.extend(auth);
        if let Some(path) = &self.tls.ca_file {
            errors.extend(check_certificates(Setting::TlsCaFile, path).err());
        }
        if let Some(client) = &self.tls.client_cert {
            errors.extend(check_certificates(Setting::TlsCertFile, &client.cert_file).err());
            errors.extend(check_private_key(&client.key_file).err());
        }
        errors
    }

    /// The way to authenticate once the URL's credentials are counted in: these options'
    /// own, or the URL's, never both.
    ///
    /// # Errors
    /// [`NatsOptionsError::TwoWaysToAuthenticate`] when both are given.
    pub fn auth_with(&self, servers: &Servers) -> Result<NatsAuth, NatsOptionsError> {
        match (&self.auth, &servers.auth) {
            (NatsAuth::None, from_url) => Ok(from_url.clone()),
            (own, NatsAuth::None) => Ok(own.clone()),
            (own, _) => Err(NatsOptionsError::TwoWaysToAuthenticate(
                own.setting().unwrap_or(Setting::Url),
            )),
        }
    }

    /// A short description for logs: how Herald authenticates and whether TLS is
    /// required, with file paths and never a secret.
    pub fn describe(&self, auth: &NatsAuth) -> String {
        let auth = match auth {
            NatsAuth::None => "no credentials".to_owned(),
            NatsAuth::CredsFile(p) => format!("creds file {}", p.display()),
            NatsAuth::NkeySeedFile(p) => format!("nkey seed file {}", p.display()),
            NatsAuth::Token(_) => "a token".to_owned(),
            NatsAuth::UserPassword { user, .. } => format!("user {user:?}"),
        };
        let tls = match (&self.tls.ca_file, &self.tls.client_cert) {
            _ if !self.tls.is_required() => "TLS when the server asks".to_owned(),
            (Some(ca), Some(cert)) => format!(
                "TLS required (CA {}, client certificate {})",
                ca.display(),
                cert.cert_file.display()
            ),
            (Some(ca), None) => format!("TLS required (CA {})", ca.display()),
            (None, Some(cert)) => format!(
                "TLS required (system roots, client certificate {})",
                cert.cert_file.display()
            ),
            (None, None) => "TLS required (system roots)".to_owned(),
        };
        format!("{auth}, {tls}")
    }
}

/// The servers of `nats_url`, credentials taken out, and those credentials.
#[derive(Debug, Clone)]
pub struct Servers {
    /// The addresses to dial, without `user:pass@`.
    pub addrs: Vec<ServerAddr>,
    /// What the URLs' `user:pass@` said: a user and password, a bare user as a token
    /// (as the Go client reads `nats://token@host`), or nothing.
    pub auth: NatsAuth,
}

impl Servers {
    /// Parses `url`, comma-separated for a cluster. Percent-encoded credentials are
    /// decoded (`%40` for an `@` in a password).
    ///
    /// # Errors
    /// A URL that does not parse, or URLs with different credentials.
    pub fn parse(url: &str) -> Result<Servers, NatsOptionsError> {
        let mut addrs = Vec::new();
        let mut auth: Option<NatsAuth> = None;
        for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let bad = |source| NatsOptionsError::BadUrl {
                url: crate::connect::redacted(one),
                source,
            };
            let addr: ServerAddr = one.parse().map_err(bad)?;
            let this = match (addr.username(), addr.password()) {
                (None, _) => NatsAuth::None,
                (Some(user), None) => NatsAuth::Token(Secret::new(decode(user))),
                (Some(user), Some(password)) => NatsAuth::UserPassword {
                    user: decode(user),
                    password: Secret::new(decode(password)),
                },
            };
            match &auth {
                Some(seen) if *seen != this => {
                    return Err(NatsOptionsError::DifferentUrlCredentials);
                }
                _ => auth = Some(this),
            }
            let mut bare = addr.into_inner();
            // Cannot fail on a URL that has a host, which every NATS URL has.
            let _ = bare.set_username("");
            let _ = bare.set_password(None);
            addrs.push(ServerAddr::from_url(bare).map_err(bad)?);
        }
        Ok(Servers {
            addrs,
            auth: auth.unwrap_or_default(),
        })
    }
}

fn decode(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// What [`NatsAuth`] needs from its files, read once per connect.
pub(crate) enum Loaded {
    None,
    Creds { path: PathBuf, text: Secret },
    Seed(Secret),
    Token(Secret),
    UserPassword(String, Secret),
}

impl Loaded {
    /// The public key of an nkey seed (`U…`): what the server's configuration lists, so
    /// logs may show it.
    pub(crate) fn public_key(&self) -> Option<String> {
        match self {
            Loaded::Seed(seed) => nkeys::KeyPair::from_seed(seed.expose())
                .ok()
                .map(|pair| pair.public_key()),
            _ => None,
        }
    }

    pub(crate) fn load(auth: &NatsAuth) -> Result<Loaded, NatsOptionsError> {
        Ok(match auth {
            NatsAuth::None => Loaded::None,
            NatsAuth::CredsFile(path) => Loaded::Creds {
                path: path.clone(),
                text: load_creds(path)?,
            },
            NatsAuth::NkeySeedFile(path) => Loaded::Seed(load_seed(path)?),
            NatsAuth::Token(token) => Loaded::Token(token.clone()),
            NatsAuth::UserPassword { user, password } => {
                Loaded::UserPassword(user.clone(), password.clone())
            }
        })
    }

    /// Client options holding these credentials and `tls`, for one connection.
    ///
    /// # Errors
    /// A `.creds` file's text that async-nats refuses (checked when loaded already).
    pub(crate) fn options(
        &self,
        tls: &NatsTls,
    ) -> Result<async_nats::ConnectOptions, NatsOptionsError> {
        let options = async_nats::ConnectOptions::new();
        let mut options = match self {
            Loaded::None => options,
            Loaded::Creds { path, text } => options
                .credentials(text.expose())
                .map_err(|e| not_creds(path, &e))?,
            Loaded::Seed(seed) => options.nkey(seed.expose().to_owned()),
            Loaded::Token(token) => options.token(token.expose().to_owned()),
            Loaded::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
        };
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some(client) = &tls.client_cert {
            options =
                options.add_client_certificate(client.cert_file.clone(), client.key_file.clone());
        }
        Ok(options.require_tls(tls.is_required()))
    }
}

fn read(setting: Setting, path: &Path) -> Result<Vec<u8>, NatsOptionsError> {
    std::fs::read(path).map_err(|source| NatsOptionsError::Unreadable {
        setting,
        path: path.to_owned(),
        source,
    })
}

fn malformed(setting: Setting, path: &Path, problem: impl Into<String>) -> NatsOptionsError {
    NatsOptionsError::Malformed {
        setting,
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn load_creds(path: &Path) -> Result<Secret, NatsOptionsError> {
    let bytes = read(Setting::CredsFile, path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        malformed(
            Setting::CredsFile,
            path,
            "not a .creds file (not text); give the file `nsc generate creds` wrote",
        )
    })?;
    // async-nats's own parser, so what passes here is what it will accept.
    async_nats::ConnectOptions::new()
        .credentials(&text)
        .map_err(|e| not_creds(path, &e))?;
    Ok(Secret::new(text))
}

fn not_creds(path: &Path, e: &std::io::Error) -> NatsOptionsError {
    malformed(
        Setting::CredsFile,
        path,
        format!(
            "not a .creds file ({e}); it must hold a user JWT and its nkey seed, as `nsc generate creds` writes it"
        ),
    )
}

fn load_seed(path: &Path) -> Result<Secret, NatsOptionsError> {
    let bytes = read(Setting::NkeySeedFile, path)?;
    let seed = String::from_utf8(bytes)
        .ok()
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    // nkeys' errors are not quoted: they could echo part of the seed.
    let problem = match nkeys::KeyPair::from_seed(&seed) {
        Ok(pair) if pair.key_pair_type() == nkeys::KeyPairType::User => return Ok(Secret::new(seed)),
        Ok(pair) => format!(
            "holds a {:?} seed, not a user seed; give the seed of the user (SU…) whose public key (U…) the server lists",
            pair.key_pair_type()
        ),
        Err(_) => "does not hold an nkey seed; it must hold one user seed (SU…, 58 characters) and nothing else".to_owned(),
    };
    Err(malformed(Setting::NkeySeedFile, path, problem))
}

fn check_certificates(setting: Setting, path: &Path) -> Result<(), NatsOptionsError> {
    let pem = read(setting, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(setting, path, format!("not PEM ({e})")))?;
    if certificates.is_empty() {
        return Err(malformed(
            setting,
            path,
            "holds no certificate; it must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(())
}

fn check_private_key(path: &Path) -> Result<(), NatsOptionsError> {
    let pem = read(Setting::TlsKeyFile, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map(|_| ()).map_err(|_| {
        malformed(
            Setting::TlsKeyFile,
            path,
            "holds no private key; it must hold the PEM private key (-----BEGIN PRIVATE KEY-----) of nats_tls_cert_file",
        )
    })
}

#[cfg(test)]
mod tests;
