//! Integration credentials from the command line: the secret on stdin,
//! listings without it, the template's integrations imported, and nothing
//! secret in any log line, metric or answer along the way.

use super::*;

const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const TEMPLATE_KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";
const TEMPLATE_CONFIG: &str = "02020202020202020202020202020202:e88e79a614a4058b0a4f737d55fd150c:0b14f63ab68a4a6dfc16506fce77a74f85cdbb55";

/// Runs `keygate` with `input` on stdin and `envs` set.
fn with_stdin(setup: &Setup, args: &[&str], input: &str, envs: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(&setup.config)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the keygate binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A setup with a vault whose skytells provider is `provider`, access logs
/// on and debug logging.
fn vault_setup(store: &str, provider: &common::HttpsServer) -> Setup {
    let setup = Setup::new(format!(
        "{store}vault:\n  master_keys:\n    - {{id: k1, key: \"{K1}\"}}\negress:\n  listen: \"127.0.0.1:0\"\n  providers:\n    skytells: {{base_url: \"{}/v1\", ca_file: \"{}\"}}\n",
        provider.url(),
        provider.ca_file.display()
    ));
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        yaml.replace(
            "log:\n  access: false\n",
            "log:\n  access: true\n  level: debug\n",
        ),
    )
    .unwrap();
    setup
}

/// The egress port, from the serving line.
fn egress_port(server: &Server) -> u16 {
    let log = server.wait_for_log("keygate serving");
    let at = log.find("egress=").expect("the serving line names egress") + "egress=".len();
    log[at..]
        .split(|c: char| c.is_whitespace())
        .next()
        .and_then(|addr| addr.trim_matches('"').rsplit(':').next()?.parse().ok())
        .expect("an egress port")
}

fn mint(setup: &Setup, user: &str) -> String {
    let token = std::fs::read_to_string(setup.token_file()).unwrap();
    let body = format!("{{\"userId\":\"{user}\"}}");
    let answer = http(
        setup.admin_port,
        &format!(
            "POST /admin/v1/run-tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap();
    let json = answer.split_once("\r\n\r\n").unwrap().1;
    parse_json(json)["token"].as_str().unwrap().to_owned()
}

fn egress_call(port: u16, id: &str, token: &str) -> String {
    http(
        port,
        &format!(
            "GET /integrations/{id}/models?page=1 HTTP/1.1\r\nHost: x\r\nx-api-key: {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .unwrap()
}

#[test]
fn integrations_from_the_command_line_never_show_a_secret() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let provider = rt.block_on(common::HttpsServer::start());
    let mut setup = vault_setup("", &provider);
    let server = setup.serve();
    let egress = egress_port(&server);
    let secret = "sk-cli-secret-0123456789";
    let added = with_stdin(
        &setup,
        &[
            "integrations",
            "add",
            "--user",
            "u1",
            "--type",
            "skytells",
            "--name",
            "prod",
        ],
        &format!("{secret}\n"),
        &[],
    );
    assert!(added.status.success(), "{added:?}");
    let id = String::from_utf8(added.stdout).unwrap().trim().to_owned();
    assert!(id.starts_with("int_"), "{id}");
    let json = with_stdin(
        &setup,
        &[
            "integrations",
            "add",
            "--user",
            "u1",
            "--type",
            "skytells",
            "--json",
        ],
        "sk-two",
        &[],
    );
    let json = parse_json(std::str::from_utf8(&json.stdout).unwrap());
    assert_eq!(json["type"], "skytells");
    assert_eq!(json["keyId"], "k1");
    assert!(json.get("secret").is_none());
    // Refused: a keygate key, nothing at all.
    let key = setup.create_key("u1");
    let line = one_line_failure(&with_stdin(
        &setup,
        &["integrations", "add", "--user", "u1", "--type", "skytells"],
        &key,
        &[],
    ));
    assert!(line.contains("keygate API keys"), "{line}");
    assert!(!line.contains(&key));
    let line = one_line_failure(&with_stdin(
        &setup,
        &["integrations", "add", "--user", "u1", "--type", "skytells"],
        "",
        &[],
    ));
    assert!(line.contains("stdin"), "{line}");
    let line = one_line_failure(&setup.run(&["integrations", "remove", secret]));
    assert!(!line.contains(secret), "{line}");
    // Listed, never with the secret.
    let listed = setup.ok(&["integrations", "list", "--user", "u1", "--json"]);
    let list = parse_json(&listed);
    assert_eq!(list.as_array().unwrap().len(), 2);
    for field in ["id", "type", "name", "createdAt", "lastUsedAt", "keyId"] {
        assert!(list[0].get(field).is_some(), "{field} missing: {listed}");
    }
    let table = setup.ok(&["integrations", "list", "--user", "u1"]);
    assert!(table.starts_with("ID") && table.contains(&id), "{table}");
    // Used through egress with a minted token.
    let token = mint(&setup, "u1");
    let answer = egress_call(egress, &id, &token);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(provider.requests()[0].headers["x-api-key"], secret);
    assert_eq!(provider.requests()[0].target, "/v1/models?page=1");
    setup.ok(&["workflows", "set-owner", "wf_1", "u1"]);
    assert_eq!(call_webhook(setup.listen_port, &key), Some(502));
    let rekeyed = setup.ok(&["integrations", "rekey"]);
    assert_eq!(
        rekeyed.trim(),
        "rekeyed 0 integrations under k1 (2 already were)"
    );
    assert_eq!(
        setup.ok(&["integrations", "remove", &id]).trim(),
        format!("removed integration {id}")
    );
    // Nothing secret anywhere: logs, metrics, listings.
    server.wait_for_log("keygate::egress");
    let metrics = http(
        setup.admin_port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let listed = setup.ok(&["integrations", "list", "--user", "u1", "--json"]);
    for (what, text) in [
        ("log", server.log()),
        ("metrics", metrics),
        ("listing", listed),
    ] {
        for needle in [secret, "sk-two", token.as_str(), key.as_str()] {
            assert!(!text.contains(needle), "{what} holds {needle:?}:\n{text}");
        }
    }
}

#[test]
fn import_brings_the_templates_integrations_over() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let provider = rt.block_on(common::HttpsServer::start());
    let template = common::PostgresServer::start();
    template.psql(&format!(
        "INSERT INTO users (id) VALUES ('u1');
         INSERT INTO integrations (id, user_id, name, type, config) VALUES
           ('tplint1', 'u1', 'Skytells prod', 'skytells', to_jsonb('{TEMPLATE_CONFIG}'::text)),
           ('tplbad', 'u1', 'Broken', 'skytells', to_jsonb('00:00:00'::text));"
    ));
    let mut setup = vault_setup("", &provider);
    let server = setup.serve();
    let egress = egress_port(&server);
    let url = template.url();
    let env = [("INTEGRATION_ENCRYPTION_KEY", TEMPLATE_KEY)];
    let first = with_stdin(
        &setup,
        &["integrations", "import", "--postgres", &url],
        "",
        &env,
    );
    assert!(!first.status.success());
    let stdout = String::from_utf8_lossy(&first.stdout);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        stdout.contains("imported 1, already present 0, failed 1"),
        "{stdout}{stderr}"
    );
    assert!(stderr.contains("tplbad"), "{stderr}");
    assert!(!stderr.contains("sk-test"), "{stderr}");
    let again = with_stdin(
        &setup,
        &["integrations", "import", "--postgres", &url],
        "",
        &env,
    );
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("imported 0, already present 1, failed 1")
    );
    let list = parse_json(&setup.ok(&["integrations", "list", "--user", "u1", "--json"]));
    assert_eq!(list[0]["id"], "tplint1");
    assert_eq!(list[0]["name"], "Skytells prod");
    let token = mint(&setup, "u1");
    let answer = egress_call(egress, "tplint1", &token);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(provider.requests()[0].headers["x-api-key"], "sk-test");
    // Without the template's key: said plainly.
    let line = one_line_failure(&setup.run(&["integrations", "import", "--postgres", &url]));
    assert!(line.contains("INTEGRATION_ENCRYPTION_KEY"), "{line}");
}
