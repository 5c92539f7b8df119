//! One HTTPS client per provider type, each with its own connection pool:
//! keygate's TLS client config ([`crate::tls::client_config`]: the bundled
//! web roots and the provider's `ca_file`), HTTP/2 or HTTP/1.1 by ALPN,
//! connect bounded by `egress.connect_timeout`. Only `https://` is ever
//! dialled.

use crate::config::Provider;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::time::Duration;

/// What a provider call's request body is: the caller's, streamed.
pub(crate) type OutBody = UnsyncBoxBody<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub(crate) type ProviderClient = Client<HttpsConnector<HttpConnector>, OutBody>;

pub(crate) struct Providers {
    clients: BTreeMap<String, ProviderClient>,
}

impl Providers {
    pub(crate) fn new(
        providers: &BTreeMap<String, Provider>,
        connect_timeout: Duration,
    ) -> Result<Providers, String> {
        let mut clients = BTreeMap::new();
        for (kind, provider) in providers {
            let tls = crate::tls::client_config(
                provider.ca_file.as_deref(),
                &format!("egress.providers.{kind}.ca_file"),
            )?;
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(connect_timeout));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_only()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http);
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(https);
            clients.insert(kind.clone(), client);
        }
        Ok(Providers { clients })
    }

    pub(crate) fn client(&self, kind: &str) -> Option<&ProviderClient> {
        self.clients.get(kind)
    }
}
