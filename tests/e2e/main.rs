//! Herald end to end: real nats-server processes, Herald meshes in-process, real clients.
//! One binary; each module is one area of the contract (SPEC.md), each test owns its
//! nats-server(s) and ports, so they run in parallel.

mod batch_items;
mod cancel_ids;
mod channels;
mod cluster;
mod digests;
mod durability;
mod erase;
mod errors;
mod frames;
mod group_refusals;
mod groups;
mod heartbeats;
mod hub;
mod isolation;
mod jwks;
mod jwks_refetch;
mod lanes;
mod metrics;
mod native;
mod nats_auth;
mod notify;
mod page;
mod policy;
mod preferences;
mod receipts;
mod replay;
mod router_digests;
mod router_groups;
mod router_lanes;
mod router_policy;
mod router_stalls;
mod routers;
mod scheduled;
mod sdk_js;
mod slow;
mod store_reads;
mod storm;
mod templates;
mod topic_locales;
mod topic_publishes;
mod topics;
mod topics_big;
mod transports;
mod url_tokens;
