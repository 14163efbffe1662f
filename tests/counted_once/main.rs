//! Tests that read process-wide counters and need them to count one notification once:
//! alone in a process of their own, so the e2e suite's other tests (which hold emails for
//! digests and cap notifications by the dozen, in parallel) do not move the counters
//! between their two readings. The harness is the e2e suite's.

mod router_policy;
