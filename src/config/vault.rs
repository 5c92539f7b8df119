//! The `vault` and `egress` sections: the master keys integration
//! credentials are sealed under, and the listener that injects them on the
//! way to a provider, with the providers keygate knows (built in, and any
//! the config adds or overrides).

use super::ConfigError;
use super::raw::{RawEgress, RawMasterKey, RawProvider, RawVault};
use super::validate::{duration, err, from_env, header_name, resolve, socket_addr};
use http::HeaderName;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::Zeroizing;

/// 32 secret bytes, zeroed when dropped and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub Zeroizing<[u8; 32]>);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(…)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKey {
    pub id: String,
    pub key: SecretKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    /// The first seals; every one opens what it sealed.
    pub master_keys: Vec<MasterKey>,
    /// Signs run tokens; `None`: a key derived from each master key.
    pub run_token_key: Option<SecretKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    pub listen: SocketAddr,
    pub run_token_ttl: Duration,
    /// What `POST /admin/v1/run-tokens` accepts besides the admin token,
    /// for a scheduler that should hold nothing else.
    pub mint_token: Option<MintToken>,
    /// By type: the built-ins, with the config's added or overriding.
    pub providers: BTreeMap<String, Provider>,
    pub connect_timeout: Duration,
    /// Until the provider's answer head arrives.
    pub response_timeout: Duration,
}

#[derive(Clone, PartialEq, Eq)]
pub struct MintToken(pub String);

impl fmt::Debug for MintToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MintToken(…)")
    }
}

/// A provider's fixed destination and the headers that carry a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub base: ProviderUrl,
    pub inject: Vec<(HeaderName, Template)>,
    /// CA certificates (PEM) trusted for this provider besides the bundled
    /// web roots (a provider behind a private CA, or a test's).
    pub ca_file: Option<PathBuf>,
}

impl Provider {
    /// The credential fields its headers use, in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut fields = Vec::new();
        for (_, template) in &self.inject {
            for part in &template.0 {
                if let Part::Field(name) = part
                    && !fields.contains(&name.as_str())
                {
                    fields.push(name.as_str());
                }
            }
        }
        fields
    }
}

/// `https://host[:port][/path]`: where every call to a provider goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderUrl {
    /// `host:port`, to connect to.
    pub authority: String,
    /// The host, for SNI, the certificate and `Host`.
    pub host: String,
    pub port: u16,
    /// Without a trailing `/`; empty for the root.
    pub path: String,
}

/// A header value with `{field}` holes for the credential's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Field(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("{text:?}: a `{{` without its `}}`"))?;
            let field = &after[..close];
            if field.is_empty()
                || !field
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!("{text:?}: {{{field}}} is not a field name"));
            }
            parts.push(Part::Field(field.to_owned()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?}: a `}}` without its `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(format!(
                "{text:?} names no credential field, as in \"Bearer {{apiKey}}\""
            ));
        }
        Ok(Template(parts))
    }
}

/// The providers keygate knows without config: Skytells, and the
/// workflow-builder template's plugin types whose destination and header
/// are fixed, with the field names the template stores their credential
/// under.
/// (type, base URL, [(header, template)])
type BuiltIn = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const BUILT_IN: [BuiltIn; 13] = [
    (
        "skytells",
        "https://api.skytells.ai/v1",
        &[
            ("x-api-key", "{apiKey}"),
            ("authorization", "Bearer {apiKey}"),
        ],
    ),
    (
        "firecrawl",
        "https://api.firecrawl.dev/v1",
        &[("authorization", "Bearer {firecrawlApiKey}")],
    ),
    (
        "resend",
        "https://api.resend.com",
        &[("authorization", "Bearer {apiKey}")],
    ),
    (
        "slack",
        "https://slack.com/api",
        &[("authorization", "Bearer {apiKey}")],
    ),
    (
        "stripe",
        "https://api.stripe.com/v1",
        &[("authorization", "Bearer {apiKey}")],
    ),
    (
        "github",
        "https://api.github.com",
        &[("authorization", "Bearer {token}")],
    ),
    (
        "linear",
        "https://api.linear.app",
        &[("authorization", "{apiKey}")],
    ),
    (
        "perplexity",
        "https://api.perplexity.ai",
        &[("authorization", "Bearer {apiKey}")],
    ),
    (
        "fal",
        "https://queue.fal.run",
        &[("authorization", "Key {apiKey}")],
    ),
    (
        "clerk",
        "https://api.clerk.com/v1",
        &[("authorization", "Bearer {clerkSecretKey}")],
    ),
    (
        "webflow",
        "https://api.webflow.com/v2",
        &[("authorization", "Bearer {apiKey}")],
    ),
    (
        "superagent",
        "https://app.superagent.sh/api",
        &[("authorization", "Bearer {superagentApiKey}")],
    ),
    (
        "blob",
        "https://blob.vercel-storage.com",
        &[("authorization", "Bearer {token}")],
    ),
];

pub(super) fn vault(
    raw: RawVault,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<VaultConfig, ConfigError> {
    if raw.master_keys.is_empty() {
        return err("vault.master_keys: list at least one {id, key}");
    }
    let mut master_keys: Vec<MasterKey> = Vec::new();
    for (i, RawMasterKey { id, key }) in raw.master_keys.into_iter().enumerate() {
        let field = format!("vault.master_keys[{i}]");
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return err(format!("{field}.id: 1 to 64 of A-Z a-z 0-9 - _ ."));
        }
        if master_keys.iter().any(|k| k.id == id) {
            return err(format!("{field}.id: {id:?} is listed twice"));
        }
        let key = secret_key(
            &format!("{field}.key"),
            &from_env(&format!("{field}.key"), &key, env)?,
        )?;
        master_keys.push(MasterKey { id, key });
    }
    let run_token_key = match raw.run_token_key {
        None => None,
        Some(value) => Some(secret_key(
            "vault.run_token_key",
            &from_env("vault.run_token_key", &value, env)?,
        )?),
    };
    Ok(VaultConfig {
        master_keys,
        run_token_key,
    })
}

/// 64 hex characters.
fn secret_key(field: &str, hex_text: &str) -> Result<SecretKey, ConfigError> {
    let mut key = Zeroizing::new([0u8; 32]);
    if hex::decode_to_slice(hex_text.trim(), key.as_mut_slice()).is_err() {
        // The value is a secret: say what is wrong with it, never what it is.
        return err(format!(
            "{field}: expected 64 hex characters (32 bytes), got {} characters",
            hex_text.trim().len()
        ));
    }
    Ok(SecretKey(key))
}

pub(super) fn egress(
    raw: RawEgress,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<EgressConfig, ConfigError> {
    let listen = socket_addr(
        "egress.listen",
        raw.listen.as_deref().unwrap_or("127.0.0.1:8081"),
    )?;
    let run_token_ttl = duration("egress.run_token_ttl", raw.run_token_ttl.as_deref(), "1h")?;
    if run_token_ttl.is_zero() {
        return err("egress.run_token_ttl: must be more than 0");
    }
    let mint_token = match raw.mint_token {
        None => None,
        Some(value) => {
            let token = from_env("egress.mint_token", &value, env)?;
            if token.len() < 16 {
                return err("egress.mint_token: at least 16 characters");
            }
            Some(MintToken(token))
        }
    };
    let mut providers = BTreeMap::new();
    for (kind, base_url, inject) in BUILT_IN {
        let inject = inject
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    Template::parse(value).expect("built-in templates parse"),
                )
            })
            .collect();
        let base_url = provider_url("egress.providers", base_url).expect("built-in URLs parse");
        providers.insert(
            kind.to_owned(),
            Provider {
                base: base_url,
                inject,
                ca_file: None,
            },
        );
    }
    for (
        kind,
        RawProvider {
            base_url,
            inject,
            ca_file,
        },
    ) in raw.providers.unwrap_or_default()
    {
        let field = format!("egress.providers.{kind}");
        if kind.is_empty()
            || !kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return err(format!("{field}: a type is letters, digits, - and _"));
        }
        let built_in = providers.get(&kind).cloned();
        let destination = match (base_url, &built_in) {
            (Some(url), _) => provider_url(&format!("{field}.base_url"), &url)?,
            (None, Some(known)) => known.base.clone(),
            (None, None) => {
                return err(format!(
                    "{field}.base_url: required for a type keygate does not know"
                ));
            }
        };
        let inject = match (inject, &built_in) {
            (Some(map), _) => {
                let mut headers = Vec::new();
                for (name, value) in map {
                    let header = header_name(&format!("{field}.inject"), &name)?;
                    let template = Template::parse(&value)
                        .map_err(|e| ConfigError(format!("{field}.inject.{name}: {e}")))?;
                    headers.push((header, template));
                }
                if headers.is_empty() {
                    return err(format!("{field}.inject: name at least one header"));
                }
                headers
            }
            (None, Some(known)) => known.inject.clone(),
            (None, None) => {
                return err(format!(
                    "{field}.inject: required for a type keygate does not know"
                ));
            }
        };
        providers.insert(
            kind,
            Provider {
                base: destination,
                inject,
                ca_file: ca_file.map(|path| resolve(base, path)),
            },
        );
    }
    Ok(EgressConfig {
        listen,
        run_token_ttl,
        mint_token,
        providers,
        connect_timeout: duration(
            "egress.connect_timeout",
            raw.connect_timeout.as_deref(),
            "5s",
        )?,
        response_timeout: duration(
            "egress.response_timeout",
            raw.response_timeout.as_deref(),
            "60s",
        )?,
    })
}

/// Only `https://`: a credential never travels in the clear.
fn provider_url(field: &str, value: &str) -> Result<ProviderUrl, ConfigError> {
    let Some(rest) = value.strip_prefix("https://") else {
        return err(format!(
            "{field}: expected https://host[/path], got {value:?}"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let parsed = authority
        .parse::<http::uri::Authority>()
        .ok()
        .filter(|a| !a.as_str().contains('@') && !a.host().is_empty());
    let Some(parsed) = parsed else {
        return err(format!("{field}: invalid host in {value:?}"));
    };
    if path.contains(['?', '#']) {
        return err(format!("{field}: no query or fragment in {value:?}"));
    }
    let port = parsed.port_u16().unwrap_or(443);
    let host = parsed
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(ProviderUrl {
        authority: format!("{}:{port}", parsed.host()),
        host,
        port,
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_into_text_and_fields() {
        let t = Template::parse("Bearer {apiKey}").unwrap();
        assert_eq!(
            t.0,
            [Part::Text("Bearer ".into()), Part::Field("apiKey".into())]
        );
        assert!(
            Template::parse("Bearer")
                .unwrap_err()
                .contains("no credential field")
        );
        assert!(Template::parse("{api key}").is_err());
        assert!(Template::parse("{apiKey").is_err());
        assert!(Template::parse("x}").is_err());
    }

    #[test]
    fn provider_urls_are_https_only() {
        let url = provider_url("f", "https://api.skytells.ai/v1/").unwrap();
        assert_eq!(
            (
                url.authority.as_str(),
                url.host.as_str(),
                url.port,
                url.path.as_str()
            ),
            ("api.skytells.ai:443", "api.skytells.ai", 443, "/v1")
        );
        let local = provider_url("f", "https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (local.authority.as_str(), local.path.as_str()),
            ("127.0.0.1:8443", "")
        );
        assert!(provider_url("f", "http://api.example").is_err());
        assert!(provider_url("f", "https://user@host").is_err());
        assert!(provider_url("f", "https://host/p?x=1").is_err());
    }

    #[test]
    fn built_in_providers_name_their_fields() {
        let config = super::super::Config::from_yaml_with_env(
            "vault:\n  master_keys: [{id: k1, key: \"${K}\"}]\n",
            Path::new("."),
            &|_| Some("01".repeat(32)),
        )
        .unwrap();
        let egress = config.egress.unwrap();
        assert_eq!(egress.providers["skytells"].fields(), ["apiKey"]);
        assert_eq!(egress.providers["firecrawl"].fields(), ["firecrawlApiKey"]);
        assert_eq!(egress.providers.len(), 13);
        assert_eq!(egress.listen.to_string(), "127.0.0.1:8081");
    }
}
