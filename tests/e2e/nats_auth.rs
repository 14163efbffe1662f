//! Herald against a nats-server that demands credentials or TLS: an nkey user, a token,
//! a URL's `user:pass@`, operator-mode `.creds`, TLS with a CA of our own, mutual TLS.
//! What works carries a notification through (provisioning, the API's append, the inbox
//! read); what is refused is refused at once, with a message naming the setting to fix,
//! instead of a connection retried until a timeout.

use anyhow::{Context as _, ensure};
use herald_store::{ConnectError, NatsAuth, NatsOptions, NatsTls, Secret};
use herald_tests::trust::{NkeyUser, Operator, Pki};
use herald_tests::{Herald, Nats, eventually, within};
use std::path::Path;
use std::time::Duration;

/// A refusal must come well before the 30 s a mesh waits for an unreachable NATS.
const REFUSED_WITHIN: Duration = Duration::from_secs(10);

fn auth(auth: NatsAuth) -> NatsOptions {
    NatsOptions {
        auth,
        ..NatsOptions::default()
    }
}

/// Starts a whole mesh on `url` with `options` and sends one notification through it.
async fn delivers(nats: &Nats, url: &str, options: NatsOptions) -> anyhow::Result<()> {
    let herald = Herald::builder(nats)
        .nats(url.to_owned(), options)
        .start()
        .await?;
    let accepted = herald
        .send("alice", "through an authenticated NATS")
        .await?;
    let inbox = herald.inbox("alice").await?;
    ensure!(
        inbox.len() == 1 && inbox[0]["id"] == accepted.id.as_str(),
        "expected the one notification, got {inbox:?}"
    );
    herald.shutdown().await
}

/// Connects with `options` and expects a refusal whose message holds every one of
/// `expected`.
async fn refused(url: &str, options: &NatsOptions, expected: &[&str]) -> anyhow::Result<()> {
    let result = within(
        REFUSED_WITHIN,
        "a refused connection",
        herald_store::connect_with(url, options, "refused-test"),
    )
    .await?;
    let Err(err) = result else {
        anyhow::bail!("connected with options that should be refused: {options:?}");
    };
    ensure!(
        matches!(err, ConnectError::Refused { .. }),
        "expected a refusal, got {err:?}"
    );
    let text = herald_api::error::error_chain(&err);
    for part in expected {
        ensure!(text.contains(part), "{part:?} not in {text:?}");
    }
    Ok(())
}

fn dir(nats: &Nats, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = nats.dir().join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_seed_file_authenticates_and_a_wrong_seed_is_refused() -> anyhow::Result<()> {
    let herald_user = NkeyUser::new();
    let nats = Nats::single_with(&NkeyUser::authorization(&[&herald_user])).await?;
    let secrets = dir(&nats, "secrets")?;
    let seed = herald_user.seed_file(&secrets, "herald.nk")?;
    delivers(&nats, &nats.url(), auth(NatsAuth::NkeySeedFile(seed))).await?;

    let stranger = NkeyUser::new().seed_file(&secrets, "stranger.nk")?;
    refused(
        &nats.url(),
        &auth(NatsAuth::NkeySeedFile(stranger)),
        &[
            "refused the connection",
            "does not accept the credentials of nats_nkey_seed_file",
            "authorization violation",
        ],
    )
    .await?;
    refused(
        &nats.url(),
        &NatsOptions::default(),
        &["requires credentials: set nats_creds_file, nats_nkey_seed_file or nats_token"],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_and_url_credentials_authenticate() -> anyhow::Result<()> {
    let nats = Nats::single_with("authorization {\n  token: \"t0k3n-of-herald\"\n}").await?;
    let token = auth(NatsAuth::Token(Secret::new("t0k3n-of-herald")));
    delivers(&nats, &nats.url(), token).await?;
    // `nats://<token>@host`, as other NATS clients read it.
    let in_url = nats.url().replace("nats://", "nats://t0k3n-of-herald@");
    herald_store::connect(&in_url, "token-in-url").await?;
    refused(
        &nats.url(),
        &auth(NatsAuth::Token(Secret::new("not-the-token"))),
        &["nats_token"],
    )
    .await?;

    // A password with characters a URL reserves, percent-encoded in the URL.
    let users = Nats::single_with(
        "authorization {\n  users: [ { user: herald, password: \"p@ss/w:rd\" } ]\n}",
    )
    .await?;
    let url = users
        .url()
        .replace("nats://", "nats://herald:p%40ss%2Fw%3Ard@");
    delivers(&users, &url, NatsOptions::default()).await?;
    let wrong = users.url().replace("nats://", "nats://herald:guess@");
    refused(
        &wrong,
        &NatsOptions::default(),
        &["credentials of nats_url"],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_authenticates_in_operator_mode() -> anyhow::Result<()> {
    let operator = Operator::new()?;
    let nats = Nats::single_with(&operator.server_config()).await?;
    let secrets = dir(&nats, "secrets")?;
    let creds = operator.user_creds(&secrets, "herald.creds")?;
    delivers(&nats, &nats.url(), auth(NatsAuth::CredsFile(creds))).await?;

    let stranger = Operator::stranger_creds(&secrets, "stranger.creds")?;
    refused(
        &nats.url(),
        &auth(NatsAuth::CredsFile(stranger)),
        &["credentials of nats_creds_file", "authorization violation"],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_our_ca_connects_and_without_it_is_refused() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let pki = Pki::new(&scratch.path().join("pki"))?;
    let nats = Nats::single_with(&pki.server_tls(false)).await?;
    let tls = |tls: NatsTls| NatsOptions {
        auth: NatsAuth::None,
        tls,
    };
    delivers(&nats, &nats.url(), tls(pki.client_tls(false))).await?;
    // `localhost` is in the certificate as well as 127.0.0.1.
    let by_name = nats.url().replace("127.0.0.1", "localhost");
    herald_store::connect_with(&by_name, &tls(pki.client_tls(false)), "by-name").await?;

    refused(
        &nats.url(),
        &NatsOptions::default(),
        &["UnknownIssuer", "does not verify", "set nats_tls_ca_file"],
    )
    .await?;
    let other = Pki::new(&scratch.path().join("other"))?;
    let ca = other.ca.display().to_string();
    refused(
        &nats.url(),
        &tls(other.client_tls(false)),
        &[
            "invalid peer certificate",
            &format!("does not verify against nats_tls_ca_file ({ca})"),
        ],
    )
    .await?;

    // TLS asked for, and the server has none: refused, never sent in clear text.
    let plain = Nats::single().await?;
    refused(
        &plain.url(),
        &tls(pki.client_tls(false)),
        &["does not speak TLS on this port"],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let pki = Pki::new(&scratch.path().join("pki"))?;
    let user = NkeyUser::new();
    // Mutual TLS and an nkey user: both must hold.
    let nats = Nats::single_with(&format!(
        "{}\n{}",
        pki.server_tls(true),
        NkeyUser::authorization(&[&user])
    ))
    .await?;
    let seed = user.seed_file(&dir(&nats, "secrets")?, "herald.nk")?;
    let options = |with_certificate| NatsOptions {
        auth: NatsAuth::NkeySeedFile(seed.clone()),
        tls: pki.client_tls(with_certificate),
    };
    delivers(&nats, &nats.url(), options(true)).await?;
    refused(
        &nats.url(),
        &options(false),
        &[
            "CertificateRequired",
            "verifies clients (mutual TLS); set nats_tls_cert_file and nats_tls_key_file",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_file_fails_before_dialing() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let missing = Path::new("/nonexistent/herald.creds");
    let err = herald_store::connect_with(
        &nats.url(),
        &auth(NatsAuth::CredsFile(missing.to_owned())),
        "missing-file",
    )
    .await
    .err()
    .context("connected with a creds file that does not exist")?;
    let text = herald_api::error::error_chain(&err);
    ensure!(
        text.starts_with("nats_creds_file /nonexistent/herald.creds: cannot be read"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_is_waited_for_not_refused() -> anyhow::Result<()> {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let url = format!("nats://127.0.0.1:{port}");
    // Nothing listens yet: connecting returns at once, and keeps trying.
    let nats = within(
        REFUSED_WITHIN,
        "connecting to a NATS that is not there yet",
        herald_store::connect(&url, "early"),
    )
    .await??;
    ensure!(!nats.is_connected(), "connected to nothing");
    eventually(
        Duration::from_secs(10),
        "the failed attempts are reported",
        || async { nats.problem().context("no connection error reported yet") },
    )
    .await?;
    let store = tempfile::tempdir()?;
    let _server = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions {
        client_port: Some(port),
        ..herald_natsd::NatsServerOptions::dev(store.path().join("nats"))
    })
    .await?;
    eventually(
        Duration::from_secs(20),
        "connected once NATS is there",
        || async {
            ensure!(nats.is_connected(), "not connected yet");
            Ok(())
        },
    )
    .await?;
    ensure!(
        nats.problem().is_none(),
        "{:?} still reported",
        nats.problem()
    );
    Ok(())
}
