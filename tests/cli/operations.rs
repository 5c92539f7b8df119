//! Running a gateway: a second serve, check, the built-in defaults, help,
//! logs, startup warnings, SIGHUP and a takeover under traffic.

use super::*;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[test]
fn a_second_serve_on_the_same_listen_address_fails_clearly() {
    let mut first = Setup::embedded();
    let _server = first.serve();
    // Another keygate, with its own store and admin port, same listen.
    let mut second = Setup::embedded();
    let yaml = std::fs::read_to_string(&second.config).unwrap();
    let theirs = format!("listen: \"127.0.0.1:{}\"", second.listen_port);
    let ours = format!("listen: \"127.0.0.1:{}\"", first.listen_port);
    std::fs::write(&second.config, yaml.replace(&theirs, &ours)).unwrap();
    second.listen_port = first.listen_port;
    let out = second.run(&["serve"]);
    let line = one_line_failure(&out);
    assert!(line.contains("in use"), "{line}");
    assert!(line.contains("--takeover"), "{line}");
    assert!(line.contains(&first.listen_port.to_string()), "{line}");
}

#[test]
fn check_validates_the_config_and_its_files() {
    let setup = Setup::embedded();
    let out = setup.ok(&["check"]);
    assert!(out.starts_with("config OK: "), "{out}");
    assert!(out.contains(&setup.config.display().to_string()), "{out}");

    let dir = setup.dir.path();
    std::fs::write(
        dir.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!("{yaml}tls:\n  cert: cert.pem\n  key: key.pem\n"),
    )
    .unwrap();
    let line = one_line_failure(&setup.run(&["check"]));
    assert!(
        line.contains("cert.pem") && line.contains("not a valid certificate"),
        "{line}"
    );

    std::fs::write(&setup.config, format!("{yaml}workers: \"two\"\n")).unwrap();
    let line = one_line_failure(&setup.run(&["check"]));
    assert!(line.contains("workers"), "the field is named: {line}");
}

#[test]
fn without_a_config_flag_the_built_in_defaults_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("built-in defaults"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:8080"), "{stdout}");
    let help = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("keygate.yaml") && help.contains("built-in defaults"),
        "{help}"
    );
}

#[test]
fn every_command_and_argument_has_a_description() {
    use clap::CommandFactory;
    fn walk(command: &clap::Command, path: &str) {
        for arg in command.get_arguments() {
            let name = arg.get_id().as_str();
            if name == "help" || name == "version" {
                continue;
            }
            assert!(arg.get_help().is_some(), "{path} {name} has no description");
        }
        for sub in command.get_subcommands() {
            let path = format!("{path} {}", sub.get_name());
            assert!(sub.get_about().is_some(), "{path} has no description");
            walk(sub, &path);
        }
    }
    walk(&keygate::cli::Cli::command(), "keygate");
}

#[test]
fn a_bad_user_names_the_flag_and_a_key_is_never_echoed() {
    let setup = Setup::embedded_without_server();
    let out = setup.run(&["keys", "create", "--user", "a b"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--user"), "{stderr}");
    assert!(stderr.contains("visible ASCII"), "{stderr}");

    let key = format!("wfb_{}", "S".repeat(38));
    let line = one_line_failure(&setup.run(&["keys", "revoke", &key]));
    assert!(line.contains("looks like a key, not a key id"), "{line}");
    assert!(line.contains("keys list"), "{line}");
    assert!(!line.contains(&key), "the key was echoed: {line}");
}

#[test]
fn the_admin_api_never_echoes_a_key_given_as_an_id() {
    let mut setup = Setup::embedded();
    let _server = setup.serve();
    let key = setup.create_key("u1");
    let token = std::fs::read_to_string(setup.token_file()).unwrap();
    let response = http(
        setup.admin_port,
        &format!(
            "DELETE /admin/v1/keys/{key} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            token.trim()
        ),
    )
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("looks like a key"), "{response}");
    assert!(!response.contains(&key), "{response}");
}

#[test]
fn serve_logs_without_colour_rounds_latency_and_fails_once() {
    let mut setup = Setup::embedded();
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        yaml.replace("log:\n  access: false\n", "log:\n  access: true\n"),
    )
    .unwrap();
    let server = setup.serve();
    let key = setup.create_key("u1");
    setup.ok(&["workflows", "set-owner", "wf_1", "u1"]);
    assert_eq!(call_webhook(setup.listen_port, &key), Some(502));
    let log = server.wait_for_log("keygate::access");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI colour in a log that is not a terminal:\n{log}"
    );
    let latency = log
        .lines()
        .find(|l| l.contains("keygate::access"))
        .and_then(|l| l.split("latency_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .to_owned();
    let decimals = latency.split('.').nth(1).map_or(0, str::len);
    assert!(decimals <= 3, "latency_ms={latency}");
    drop(server);

    // A serve that cannot start says why once, and paths read as written.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    let listen = format!("listen: \"127.0.0.1:{}\"", setup.listen_port);
    std::fs::write(
        &setup.config,
        yaml.replace(&listen, &format!("listen: \"127.0.0.1:{port}\"")),
    )
    .unwrap();
    let relative = Path::new(".").join(setup.config.file_name().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(&relative)
        .arg("serve")
        .current_dir(setup.dir.path())
        .output()
        .unwrap();
    let line = one_line_failure(&out);
    assert!(line.contains("in use"), "{line}");
    assert!(!line.contains("/./"), "{line}");
}

#[test]
fn startup_warns_of_an_unreachable_store_and_an_open_metrics_endpoint() {
    let mut setup = Setup::redis_down();
    let yaml = std::fs::read_to_string(&setup.config).unwrap();
    let admin = format!("listen: \"127.0.0.1:{}\"\n  token_file", setup.admin_port);
    std::fs::write(
        &setup.config,
        yaml.replace(
            &admin,
            &format!("listen: \"0.0.0.0:{}\"\n  token_file", setup.admin_port),
        ),
    )
    .unwrap();
    let server = setup.serve();
    let log = server.wait_for_log("unreachable at start");
    assert!(log.contains("/metrics"), "{log}");
    assert!(log.contains("admin.token is not set"), "{log}");
}

#[test]
fn sighup_reloads_the_config_refuses_a_bad_one_and_names_what_needs_a_restart() {
    let mut setup = Setup::embedded();
    let server = setup.serve();
    let good = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!("{good}routes:\n  - path: /hooks/{{workflow}}\n"),
    )
    .unwrap();
    server.signal("-HUP");
    server.wait_for_log("config reloaded");

    std::fs::write(&setup.config, "listen: [not, an, address]\n").unwrap();
    server.signal("-HUP");
    let log = server.wait_for_log("reload refused");
    assert!(log.contains("listen"), "{log}");
    assert!(
        healthz(setup.admin_port),
        "a bad reload stopped the gateway"
    );

    let moved = good.replace(
        &format!("listen: \"127.0.0.1:{}\"", setup.listen_port),
        &format!("listen: \"127.0.0.1:{}\"", common::free_port()),
    );
    std::fs::write(&setup.config, moved).unwrap();
    server.signal("-HUP");
    let log = server.wait_for_log("take effect only after a restart");
    assert!(log.contains("needs_restart=listen"), "{log}");
    // Still listening where it started.
    let key = setup.create_key("u1");
    assert!(call_webhook(setup.listen_port, &key).is_some());
}

#[test]
fn takeover_replaces_a_running_instance_without_refusing_a_connection() {
    let mut setup = Setup::embedded();
    let mut old = setup.serve();
    let key = setup.create_key("u1");
    setup.ok(&["workflows", "set-owner", "wf_1", "u1"]);
    let port = setup.listen_port;
    // Calls on fresh connections all through the handover.
    let done = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let caller = {
        let (done, made, key) = (done.clone(), made.clone(), key.clone());
        std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            while !done.load(Ordering::SeqCst) {
                outcomes.push(call_webhook(port, &key));
                made.fetch_add(1, Ordering::SeqCst);
            }
            outcomes
        })
    };
    // Some calls before the new instance starts, and some after the old
    // one has gone.
    let wait_for_calls = |more: usize| {
        let target = made.load(Ordering::SeqCst) + more;
        let until = Instant::now() + DEADLINE;
        while made.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < until, "the calls stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for_calls(10);
    let new = setup.serve_with(&["--takeover"], "takeover.log");
    new.wait_for_log("took_over=true");
    let status = old.wait_exit();
    assert_eq!(status.code(), Some(0), "old instance log:\n{}", old.log());
    wait_for_calls(10);
    done.store(true, Ordering::SeqCst);
    let outcomes = caller.join().unwrap();
    assert!(outcomes.len() > 10, "{outcomes:?}");
    let migrates = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .is_ok_and(|v| v.trim() == "1");
    let lost = outcomes.iter().filter(|o| o.is_none()).count();
    if migrates {
        assert_eq!(lost, 0, "connections refused or reset during the takeover");
    } else {
        eprintln!(
            "net.ipv4.tcp_migrate_req is 0: {lost} of {} calls lost in the handover (not asserted)",
            outcomes.len()
        );
    }
    // Nothing upstream: every call that was served is a 502, none a 5xx of keygate's own.
    assert!(outcomes.iter().flatten().all(|s| *s == 502), "{outcomes:?}");
    // The new instance has the store and the admin API.
    let listed = list_json(&setup, "u1");
    assert_eq!(listed.len(), 1);
    assert_eq!(call_webhook(port, &key), Some(502));
    assert!(new.log().contains("keygate serving"));
}

#[test]
fn takeover_without_a_running_instance_fails_clearly() {
    let setup = Setup::embedded();
    std::fs::create_dir_all(setup.token_file().parent().unwrap()).unwrap();
    std::fs::write(setup.token_file(), "a-token-for-nobody-at-all").unwrap();
    let line = one_line_failure(&setup.run(&["serve", "--takeover"]));
    assert!(line.contains("no keygate answers"), "{line}");
}
