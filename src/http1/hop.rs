//! Hop-by-hop fields (RFC 9110 §7.6.1): the fixed list, and the names a
//! message's `Connection` fields add to it.

use super::Field;
use http::header::HeaderMap;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1),
/// and `Upgrade`, which keygate does not carry out.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a field name is `lower`, ignoring case.
pub fn is(name: &[u8], lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower.as_bytes())
}

/// The names a message's `Connection` fields list; they are hop-by-hop
/// too. Read from the fields when asked, so the usual message costs one
/// pass and no allocation.
pub struct Named<I> {
    fields: I,
    any: bool,
}

pub fn connection_named<'a, I>(fields: I) -> Named<I>
where
    I: Iterator<Item = Field<'a>> + Clone,
{
    let any = fields.clone().any(|(name, _)| is(name, "connection"));
    Named { fields, any }
}

impl<'a, I> Named<I>
where
    I: Iterator<Item = Field<'a>> + Clone,
{
    pub fn contains(&self, name: &[u8]) -> bool {
        self.any
            && self
                .fields
                .clone()
                .filter(|(n, _)| is(n, "connection"))
                .flat_map(|(_, value)| value.split(|b| *b == b','))
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
    }

    /// Whether a field belongs to one connection only, by name.
    pub fn is_hop_by_hop(&self, name: &[u8]) -> bool {
        HOP_BY_HOP.iter().any(|h| is(name, h)) || self.contains(name)
    }
}
/// A header map's fields in the form the rules take.
pub fn fields_of(headers: &HeaderMap) -> impl Iterator<Item = Field<'_>> + Clone {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        .collect::<Vec<_>>()
        .into_iter()
}
