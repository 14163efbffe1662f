//! Telling NATS refusing a connection from NATS not answering, and what to check for a
//! refusal. A refusal (credentials, TLS) will be the same on every retry, so it ends the
//! start-up with a message naming the settings to fix; anything else is waited out.

use crate::nats_auth::{NatsAuth, NatsTls};
use async_nats::ConnectErrorKind as Kind;
use async_nats::rustls::{AlertDescription, Error as TlsError};

/// What to check when `error` is NATS refusing rather than not answering; `None` when
/// it is not a refusal.
pub(super) fn hint(
    error: &async_nats::ConnectError,
    auth: &NatsAuth,
    tls: &NatsTls,
) -> Option<String> {
    if matches!(
        error.kind(),
        Kind::AuthorizationViolation | Kind::Authentication
    ) {
        return Some(match auth.setting() {
            None => "it requires credentials: set nats_creds_file, nats_nkey_seed_file or nats_token (or user:pass@ in nats_url)".to_owned(),
            Some(setting) => format!(
                "it does not accept the credentials of {setting}; check them against the server's authorization (or operator) configuration"
            ),
        });
    }
    let cause = tls_cause(error);
    if cause.is_none() && error.kind() != Kind::Tls {
        return None;
    }
    Some(match (cause, &tls.ca_file, &tls.client_cert) {
        (Some(TlsError::InvalidCertificate(_)), None, _) => {
            "TLS failed: the server's certificate does not verify; if a CA of your own signed it, set nats_tls_ca_file to that CA's certificate".to_owned()
        }
        (Some(TlsError::InvalidCertificate(_)), Some(ca), _) => format!(
            "TLS failed: the server's certificate does not verify against nats_tls_ca_file ({}); that file must hold the CA that signed it, and the certificate must name the host of nats_url",
            ca.display()
        ),
        (Some(TlsError::AlertReceived(AlertDescription::CertificateRequired)), _, None) => {
            "TLS failed: the server verifies clients (mutual TLS); set nats_tls_cert_file and nats_tls_key_file to a client certificate signed by a CA the server trusts".to_owned()
        }
        (Some(TlsError::AlertReceived(_)), _, Some(client)) => format!(
            "TLS failed: the server does not accept the client certificate of nats_tls_cert_file ({}); it must be signed by a CA in the server's tls ca_file, and be valid now",
            client.cert_file.display()
        ),
        (Some(TlsError::InvalidMessage(_)), _, _) => {
            "TLS failed: the server does not speak TLS on this port; turn tls on at the server, or drop nats_require_tls and the nats_tls_* settings".to_owned()
        }
        _ => "TLS failed; check nats_tls_ca_file, nats_tls_cert_file and nats_tls_key_file against the server's tls block".to_owned(),
    })
}

/// The TLS (rustls) error behind `error`, if any: a certificate that does not verify, an
/// alert from the server, a server that does not speak TLS. async-nats reports these as
/// I/O errors.
fn tls_cause<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e TlsError> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<TlsError>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps; look at that one too.
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<TlsError>())
        {
            return Some(tls);
        }
        cause = e.source();
    }
    None
}
