//! The data plane, in the order a request walks it:
//! - [`h1`] and [`h2`]: the two client-facing protocols, each reading a
//!   request and driving its exchange;
//! - [`gateway`]: the decision, in DESIGN.md's order, using [`route`],
//!   [`limiter`] (failed authentications per client), [`credentials`] (the
//!   `Bearer` key), the caches in `auth`, and [`key_rate`];
//! - [`identity`]: the head a permitted request goes upstream with (the
//!   client's copies of trusted headers removed, then the trusted values
//!   written);
//! - [`upstream`]: the per-worker pools of upstream connections and the
//!   exchange over them;
//! - [`reject`]: every answer keygate gives on its own, in one table, and
//!   [`cors`] the preflight's; [`drain`]: what of a refused body is read;
//! - [`trace`]: request ids, metrics and the access log;
//! - [`live`]: the gateway in force, replaced whole on a reload.

pub(crate) mod cors;
pub(crate) mod credentials;
pub(crate) mod drain;
pub(crate) mod gateway;
pub mod h1;
pub mod h2;
pub(crate) mod identity;
pub(crate) mod key_rate;
pub(crate) mod limiter;
pub(crate) mod live;
pub(crate) mod reject;
pub(crate) mod route;
pub(crate) mod run_token;
pub(crate) mod trace;
pub(crate) mod upstream;

pub(crate) use gateway::{ConnInfo, Gateway};
pub(crate) use live::{Live, WorkerGateway};
