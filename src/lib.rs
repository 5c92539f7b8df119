//! keygate: a reverse-proxy authorization gateway for workflow-engine webhooks.
//!
//! A request walks: [`server`] (listeners, worker threads, TLS) → [`proxy`]
//! (route match, the checks in DESIGN.md's order, forwarding) → [`auth`]
//! (key and owner checks over caches in front of the [`store`]) → upstream,
//! over [`http1`], the RFC 9112 engine both legs use. Successful
//! authentications feed [`usage`], which writes `lastUsedAt` in the
//! background.
//!
//! The crate map:
//!
//! | module | what it is |
//! |---|---|
//! | [`server`] | the process: listeners, worker runtimes, connections (TLS, protocol sniff), reload, takeover |
//! | [`proxy`] | the data plane: the gateway's decision, refusals, trusted identity, the h1 and h2 sides, upstream pools |
//! | [`http1`] | the HTTP/1.1 engine: heads, body decoding, encoding, hop-by-hop rules; knows no key, route or store |
//! | [`auth`] | key and owner checks: caches, per-thread front copies, invalidation fences |
//! | [`store`] | the `Store` trait and its embedded (redb), Redis and postgres (the engine's own tables) implementations |
//! | [`usage`] | the `lastUsedAt` batcher and its final flush |
//! | [`invalidate`] | revocations and owner changes published to every instance (Redis pub/sub, postgres `LISTEN`/`NOTIFY`) |
//! | [`admin`] | the admin API: routes, views, input rules, token, and the client the CLI uses |
//! | [`cli`] | the `keygate` command line |
//! | [`config`] | YAML to checked types, one check per section; routes parsed once |
//! | [`key`] | the `wfb_` key: generation, shape, SHA-256 hash, prefix |
//! | [`metrics`] | counters behind `/metrics`, rendered as Prometheus text |
//! | [`clock`] | wall-clock and monotonic time, RFC 3339 and HTTP dates |
//! | [`sched`] | the worker threads' scheduling policy and CPU affinity |
//! | [`tls`] | rustls for the data plane, certificates swapped on reload |
//! | [`vault`] | integration credentials sealed with AES-256-GCM, run tokens, the template's import |
//! | [`egress`] | the listener that injects a run owner's credential on the way to a provider |
//!
//! `proxy`, `http1`, `usage`, `invalidate`, `admin` and `tls` are
//! crate-private: tests and benches reach the gateway through [`server`],
//! [`cli`] and the public types. These docs are for the crate's developers
//! (`cargo doc --document-private-items`), so they link private items.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod admin;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod egress;
pub(crate) mod http1;
pub(crate) mod invalidate;
pub mod key;
pub mod metrics;
pub(crate) mod proxy;
pub mod sched;
pub mod server;
pub mod store;
pub(crate) mod tls;
pub(crate) mod usage;
pub mod vault;
