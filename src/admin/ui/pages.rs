//! The panel's pages as HTML. Every value from the store is escaped; no
//! page ever holds a key or a secret (a new key exists only in the dialog
//! the script builds). Controls carry `data-test` names that tests and
//! scripts may rely on.

use crate::clock;
use crate::store::{IntegrationRecord, KeyRecord, WorkflowOwner};
use std::fmt::Write;

/// Text or an attribute value, escaped for HTML.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tab {
    Keys,
    Workflows,
    Integrations,
    None,
}

/// The frame of every signed-in page.
fn frame(title: &str, csrf: &str, tab: Tab, vault: bool, main: &str) -> String {
    let link = |href: &str, label: &str, this: Tab| {
        let current = if tab == this {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<a href=\"{href}\"{current}>{label}</a>")
    };
    let mut nav = link("/ui/keys", "API Keys", Tab::Keys)
        + &link("/ui/workflows", "Workflows", Tab::Workflows);
    if vault {
        nav += &link("/ui/integrations", "Integrations", Tab::Integrations);
    }
    let csrf = esc(csrf);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"csrf\" content=\"{csrf}\">\
         <title>{title} · keygate</title><link rel=\"stylesheet\" href=\"/ui/app.css\">\
         <script src=\"/ui/app.js\" defer></script></head><body>\
         <header><span class=\"brand\">keygate</span><nav aria-label=\"Main\">{nav}</nav>\
         <form method=\"post\" action=\"/ui/logout\" class=\"logout\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\" class=\"secondary\">Sign out</button></form></header>\
         <main>{main}\
         <p id=\"message\" class=\"message\" role=\"alert\" aria-live=\"assertive\"></p></main>{}</body></html>\n",
        dialogs()
    )
}

/// The dialogs the script opens: a new key (filled in by the script, never
/// by the server) and a confirmation.
fn dialogs() -> &'static str {
    "<dialog id=\"key-dialog\" aria-labelledby=\"key-dialog-title\" aria-describedby=\"key-dialog-note\">\
     <h2 id=\"key-dialog-title\">Your new API key</h2>\
     <p id=\"key-dialog-note\">Copy it now: it is shown only once. keygate keeps only its hash.</p>\
     <p class=\"key\"><output data-test=\"new-key\" id=\"new-key\"></output></p>\
     <p class=\"buttons\"><button type=\"button\" id=\"copy-key\">Copy</button>\
     <button type=\"button\" class=\"secondary\" data-test=\"close\" id=\"close-key\">Close</button></p></dialog>\
     <dialog id=\"confirm-dialog\" aria-labelledby=\"confirm-title\">\
     <h2 id=\"confirm-title\">Are you sure?</h2><p id=\"confirm-text\"></p>\
     <p class=\"buttons\"><button type=\"button\" class=\"danger\" data-test=\"confirm\" id=\"confirm-yes\">Confirm</button>\
     <button type=\"button\" class=\"secondary\" id=\"confirm-no\">Cancel</button></p></dialog>"
}

pub(super) fn login(nonce: &str, message: Option<&str>) -> String {
    let message = message
        .map(|m| format!("<p class=\"message error\" role=\"alert\">{}</p>", esc(m)))
        .unwrap_or_default();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Sign in · keygate</title><link rel=\"stylesheet\" href=\"/ui/app.css\"></head><body>\
         <main class=\"narrow\"><h1>Sign in to keygate</h1>{message}\
         <form method=\"post\" action=\"/ui/login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <label for=\"token\">Admin token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus data-test=\"token\">\
         <button type=\"submit\" data-test=\"login\">Sign in</button></form>\
         <p class=\"hint\">The token is <code>admin.token</code>, or the token file the server wrote.</p></main></body></html>\n",
        esc(nonce)
    )
}

/// `3 minutes ago`, for a time before `now` (Unix ms).
fn ago(at: i64, now: i64) -> String {
    let s = (now - at).max(0) / 1000;
    let (n, unit) = match s {
        0..=59 => return "just now".to_owned(),
        60..=3599 => (s / 60, "minute"),
        3600..=86_399 => (s / 3600, "hour"),
        _ => (s / 86_400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// `in 3 days`, or `expired` for a time at or before `now`.
fn until(at: i64, now: i64) -> String {
    if at <= now {
        return "expired".to_owned();
    }
    let s = (at - now) / 1000;
    let (n, unit) = match s {
        0..=59 => (s.max(1), "second"),
        60..=3599 => (s / 60, "minute"),
        3600..=86_399 => (s / 3600, "hour"),
        _ => (s / 86_400, "day"),
    };
    format!("in {n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// A time shown relative, exact on hover (and to screen readers).
fn when(at: Option<i64>, now: i64, relative: fn(i64, i64) -> String, none: &str) -> String {
    match at {
        None => format!("<span class=\"muted\">{none}</span>"),
        Some(at) => {
            let exact = clock::rfc3339(at);
            format!(
                "<time datetime=\"{exact}\" title=\"{exact}\">{}</time>",
                relative(at, now)
            )
        }
    }
}

pub(super) struct KeysPage<'a> {
    pub csrf: &'a str,
    pub user: Option<&'a str>,
    pub users: &'a [&'a str],
    pub keys: &'a [&'a KeyRecord],
    pub now: i64,
    pub stale_after_ms: i64,
    pub vault: bool,
}

pub(super) fn keys(p: &KeysPage<'_>) -> String {
    let mut main = String::from("<h1>API Keys</h1>");
    let options: String = p
        .users
        .iter()
        .take(1000)
        .map(|u| format!("<option value=\"{}\"></option>", esc(u)))
        .collect();
    let _ = write!(
        main,
        "<form method=\"get\" action=\"/ui/keys\" class=\"row\">\
         <label for=\"user\">User</label>\
         <input id=\"user\" name=\"user\" list=\"users\" required value=\"{}\" data-test=\"user\" autocomplete=\"off\">\
         <datalist id=\"users\">{options}</datalist>\
         <button type=\"submit\" class=\"secondary\">Show keys</button></form>",
        esc(p.user.unwrap_or(""))
    );
    let Some(user) = p.user else {
        main.push_str("<p>Pick a user to see and create their keys. Users with keys are offered as you type.</p>");
        return frame("API Keys", p.csrf, Tab::Keys, p.vault, &main);
    };
    let user_attr = esc(user);
    let _ = write!(
        main,
        "<section aria-labelledby=\"create-title\"><h2 id=\"create-title\">Create key</h2>\
         <form data-api-method=\"POST\" data-api-path=\"/ui/api/keys\" class=\"grid\">\
         <input type=\"hidden\" name=\"userId\" value=\"{user_attr}\">\
         <label for=\"name\">Name <span class=\"muted\">(optional)</span></label>\
         <input id=\"name\" name=\"name\" maxlength=\"128\" data-test=\"name\" placeholder=\"production\">\
         <label for=\"expiresIn\">Expires in <span class=\"muted\">(optional, e.g. 30d)</span></label>\
         <input id=\"expiresIn\" name=\"expiresIn\" data-test=\"expires-in\" placeholder=\"30d\">\
         <label for=\"workflows\">Only these workflows <span class=\"muted\">(optional, comma-separated)</span></label>\
         <input id=\"workflows\" name=\"workflows\" data-list=\"1\" data-test=\"workflows\">\
         <label for=\"rate\">Rate <span class=\"muted\">(optional, e.g. 100/1m)</span></label>\
         <input id=\"rate\" name=\"rate\" data-test=\"rate\" placeholder=\"100/1m\">\
         <span></span><button type=\"submit\" data-test=\"create\">Create key</button></form></section>"
    );
    let _ = write!(
        main,
        "<section aria-labelledby=\"list-title\"><h2 id=\"list-title\">Keys of {user_attr}</h2>"
    );
    if p.keys.is_empty() {
        main.push_str("<p>No keys yet.</p></section>");
        return frame("API Keys", p.csrf, Tab::Keys, p.vault, &main);
    }
    main.push_str(
        "<table><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Key</th><th scope=\"col\">Created</th>\
         <th scope=\"col\">Last used</th><th scope=\"col\">Expires</th><th scope=\"col\">Limits</th>\
         <th scope=\"col\"><span class=\"visually-hidden\">Actions</span></th></tr></thead><tbody>",
    );
    for k in p.keys {
        let last = k.last_used_at.unwrap_or(k.created_at);
        let stale = p.now.saturating_sub(last) >= p.stale_after_ms;
        let stale_badge = match (stale, k.last_used_at) {
            (false, _) => String::new(),
            (true, None) => {
                " <span class=\"badge\" data-test=\"stale\">stale: never used</span>".to_owned()
            }
            (true, Some(_)) => " <span class=\"badge\" data-test=\"stale\">stale</span>".to_owned(),
        };
        let mut limits = Vec::new();
        if let Some(w) = &k.workflows {
            limits.push(format!("workflows {}", esc(&w.join(", "))));
        }
        if let Some(r) = k.rate {
            limits.push(format!("rate {r}"));
        }
        let limits = if limits.is_empty() {
            "<span class=\"muted\">none</span>".to_owned()
        } else {
            limits.join("; ")
        };
        let name = if k.name.is_empty() {
            "<span class=\"muted\">(no name)</span>".to_owned()
        } else {
            esc(&k.name)
        };
        let (id, prefix) = (esc(&k.id), esc(&k.prefix));
        let label = if k.name.is_empty() {
            prefix.clone()
        } else {
            esc(&k.name)
        };
        let _ = write!(
            main,
            "<tr data-test=\"key-row\" data-id=\"{id}\"><td>{name}{stale_badge}</td><td><code>{prefix}…</code></td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{limits}</td>\
             <td class=\"actions\"><button type=\"button\" class=\"secondary\" data-test=\"roll\" data-roll=\"{id}\" data-label=\"{label} ({prefix}…)\" aria-label=\"Roll {label}\">Roll</button>\
             <button type=\"button\" class=\"danger\" data-test=\"revoke\" data-revoke=\"{id}\" data-label=\"{label} ({prefix}…)\" aria-label=\"Revoke {label}\">Revoke</button></td></tr>",
            when(Some(k.created_at), p.now, ago, ""),
            when(k.last_used_at, p.now, ago, "never"),
            when(k.expires_at, p.now, until, "never"),
        );
    }
    main.push_str("</tbody></table></section>");
    frame("API Keys", p.csrf, Tab::Keys, p.vault, &main)
}

pub(super) fn workflows(csrf: &str, list: &[WorkflowOwner], vault: bool) -> String {
    let mut main = String::from(
        "<h1>Workflows</h1><section aria-labelledby=\"owner-title\"><h2 id=\"owner-title\">Set an owner</h2>\
         <form data-api-method=\"PUT\" data-api-path=\"/ui/api/workflows/{workflow}\" class=\"grid\">\
         <label for=\"workflow\">Workflow id</label><input id=\"workflow\" name=\"workflow\" data-path=\"1\" required data-test=\"workflow\">\
         <label for=\"owner\">Owner (user id)</label><input id=\"owner\" name=\"userId\" required data-test=\"owner\">\
         <span></span><button type=\"submit\" data-test=\"set-owner\">Set owner</button></form></section>",
    );
    main.push_str("<section aria-labelledby=\"wf-title\"><h2 id=\"wf-title\">Owners</h2>");
    if list.is_empty() {
        main.push_str("<p>No workflow has an owner yet.</p></section>");
        return frame("Workflows", csrf, Tab::Workflows, vault, &main);
    }
    main.push_str("<table><thead><tr><th scope=\"col\">Workflow</th><th scope=\"col\">Owner</th><th scope=\"col\"><span class=\"visually-hidden\">Actions</span></th></tr></thead><tbody>");
    for w in list {
        let (id, owner) = (esc(&w.workflow_id), esc(&w.owner));
        let _ = write!(
            main,
            "<tr data-test=\"workflow-row\"><td><code>{id}</code></td><td>{owner}</td><td class=\"actions\">\
             <button type=\"button\" class=\"danger\" data-test=\"remove\" data-remove=\"/ui/api/workflows/{}\" data-label=\"the owner of {id}\" aria-label=\"Remove the owner of {id}\">Remove</button></td></tr>",
            esc(&crate::admin::percent_encode(&w.workflow_id))
        );
    }
    main.push_str("</tbody></table></section>");
    frame("Workflows", csrf, Tab::Workflows, vault, &main)
}

pub(super) fn integrations(
    csrf: &str,
    user: Option<&str>,
    list: &[IntegrationRecord],
    kinds: &[&str],
    now: i64,
) -> String {
    let mut main = String::from("<h1>Integrations</h1>");
    let _ = write!(
        main,
        "<form method=\"get\" action=\"/ui/integrations\" class=\"row\"><label for=\"user\">User</label>\
         <input id=\"user\" name=\"user\" required value=\"{}\" data-test=\"user\">\
         <button type=\"submit\" class=\"secondary\">Show integrations</button></form>",
        esc(user.unwrap_or(""))
    );
    let Some(user) = user else {
        main.push_str("<p>Pick a user to see and add their provider credentials (the engine's Connections).</p>");
        return frame("Integrations", csrf, Tab::Integrations, true, &main);
    };
    let options: String = kinds
        .iter()
        .map(|k| format!("<option value=\"{0}\">{0}</option>", esc(k)))
        .collect();
    let _ = write!(
        main,
        "<section aria-labelledby=\"add-title\"><h2 id=\"add-title\">Add connection</h2>\
         <form data-api-method=\"POST\" data-api-path=\"/ui/api/integrations\" data-reset=\"1\" class=\"grid\">\
         <input type=\"hidden\" name=\"userId\" value=\"{}\">\
         <label for=\"type\">Provider</label><select id=\"type\" name=\"type\" data-test=\"type\">{options}</select>\
         <label for=\"iname\">Name <span class=\"muted\">(optional)</span></label><input id=\"iname\" name=\"name\" data-test=\"integration-name\">\
         <label for=\"secret\">API key</label><input id=\"secret\" name=\"secret\" type=\"password\" autocomplete=\"off\" required data-test=\"secret\">\
         <span></span><button type=\"submit\" data-test=\"add\">Add connection</button></form></section>",
        esc(user)
    );
    let _ = write!(
        main,
        "<section aria-labelledby=\"int-title\"><h2 id=\"int-title\">Connections of {}</h2>",
        esc(user)
    );
    if list.is_empty() {
        main.push_str("<p>None yet.</p></section>");
        return frame("Integrations", csrf, Tab::Integrations, true, &main);
    }
    main.push_str("<table><thead><tr><th scope=\"col\">Provider</th><th scope=\"col\">Name</th><th scope=\"col\">Added</th><th scope=\"col\">Last used</th><th scope=\"col\"><span class=\"visually-hidden\">Actions</span></th></tr></thead><tbody>");
    for i in list {
        let (id, name, kind) = (esc(&i.id), esc(&i.name), esc(&i.kind));
        let _ = write!(
            main,
            "<tr data-test=\"integration-row\"><td>{kind}</td><td>{name}</td><td>{}</td><td>{}</td><td class=\"actions\">\
             <button type=\"button\" class=\"danger\" data-test=\"remove\" data-remove=\"/ui/api/integrations/{id}\" data-label=\"{kind} {name}\" aria-label=\"Remove {kind} {name}\">Remove</button></td></tr>",
            when(Some(i.created_at), now, ago, ""),
            when(i.last_used_at, now, ago, "never"),
        );
    }
    main.push_str("</tbody></table></section>");
    frame("Integrations", csrf, Tab::Integrations, true, &main)
}

pub(super) fn no_vault(csrf: &str) -> String {
    frame(
        "Integrations",
        csrf,
        Tab::Integrations,
        false,
        "<h1>Integrations</h1><p>No vault is configured (<code>vault.master_keys</code>), so keygate keeps no provider credentials.</p>",
    )
}

pub(super) fn failed(csrf: &str, why: &str) -> String {
    frame(
        "Unavailable",
        csrf,
        Tab::None,
        false,
        &format!(
            "<h1>The store did not answer</h1><p class=\"message error\">{}</p><p>Reload the page to try again.</p>",
            esc(why)
        ),
    )
}

pub(super) fn not_found() -> String {
    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Not found · keygate</title>\
     <link rel=\"stylesheet\" href=\"/ui/app.css\"></head><body><main class=\"narrow\"><h1>Not found</h1>\
     <p><a href=\"/ui/keys\">API Keys</a></p></main></body></html>\n"
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_from_the_store_is_escaped() {
        assert_eq!(
            esc("<img src=x onerror=\"a('b')\">&"),
            "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;"
        );
    }

    #[test]
    fn times_read_as_people_say_them() {
        assert_eq!(ago(0, 30_000), "just now");
        assert_eq!(ago(0, 60_000), "1 minute ago");
        assert_eq!(ago(0, 3 * 3_600_000), "3 hours ago");
        assert_eq!(ago(0, 40 * 86_400_000), "40 days ago");
        assert_eq!(until(10_000, 10_000), "expired");
        assert_eq!(until(2 * 86_400_000, 0), "in 2 days");
    }
}
