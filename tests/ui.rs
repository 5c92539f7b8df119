//! The API Keys panel in a real browser: headless Chromium over WebDriver
//! (Debian's `chromium` and `chromium-driver`; `scripts/test` installs
//! them) against a real keygate on free ports. Writes a screenshot of the
//! keys page to `target/ui/keys.png`.

mod common;

use common::*;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// chromedriver on a free port, and a headless Chromium session over it.
struct Browser {
    driver: Child,
    client: Client,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (scripts/test installs chromium-driver)");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]}),
        );
        let mut client = None;
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Browser {
            driver,
            client: client.expect("a Chromium session from chromedriver"),
        }
    }

    async fn test(&self, name: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(5))
            .for_element(Locator::Css(&format!("[data-test=\"{name}\"]")))
            .await
            .unwrap_or_else(|e| panic!("no [data-test={name}]: {e}"))
    }

    async fn count(&self, name: &str) -> usize {
        self.client
            .find_all(Locator::Css(&format!("[data-test=\"{name}\"]")))
            .await
            .unwrap()
            .len()
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    async fn path(&self) -> String {
        let url = self.client.current_url().await.unwrap();
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        }
    }

    /// Waits for `done` (a JS expression) to be true.
    async fn until(&self, done: &str) -> bool {
        let script = format!("return !!({done});");
        eventually(Duration::from_secs(5), || async {
            self.client
                .execute(&script, vec![])
                .await
                .is_ok_and(|v| v == Value::Bool(true))
        })
        .await
    }

    async fn sign_in(&self, base: &str, token: &str) {
        self.client.goto(&format!("{base}/ui/login")).await.unwrap();
        self.test("token").await.send_keys(token).await.unwrap();
        self.test("login").await.click().await.unwrap();
    }

    /// The axe-like checks by hand: every control has a label, every button
    /// a name, and text contrast is at least 4.5:1. Returns the problems.
    async fn accessibility(&self) -> Vec<String> {
        let v = self.js(A11Y).await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Labels, names and WCAG contrast, computed in the page.
const A11Y: &str = r#"
const problems = [];
for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
  if (!el.labels || el.labels.length === 0) problems.push('no label: ' + (el.name || el.id));
}
for (const b of document.querySelectorAll('button')) {
  const name = (b.getAttribute('aria-label') || b.textContent || '').trim();
  if (!name) problems.push('button without a name');
}
function rgb(c) { const m = c.match(/[\d.]+/g).map(Number); return { r: m[0], g: m[1], b: m[2], a: m.length > 3 ? m[3] : 1 }; }
function lum(c) { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); }; return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); }
function background(el) {
  for (let e = el; e; e = e.parentElement) {
    const c = rgb(getComputedStyle(e).backgroundColor);
    if (c.a > 0.5) return c;
  }
  return { r: 255, g: 255, b: 255, a: 1 };
}
for (const el of document.querySelectorAll('body *')) {
  const visible = el.offsetParent !== null || el.tagName === 'DIALOG';
  const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (!visible || !own || el.closest('dialog:not([open])')) continue;
  const fg = rgb(getComputedStyle(el).color), bg = background(el);
  const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  const ratio = (a + 0.05) / (b + 0.05);
  if (ratio < 4.5) problems.push('contrast ' + ratio.toFixed(2) + ': ' + el.tagName + ' ' + el.textContent.trim().slice(0, 30));
}
return problems;
"#;

struct Panel {
    gw: Gw,
    base: String,
    token: String,
    _upstream: Upstream,
    _dir: tempfile::TempDir,
}

async fn panel(extra: &str) -> Panel {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = StoreKind::Embedded(dir.path().join("kg.redb"));
    let gw = Gw::start(config(
        dir.path(),
        &store,
        &upstream.url(),
        &format!("rate_limit:\n  max_failures: 0\n{extra}"),
    ))
    .await;
    gw.set_owner("wf", "alice").await;
    let token = gw.token.clone();
    Panel {
        base: format!("http://{}", gw.admin),
        gw,
        token,
        _upstream: upstream,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_person_can_do_what_the_product_page_describes_in_a_browser() {
    let p = panel("ui:\n  stale_after: 2s\n").await;
    let b = Browser::start().await;
    // No session: to the sign-in page.
    b.client.goto(&format!("{}/ui/keys", p.base)).await.unwrap();
    assert_eq!(b.path().await, "/ui/login");
    assert!(
        b.accessibility().await.is_empty(),
        "{:?}",
        b.accessibility().await
    );
    // A wrong token: refused, with a message.
    b.sign_in(&p.base, "not-the-admin-token").await;
    assert!(
        b.until("document.body.innerText.includes('Wrong admin token')")
            .await
    );
    assert_eq!(b.path().await, "/ui/login");
    // The right one.
    b.sign_in(&p.base, &p.token).await;
    assert!(b.until("location.pathname === '/ui/keys'").await);

    // Pick a user (Enter submits), create a key with a name.
    b.test("user")
        .await
        .send_keys(&format!("alice{}", Key::Enter))
        .await
        .unwrap();
    assert!(b.until("location.search === '?user=alice'").await);
    b.test("name").await.send_keys("production").await.unwrap();
    b.test("create").await.click().await.unwrap();
    assert!(
        b.until("document.querySelector('[data-test=new-key]').textContent.length > 0")
            .await
    );
    let key = b.test("new-key").await.text().await.unwrap();
    assert_eq!(key.len(), 42, "{key}");
    assert!(key.starts_with("wfb_"));
    let dialog = b
        .js("return document.getElementById('key-dialog').innerText")
        .await;
    assert!(
        dialog.as_str().unwrap().contains("shown only once"),
        "{dialog}"
    );
    assert!(
        b.accessibility().await.is_empty(),
        "{:?}",
        b.accessibility().await
    );
    // The key works.
    assert_eq!(p.gw.webhook("wf", Some(&bearer(&key))).await.0, 200);
    // Closed: the key is nowhere in the page; the row shows its prefix.
    b.test("close").await.click().await.unwrap();
    assert!(b.until("document.querySelectorAll('[data-test=key-row]').length === 1 && !document.getElementById('key-dialog').open").await);
    let source = b.client.source().await.unwrap();
    assert!(!source.contains(&key), "the key is still in the page");
    let row = b.test("key-row").await.text().await.unwrap();
    assert!(
        row.contains(&key[..11]) && row.contains("production"),
        "{row}"
    );
    // Back and forward: the browser has no copy of it either.
    b.client.back().await.unwrap();
    b.client.forward().await.unwrap();
    assert!(!b.client.source().await.unwrap().contains(&key));
    // Last used appears after a call (within a flush), on reload.
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.client.refresh().await.unwrap();
            let cells = b
                .js("return [...document.querySelector('[data-test=key-row]').cells].map(c => c.innerText)")
                .await;
            cells[3].as_str().is_some_and(|t| t != "never")
        })
        .await,
        "last used never shown"
    );
    let exact = b
        .js("return document.querySelector('[data-test=key-row]').cells[3].querySelector('time').title")
        .await;
    assert!(exact.as_str().unwrap().ends_with('Z'), "{exact}");

    // A POST without the CSRF token is refused.
    let status = b
        .client
        .execute_async(
            "const done = arguments[0]; fetch('/ui/api/keys', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({userId: 'alice'})}).then(r => done(r.status));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(403));
    let forged = b
        .client
        .execute_async(
            "const done = arguments[0]; fetch('/ui/api/keys', {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': 'forged'}, body: JSON.stringify({userId: 'alice'})}).then(r => done(r.status));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(forged, json!(403));

    // Keyboard only: Tab order from the user field, Enter creates, Escape
    // closes the dialog.
    b.test("user").await.click().await.unwrap();
    let order = b.js("return document.activeElement.dataset.test").await;
    assert_eq!(order, json!("user"));
    for expected in ["", "name"] {
        b.client
            .active_element()
            .await
            .unwrap()
            .send_keys(&Key::Tab.to_string())
            .await
            .unwrap();
        let focused = b
            .js("return document.activeElement.dataset.test || document.activeElement.textContent")
            .await;
        match expected {
            "" => assert_eq!(focused, json!("Show keys")),
            name => assert_eq!(focused, json!(name)),
        }
    }
    b.client
        .active_element()
        .await
        .unwrap()
        .send_keys(&format!("by keyboard{}", Key::Enter))
        .await
        .unwrap();
    assert!(b.until("document.getElementById('key-dialog').open && document.querySelector('[data-test=new-key]').textContent.length === 42").await);
    let second = b.test("new-key").await.text().await.unwrap();
    let focused = b.js("return document.activeElement.id").await;
    assert_eq!(focused, json!("copy-key"), "focus moves into the dialog");
    b.client
        .active_element()
        .await
        .unwrap()
        .send_keys(&Key::Escape.to_string())
        .await
        .unwrap();
    assert!(b.until("document.querySelectorAll('[data-test=key-row]').length === 2 && !document.getElementById('key-dialog').open").await);
    assert!(!b.client.source().await.unwrap().contains(&second));

    // Stale: unused for ui.stale_after (2 s here) or never used.
    assert!(
        eventually(Duration::from_secs(6), || async {
            b.client.refresh().await.unwrap();
            b.count("stale").await == 2
        })
        .await,
        "stale keys not marked"
    );
    // Keep one fresh for the picture.
    assert_eq!(p.gw.webhook("wf", Some(&bearer(&second))).await.0, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.client.refresh().await.unwrap();
            b.count("stale").await == 1
        })
        .await
    );
    assert!(
        b.accessibility().await.is_empty(),
        "{:?}",
        b.accessibility().await
    );
    std::fs::create_dir_all("target/ui").unwrap();
    std::fs::write("target/ui/keys.png", b.client.screenshot().await.unwrap()).unwrap();

    // Revoke: confirm, the row goes, the key is refused at once.
    let rows = b.count("key-row").await;
    let revoke = b
        .client
        .find(Locator::Css(&format!(
            "[data-test=key-row][data-id] [data-test=revoke][data-label*=\"{}\"]",
            &key[..11]
        )))
        .await
        .unwrap();
    revoke.click().await.unwrap();
    assert!(
        b.until("document.getElementById('confirm-dialog').open")
            .await
    );
    b.test("confirm").await.click().await.unwrap();
    assert!(
        b.until(&format!(
            "document.querySelectorAll('[data-test=key-row]').length === {}",
            rows - 1
        ))
        .await
    );
    assert_eq!(p.gw.webhook("wf", Some(&bearer(&key))).await.0, 401);
    assert_eq!(p.gw.webhook("wf", Some(&bearer(&second))).await.0, 200);

    // The audit log has the panel's actions with the caller's address.
    let (_, audit) = p.gw.admin_call("GET", "/admin/v1/audit", None).await;
    let actions: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["caller"].as_str().unwrap()))
        .collect();
    assert!(
        actions
            .iter()
            .any(|(a, c)| *a == "key.revoked" && c.starts_with("127.0.0.1:")),
        "{audit}"
    );
    assert_eq!(
        actions.iter().filter(|(a, _)| *a == "key.created").count(),
        2
    );

    // Sign out: the session is gone, pages go back to sign-in.
    b.client
        .find(Locator::Css("form.logout button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(b.until("location.pathname === '/ui/login'").await);
    b.client
        .goto(&format!("{}/ui/keys?user=alice", p.base))
        .await
        .unwrap();
    assert_eq!(b.path().await, "/ui/login");
}

#[tokio::test]
async fn owners_and_rolls_from_the_panel_and_its_headers() {
    let p = panel("").await;
    let b = Browser::start().await;
    b.sign_in(&p.base, &p.token).await;
    assert!(b.until("location.pathname === '/ui/keys'").await);
    // Workflows: set an owner, then remove it after confirming.
    b.client
        .goto(&format!("{}/ui/workflows", p.base))
        .await
        .unwrap();
    b.test("workflow").await.send_keys("wf_new").await.unwrap();
    b.test("owner").await.send_keys("bob").await.unwrap();
    b.test("set-owner").await.click().await.unwrap();
    assert!(b.until("document.body.innerText.includes('wf_new')").await);
    assert!(
        b.accessibility().await.is_empty(),
        "{:?}",
        b.accessibility().await
    );
    let (bob_id, bob_key) = p.gw.create_key("bob").await;
    assert_eq!(p.gw.webhook("wf_new", Some(&bearer(&bob_key))).await.0, 200);
    let remove = b
        .client
        .find(Locator::Css("[data-test=remove][data-remove$=\"wf_new\"]"))
        .await
        .unwrap();
    remove.click().await.unwrap();
    b.test("confirm").await.click().await.unwrap();
    assert!(
        b.until("![...document.querySelectorAll('[data-test=workflow-row]')].some(r => r.innerText.includes('wf_new'))")
            .await
    );
    assert!(
        b.until(
            "document.getElementById('message').innerText.includes('Removed the owner of wf_new')"
        )
        .await
    );
    assert_eq!(p.gw.webhook("wf_new", Some(&bearer(&bob_key))).await.0, 404);
    // Roll: the new key is shown once, the old one refused (no grace).
    b.client
        .goto(&format!("{}/ui/keys?user=bob", p.base))
        .await
        .unwrap();
    b.test("roll").await.click().await.unwrap();
    assert!(
        b.until("document.getElementById('confirm-dialog').open")
            .await
    );
    b.test("confirm").await.click().await.unwrap();
    assert!(
        b.until("document.querySelector('[data-test=new-key]').textContent.length === 42")
            .await
    );
    let rolled = b.test("new-key").await.text().await.unwrap();
    b.test("close").await.click().await.unwrap();
    assert!(b.until("!document.getElementById('key-dialog').open && document.querySelectorAll('[data-test=key-row]').length === 1").await);
    assert!(!b.client.source().await.unwrap().contains(&rolled));
    let listed = p.gw.list_keys("bob").await;
    assert_ne!(listed[0]["id"], bob_id.as_str());
    p.gw.set_owner("wf_new", "bob").await;
    assert_eq!(p.gw.webhook("wf_new", Some(&bearer(&bob_key))).await.0, 401);
    assert_eq!(p.gw.webhook("wf_new", Some(&bearer(&rolled))).await.0, 200);

    // Headers on every page that can show a key, and the cookie's flags.
    let client = Raw(p.gw.admin);
    let (status, headers) = client.get("/ui/keys", None).await;
    assert_eq!(status, 303);
    assert_eq!(headers["location"], "/ui/login");
    let (_, login) = client.get("/ui/login", None).await;
    for (name, value) in [
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(login[name], value, "{name}");
    }
    let csp = login["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let cookie = b
        .client
        .get_named_cookie("keygate_session")
        .await
        .expect("a session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    let (status, headers) = client
        .get(
            "/ui/keys?user=bob",
            Some(&format!("keygate_session={}", cookie.value())),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["cache-control"], "no-store");
}

/// Plain requests to the admin listener, for headers.
struct Raw(std::net::SocketAddr);

impl Raw {
    async fn get(&self, path: &str, cookie: Option<&str>) -> (u16, http::HeaderMap) {
        let mut req = http::Request::builder().uri(path).header("host", "admin");
        if let Some(cookie) = cookie {
            req = req.header("cookie", cookie);
        }
        let (status, headers, _) = send_h1(
            self.0,
            req.body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
        (status, headers)
    }
}

#[tokio::test]
async fn connections_are_added_and_removed_without_the_secret_ever_shown() {
    let p = panel(&format!(
        "vault:\n  master_keys:\n    - {{id: k1, key: \"{}\"}}\negress:\n  listen: \"127.0.0.1:0\"\n",
        "ab".repeat(32)
    ))
    .await;
    let b = Browser::start().await;
    b.sign_in(&p.base, &p.token).await;
    assert!(b.until("location.pathname === '/ui/keys'").await);
    b.client
        .goto(&format!("{}/ui/integrations?user=alice", p.base))
        .await
        .unwrap();
    let secret = "sk-panel-secret-0123456789";
    assert_eq!(
        b.test("secret")
            .await
            .attr("type")
            .await
            .unwrap()
            .as_deref(),
        Some("password")
    );
    b.test("integration-name")
        .await
        .send_keys("Skytells prod")
        .await
        .unwrap();
    b.test("secret").await.send_keys(secret).await.unwrap();
    b.test("add").await.click().await.unwrap();
    assert!(
        b.until("document.querySelectorAll('[data-test=integration-row]').length === 1")
            .await
    );
    assert!(
        b.accessibility().await.is_empty(),
        "{:?}",
        b.accessibility().await
    );
    let source = b.client.source().await.unwrap();
    assert!(!source.contains(secret), "the secret is in the page");
    assert!(source.contains("Skytells prod"));
    let (_, listed) =
        p.gw.admin_call("GET", "/admin/v1/integrations?userId=alice", None)
            .await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(!listed.to_string().contains(secret));
    b.test("remove").await.click().await.unwrap();
    b.test("confirm").await.click().await.unwrap();
    assert!(
        b.until("document.querySelectorAll('[data-test=integration-row]').length === 0")
            .await
    );
    let (_, listed) =
        p.gw.admin_call("GET", "/admin/v1/integrations?userId=alice", None)
            .await;
    assert!(listed.as_array().unwrap().is_empty(), "{listed}");
    let (_, audit) = p.gw.admin_call("GET", "/admin/v1/audit", None).await;
    let text = audit.to_string();
    assert!(
        text.contains("integration.added") && text.contains("integration.removed"),
        "{text}"
    );
    assert!(!text.contains(secret));
}
