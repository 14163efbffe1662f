//! Every provider against a local fake speaking its real protocol: what goes on the wire,
//! and how every kind of answer — success, each documented error, garbage, silence — is
//! classified.

mod apns;
mod common;
mod config;
mod fcm;
mod sms;
mod webhook;
