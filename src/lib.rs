//! keygate: a reverse-proxy authorization gateway for workflow-engine webhooks.
//!
//! A request walks: [`server`] (listeners, TLS, runtimes) → [`proxy`] (route
//! match, checks, forwarding) → [`auth`] (key and owner checks over a cache in
//! front of the [`store`]) → upstream; successful authentications feed the
//! [`usage`] batcher that writes `lastUsedAt` in the background.
//!
//! The control plane is [`admin`] (HTTP API on its own listener) and [`cli`]
//! (which drives it). [`config`] parses and checks YAML; [`key`] owns the
//! `wfb_` key format; [`metrics`] renders Prometheus text.

pub(crate) mod admin;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
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
