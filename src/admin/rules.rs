//! What the admin API accepts as ids and names, and the refusal for each.

use super::views::{AdminResponse, error};
use crate::key;
use http::StatusCode;

/// User ids travel in a header upstream: visible ASCII only.
pub fn valid_user_id(s: &str) -> bool {
    (1..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Workflow ids sit in a URL path segment: unreserved characters only,
/// and never a dot segment, which an engine could resolve to another path.
pub fn valid_workflow_id(s: &str) -> bool {
    (1..=256).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// The 400 for an unusable user id, if it is one.
pub(super) fn refuse_user_id(user_id: &str) -> Option<AdminResponse> {
    (!valid_user_id(user_id)).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "userId must be 1 to 256 visible ASCII characters",
        )
    })
}

/// Names are shown in listings, logs and terminals: printable text only.
/// Control characters, text-direction overrides and isolates (which can
/// make a name read as another, "Trojan Source"), zero-width characters
/// and line or paragraph separators are refused.
pub fn valid_name(s: &str) -> bool {
    s.chars().count() <= 128 && !s.chars().any(deceptive)
}

/// The message for a name [`valid_name`] refuses.
pub const NAME_RULE: &str = "name must be at most 128 characters, without control, zero-width, line-separator or text-direction characters";

fn deceptive(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200B}'..='\u{200F}'   // zero-width space, joiners, LRM, RLM
            | '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{202A}'..='\u{202E}' // embeddings and overrides
            | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}' // isolates
            | '\u{061C}'               // Arabic letter mark
            | '\u{FEFF}') // zero-width no-break space
}

/// The refusal for a key id that is really a key: the key is never echoed.
pub(super) fn refuse_key_as_id(id: &str) -> Option<AdminResponse> {
    (id.starts_with(key::KEY_SCHEME) || id.starts_with("sk-")).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "that looks like a key, not a key id; use `keys list` to find the id",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_screened() {
        assert!(valid_user_id("user_1@example.com"));
        assert!(!valid_user_id("has space"));
        assert!(!valid_user_id(""));
        assert!(valid_workflow_id("wf_AbC-1.2~"));
        assert!(valid_workflow_id("..."));
        assert!(!valid_workflow_id("a/b"));
        assert!(!valid_workflow_id("a%2Fb"));
        assert!(!valid_workflow_id("."));
        assert!(!valid_workflow_id(".."));
    }

    #[test]
    fn names_keep_printable_unicode_and_refuse_deceptive_characters() {
        for good in [
            "production",
            "Prod – EU",
            "clé de test",
            "東京",
            "🚀 deploy",
            "",
        ] {
            assert!(valid_name(good), "{good:?}");
        }
        for bad in [
            "tab\there",
            "new\nline",
            "bell\u{7}",
            "admin\u{202E}txt.exe",
            "a\u{2066}b\u{2069}",
            "zero\u{200B}width",
            "joiner\u{200D}",
            "bom\u{FEFF}",
            "line\u{2028}sep",
            "para\u{2029}sep",
            "\u{61C}mark",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"x".repeat(129)));
    }
}
