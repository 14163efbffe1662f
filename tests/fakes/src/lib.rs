//! Local stand-ins for the third parties Herald's channel providers speak to, each speaking
//! the real wire protocol on a port-0 listener:
//!
//! - [`apns::ApnsFake`]: APNs over HTTP/2 **with TLS** (a test CA from [`tls::TestCa`];
//!   ALPN `h2` only, as Apple's servers). TLS rather than h2c because that is what the
//!   product's client must really negotiate; clients trust the CA as an extra root.
//!   It verifies the ES256 provider token (`kid`, `iss`, age), the headers and the payload.
//! - [`fcm::FcmFake`]: the FCM HTTP v1 API and its OAuth2 token endpoint (JWT bearer
//!   grant, RS256 assertions verified against the service account's public key).
//! - [`twilio::TwilioFake`]: Twilio's `Messages.json` (form body, basic auth, error codes).
//! - [`vonage::VonageFake`]: Vonage's `/sms/json` (JSON body, per-message status codes).
//! - [`webhook::WebhookReceiver`]: a receiver verifying `Herald-Signature`.
//!
//! Each fake records what it received and can be scripted ([`script::Reply`]) to answer
//! the next requests with specific errors, garbage, or not at all (hang).

pub mod apns;
pub mod fcm;
pub mod script;
pub mod server;
pub mod tls;
pub mod twilio;
pub mod vonage;
pub mod webhook;

pub use script::{Reply, Script};
