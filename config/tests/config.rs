//! The file format's contract: examples parse, defaults resolve, every
//! invalid input is reported with its path and line, nothing panics.

use lb_config::*;
use proptest::prelude::*;

#[test]
fn examples_parse() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("lbd")
            || path.file_name().unwrap() == "quickstart.toml"
        {
            load_config(&path).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2);
}

#[test]
fn defaults_and_inheritance() {
    let cfg = parse_config(
        r#"
[defaults]
connect_timeout = "1s"
idle_timeout = "1m"
balance = "least_conn"
[defaults.health]
kind = "http"
path = "/ready"
rise = 5

[[listener]]
name = "a"
bind = "127.0.0.1:80"
backends = [{ addr = "127.0.0.2:80" }]
[listener.health]
rise = 1

[[listener]]
name = "u"
bind = "127.0.0.1:53"
protocol = "udp"
balance = "maglev"
backends = [{ addr = "127.0.0.2:53", weight = 3 }]
"#,
    )
    .unwrap();
    let a = &cfg.listeners[0];
    assert_eq!(a.balance, Balance::LeastConn);
    assert_eq!(a.connect_timeout, Duration::from_secs(1));
    assert_eq!(a.idle_timeout, Duration::from_secs(60));
    assert_eq!(a.drain_timeout, Duration::from_secs(30));
    assert_eq!(a.health.kind, HealthKind::Http);
    assert_eq!(a.health.path, "/ready");
    assert_eq!((a.health.rise, a.health.fall), (1, 3));
    assert_eq!(a.backends[0].weight, 1);
    let u = &cfg.listeners[1];
    assert_eq!(
        u.idle_timeout,
        Duration::from_secs(30),
        "udp keeps its own idle default"
    );
    assert_eq!(u.backends[0].weight, 3);
    assert_eq!(cfg.runtime.engine, EngineChoice::Auto);
    assert_eq!(cfg.admin.metrics, Some("127.0.0.1:9600".parse().unwrap()));
}

#[test]
fn a_file_without_listeners_is_valid() {
    let cfg = parse_config("[admin]\nmetrics = \"off\"\n").unwrap();
    assert!(cfg.listeners.is_empty());
    assert_eq!(cfg.admin.metrics, None);
    assert!(parse_config("").unwrap().listeners.is_empty());
}

const OK: &str =
    "name = \"ok\"\nbind = \"127.0.0.1:80\"\nbackends = [{ addr = \"127.0.0.2:80\" }]\n";

/// (file, expected path, expected line, a fragment of the message)
fn invalid_cases() -> Vec<(String, &'static str, usize, &'static str)> {
    let l = |body: &str| format!("[[listener]]\n{body}");
    vec![
        (l("name = \"a b\"\nbind = \"127.0.0.1:80\"\n"), "listener[0].name", 2, "must be 1 to 253"),
        (l("name = \"a\"\nbind = \"127.0.0.1\"\n"), "listener[0].bind", 3, "has no port"),
        (l("name = \"a\"\nbind = \"example.com:80\"\n"), "listener[0].bind", 3, "not an address"),
        (format!("{}[[listener]]\nname = \"ok\"\nbind = \"127.0.0.1:81\"\n", l(OK)), "listener[1].name", 6, "already the name of listener[0]"),
        (format!("{}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:80\"\n", l(OK)), "listener[1].bind", 7, "already bound by listener[0]"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nsource_ranges = [\"10.0.0.0/33\"]\n"), "listener[0].source_ranges[0]", 4, "not a CIDR"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nsource_ranges = [\"10.1.2.3/8\"]\n"), "listener[0].source_ranges[0]", 4, "host bits"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nbackends = [{ addr = \"127.0.0.2:80\", weight = 0 }, { addr = \"127.0.0.3:80\", weight = 0 }]\n"), "listener[0].backends", 4, "every backend has weight 0"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nprotocol = \"udp\"\nproxy_protocol = \"v1\"\n"), "listener[0].proxy_protocol", 5, "v1 is TCP only"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nconnect_timeout = \"0s\"\n"), "listener[0].connect_timeout", 4, "greater than zero"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nidle_timeout = \"ten\"\n"), "listener[0].idle_timeout", 4, "invalid duration"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\nrise = 0\n"), "listener[0].health.rise", 5, "must be 1 to 100"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\nfall = 0\n"), "listener[0].health.fall", 5, "must be 1 to 100"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\nfall = 4294967295\n"), "listener[0].health.fall", 5, "must be 1 to 100"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n"), "listener[0].health.timeout", 6, "longer than health.interval"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\nsend_proxy = true\n"), "listener[0].health.send_proxy", 5, "sends no PROXY header"),
        ("[admin]\nstate_dir = \"\"\n".into(), "admin.state_dir", 2, "must be an absolute path"),
        ("[admin]\nstate_dir = \"var/lib/lbd\"\n".into(), "admin.state_dir", 2, "must be an absolute path"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nbogus = 1\n"), "listener[0]", 4, "unknown field `bogus`"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nbalance = \"fastest\"\n"), "listener[0].balance", 4, "unknown variant `fastest`"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nbackends = [{ addr = \"127.0.0.2:0\" }]\n"), "listener[0].backends[0].addr", 4, "port 0"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nbackends = [{ addr = \"127.0.0.2:80\" }, { addr = \"127.0.0.2:80\" }]\n"), "listener[0].backends[1].addr", 4, "already backends[0]"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nbalance = \"round_robin\"\nhash_key = \"client_ip\"\n"), "listener[0].hash_key", 5, "only applies to balance"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\nkind = \"http\"\npath = \"healthz\"\n"), "listener[0].health.path", 6, "must start with '/'"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\npath = \"/a b\"\n"), "listener[0].health.path", 5, "no spaces"),
        (l("name = \"a\"\nbind = \"127.0.0.1:80\"\nprotocol = \"udp\"\n[listener.health]\nkind = \"tcp\"\n"), "listener[0].health.port", 5, "needs a port"),
        (l("name = \"a\"\nbind = \"0.0.0.0:53\"\nprotocol = \"udp\"\n"), "listener[0].bind", 3, "must bind a specific address"),
        ("[runtime]\nworkers = 5000\n".into(), "runtime.workers", 2, "above the maximum"),
        ("[runtime]\nengine = \"dpdk\"\n".into(), "runtime.engine", 2, "unknown variant `dpdk`"),
        ("[runtime]\nsplice = \"auto\"\n".into(), "runtime.splice", 2, "expected a boolean"),
        ("[admin]\ncontrol_tcp = \"0.0.0.0:9443\"\n".into(), "admin.tls_cert", 1, "is required with admin.control_tcp"),
        ("[admin]\nmetrics = \"localhost\"\n".into(), "admin.metrics", 2, "not an address"),
        ("[defaults]\ndrain_timeout = \"0ms\"\n".into(), "defaults.drain_timeout", 2, "greater than zero"),
        ("[[listener]\nname = \"a\"\n".into(), "", 1, "syntax error"),
    ]
}

#[test]
fn invalid_configs_name_path_and_line() {
    let cases = invalid_cases();
    assert!(cases.len() >= 15);
    for (text, path, line, fragment) in cases {
        let errors = parse_config(&text).expect_err(&text).0;
        let hit = errors
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no error at {path:?} for\n{text}\ngot: {errors:#?}"));
        assert!(
            hit.message.contains(fragment),
            "{path}: {:?} lacks {fragment:?}",
            hit.message
        );
        assert_eq!(hit.line, Some(line), "{path} in\n{text}\n{hit}");
    }
}

#[test]
fn all_errors_are_collected() {
    let errors = parse_config(
        "[[listener]]\nname = \"\"\nbind = \"x\"\nconnect_timeout = \"0s\"\nsource_ranges = [\"nope\"]\nbackends = [{ addr = \"y\" }]\n",
    )
    .unwrap_err()
    .0;
    let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "listener[0].name",
        "listener[0].bind",
        "listener[0].connect_timeout",
        "listener[0].source_ranges[0]",
        "listener[0].backends[0].addr",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
}

#[test]
fn json_round_trip_of_specs_and_resolved_listeners() {
    let cfg = load_config(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/lbd.toml"
    )))
    .unwrap();
    let json = serde_json::to_string(&cfg.listeners).unwrap();
    let back: Vec<Listener> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg.listeners);

    let state: DesiredState = serde_json::from_str(
        r#"{"version": 7, "listeners": [{"name": "svc/a:80", "bind": "127.0.10.1:80", "idle_timeout": "5m",
            "backends": [{"addr": "127.0.0.2:30080", "weight": 2}], "health": {"kind": "http", "port": 10256, "path": "/healthz"}}]}"#,
    )
    .unwrap();
    let listeners = resolve_listeners(&state.listeners, &Defaults::default(), "listeners").unwrap();
    assert_eq!(listeners[0].idle_timeout, Duration::from_secs(300));
    assert_eq!(listeners[0].health.port, Some(10256));
    let again: DesiredState =
        serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(again, state);
    let bad = resolve_listeners(
        &state.listeners,
        &Defaults {
            connect_timeout: Some(Duration::from_secs(0)),
            ..Default::default()
        },
        "listeners",
    )
    .unwrap_err();
    // A state's writer cannot see the file's [defaults]: the error is its
    // listener's (the controller turns it into an Event on its Service).
    assert_eq!(bad[0].path, "listeners[0].connect_timeout");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        let _ = parse_config(&text);
    }

    #[test]
    fn mutated_valid_files_never_panic(cut in 0usize..2000, insert in "[\\[\\]{}=\",.a-z0-9 \n]{0,12}") {
        let base = include_str!("../examples/lbd.toml");
        let at = (cut % base.len()..).find(|i| base.is_char_boundary(*i)).unwrap_or(base.len());
        let text = format!("{}{}{}", &base[..at], insert, &base[at..]);
        if let Err(errors) = parse_config(&text) {
            prop_assert!(!errors.0.is_empty());
        }
    }
}

#[test]
fn splice_is_on_unless_turned_off() {
    assert!(parse_config("").unwrap().runtime.splice);
    let off = parse_config("[runtime]\nsplice = false\n").unwrap();
    assert!(!off.runtime.splice);
}

/// An error repeats at most the start of a huge value, with its length.
#[test]
fn errors_quote_huge_values_in_part() {
    let name = "x y".repeat(300_000);
    let text = format!("[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:80\"\n");
    let errors = parse_config(&text).unwrap_err().0;
    let e = errors
        .iter()
        .find(|e| e.path == "listener[0].name")
        .unwrap();
    assert!(e.message.len() < 300, "{} bytes", e.message.len());
    assert!(e.message.contains("900000 bytes"), "{}", e.message);
}

/// Only regular files are read, and at most MAX_FILE bytes of them: a
/// device or a huge file is an error, not a hang or an exhausted memory.
#[test]
fn only_regular_files_of_bounded_size_are_read() {
    let err = lb_config::load_config(std::path::Path::new("/dev/zero")).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let dir = std::env::temp_dir().join(format!("weir-config-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let big = dir.join("big.toml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(lb_config::MAX_FILE + 1).unwrap();
    let err = lb_config::load_config(&big).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A check of the backend's own port sends the listener's PROXY header by
/// default; a check of another port does not; either can be set.
#[test]
fn health_checks_send_proxy_where_the_backend_expects_it() {
    use lb_config::ProxyProtocol;
    let cfg = |extra: &str, health: &str| {
        let text = format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n{extra}\nbackends = [{{ addr = \"127.0.0.2:80\" }}]\n[listener.health]\nkind = \"http\"\n{health}"
        );
        parse_config(&text).unwrap().listeners[0].health.send_proxy
    };
    assert_eq!(cfg("", ""), ProxyProtocol::Off);
    assert_eq!(cfg("proxy_protocol = \"v1\"", ""), ProxyProtocol::V1);
    assert_eq!(cfg("proxy_protocol = \"v2\"", ""), ProxyProtocol::V2);
    assert_eq!(
        cfg("proxy_protocol = \"v2\"", "port = 10256"),
        ProxyProtocol::Off
    );
    assert_eq!(
        cfg("proxy_protocol = \"v2\"", "port = 10256\nsend_proxy = true"),
        ProxyProtocol::V2
    );
    assert_eq!(
        cfg("proxy_protocol = \"v1\"", "send_proxy = false"),
        ProxyProtocol::Off
    );
}

/// An unset check timeout fits the interval: the default (1 s), or the
/// interval when that is shorter; only a timeout set longer is an error.
#[test]
fn an_unset_check_timeout_fits_the_interval() {
    let timeout = |health: &str| {
        let text = format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\n{health}"
        );
        parse_config(&text).map(|c| c.listeners[0].health.timeout)
    };
    assert_eq!(
        timeout("interval = \"200ms\"").unwrap(),
        Duration::from_millis(200)
    );
    assert_eq!(
        timeout("interval = \"5s\"").unwrap(),
        Duration::from_secs(1)
    );
    assert!(timeout("interval = \"200ms\"\ntimeout = \"201ms\"").is_err());
}

#[test]
fn announce_defaults_and_values() {
    let cfg = parse_config("").unwrap();
    assert_eq!(cfg.announce, Announce::default());
    assert_eq!(cfg.announce.mode, AnnounceMode::Off);
    assert_eq!(cfg.announce.interface, "weir0");
    assert!(cfg.announce.create_interface);
    assert_eq!(cfg.announce.when, AnnounceWhen::Healthy);
    assert_eq!(cfg.announce.withdraw_grace, Duration::from_secs(5));
    let cfg = parse_config(
        "[announce]\nmode = \"bgp\"\ninterface = \"vips\"\ncreate_interface = false\nwhen = \"always\"\nwithdraw_grace = \"250ms\"\n",
    )
    .unwrap();
    assert_eq!(cfg.announce.mode, AnnounceMode::Bgp);
    assert_eq!(cfg.announce.interface, "vips");
    assert!(!cfg.announce.create_interface);
    assert_eq!(cfg.announce.when, AnnounceWhen::Always);
    assert_eq!(cfg.announce.withdraw_grace, Duration::from_millis(250));
}

#[test]
fn announce_errors_name_the_field_and_line() {
    let e = parse_config("[runtime]\n\n[announce]\nmode = \"l2\"\n").unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].path, "announce.interface");
    assert!(e.0[0].message.contains("LAN interface"), "{e}");
    let e = parse_config("[announce]\nmode = \"l2\"\ninterface = \"eth0\"\nwhen = \"always\"\n")
        .unwrap_err();
    assert_eq!(e.0[0].path, "announce.when", "{e}");
    assert_eq!(e.0[0].line, Some(4));
    let cfg = parse_config("[announce]\nmode = \"l2\"\ninterface = \"eth0\"\n").unwrap();
    assert_eq!(cfg.announce.mode, AnnounceMode::L2);
    assert!(!cfg.announce.create_interface);

    let e =
        parse_config("[announce]\nmode = \"bgp\"\ninterface = \"a/b\"\nwithdraw_grace = \"1h\"\n")
            .unwrap_err();
    let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["announce.interface", "announce.withdraw_grace"],
        "{e}"
    );
    assert_eq!(e.0[0].line, Some(3));

    let e = parse_config("[announce]\nmode = \"ospf\"\n").unwrap_err();
    assert_eq!(e.0[0].path, "announce.mode", "{e}");
    let e = parse_config("[announce]\nintreface = \"x\"\n").unwrap_err();
    assert!(e.0[0].message.contains("intreface"), "{e}");
    let e = parse_config("[announce]\ninterface = \"lo\"\n").unwrap_err();
    assert_eq!(e.0[0].path, "announce.interface", "{e}");
}

/// Every error of `text`, as (path, line, message).
fn errors_of(text: &str) -> Vec<(String, Option<usize>, String)> {
    parse_config(text)
        .expect_err(text)
        .0
        .into_iter()
        .map(|e| (e.path, e.line, e.message))
        .collect()
}

#[test]
fn a_bad_default_is_reported_once_where_it_was_written() {
    let two = |defaults: &str| {
        format!(
            "{defaults}\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\nfall = 2\n\
             [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:81\"\n"
        )
    };
    for (defaults, path, line) in [
        (
            "[defaults]\nsource_ranges = [\"1.2.3.0/40\"]",
            "defaults.source_ranges[0]",
            2,
        ),
        (
            "[defaults]\nidle_timeout = \"0s\"",
            "defaults.idle_timeout",
            2,
        ),
        ("[defaults.health]\nrise = 1000", "defaults.health.rise", 2),
        ("[defaults.health]\nport = 0", "defaults.health.port", 2),
    ] {
        let text = two(defaults);
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{text}\n{errors:#?}");
        assert_eq!(errors[0].0, path, "{text}\n{errors:#?}");
        assert_eq!(errors[0].1, Some(line), "{text}\n{errors:#?}");
    }
    // A listener's own bad value stays the listener's, next to the default.
    let errors = errors_of(
        "[defaults.health]\nrise = 0\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n\
         [listener.health]\nrise = 0\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:81\"\n",
    );
    let paths: Vec<&str> = errors.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(paths, ["listener[0].health.rise", "defaults.health.rise"]);
}

#[test]
fn a_timeout_nobody_wrote_is_not_blamed_for_a_zero_interval() {
    let errors = errors_of(
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\ninterval = \"0s\"\n",
    );
    let paths: Vec<&str> = errors.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(paths, ["listener[0].health.interval"]);
}

#[test]
fn a_check_path_without_an_http_check_is_a_warning() {
    // A warning, not an error: files that loaded before keep loading.
    let warnings = |text: &str| {
        let (_, w) = parse_config_warned(text).unwrap_or_else(|e| panic!("{text}\n{e}"));
        w.into_iter()
            .map(|w| (w.path, w.line, w.message))
            .collect::<Vec<_>>()
    };
    let listener = |health: &str| {
        format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\n{health}\n"
        )
    };
    let w = warnings(&listener("path = \"/ready\""));
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!(
        (w[0].0.as_str(), w[0].1),
        ("listener[0].health.path", Some(5))
    );
    assert!(w[0].2.contains("health.kind is \"tcp\""), "{}", w[0].2);
    assert_eq!(
        warnings(&listener("kind = \"none\"\npath = \"/ready\"")).len(),
        1
    );
    assert!(warnings(&listener("kind = \"http\"\npath = \"/ready\"")).is_empty());
    // The kind may come from [defaults].
    let text = format!(
        "[defaults.health]\nkind = \"http\"\n{}",
        listener("path = \"/ready\"")
    );
    assert!(warnings(&text).is_empty());
    // A path in [defaults] with no kind there serves http listeners and
    // leaves tcp ones alone; with a kind that is not http, it is unused.
    let two = |defaults: &str| {
        format!(
            "[defaults.health]\n{defaults}\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n\
             [listener.health]\nkind = \"http\"\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:81\"\n"
        )
    };
    let text = two("path = \"/ready\"");
    assert!(warnings(&text).is_empty());
    let cfg = parse_config(&text).unwrap();
    assert_eq!(cfg.listeners[0].health.path, "/ready");
    assert_eq!(cfg.listeners[1].health.kind, HealthKind::Tcp);
    // With a kind there that is not http, it is still used by a listener
    // whose own check is http ...
    assert!(warnings(&two("kind = \"tcp\"\npath = \"/ready\"")).is_empty());
    // ... and unused when none is.
    let text = "[defaults.health]\nkind = \"tcp\"\npath = \"/ready\"\n\
                [[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n";
    let w = warnings(text);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!((w[0].0.as_str(), w[0].1), ("defaults.health.path", Some(3)));
}

#[test]
fn admin_endpoints_need_ports_no_listener_binds() {
    let file = |admin: &str, bind: &str| {
        format!("[admin]\n{admin}\n[[listener]]\nname = \"web\"\nbind = \"{bind}\"\n")
    };
    for (admin, bind, path, line) in [
        ("metrics = \"127.0.0.1:8080\"", "127.0.0.1:8080", "admin.metrics", 2),
        ("metrics = \"0.0.0.0:8080\"", "127.0.0.1:8080", "admin.metrics", 2),
        ("metrics = \"127.0.0.1:8080\"", "0.0.0.0:8080", "admin.metrics", 2),
        ("metrics = \"127.0.0.1:8080\"", "[::]:8080", "admin.metrics", 2),
        (
            "metrics = \"127.0.0.1:9000\"\ncontrol_tcp = \"127.0.0.1:9000\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\ntoken_file = \"/t\"",
            "127.0.0.1:80",
            "admin.control_tcp",
            3,
        ),
    ] {
        let text = file(admin, bind);
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{text}\n{errors:#?}");
        assert_eq!(errors[0].0, path, "{text}");
        assert_eq!(errors[0].1, Some(line), "{text}");
    }
    // Other ports, another family's wildcard, port 0, and a udp listener
    // on the same port are all fine.
    for (admin, bind) in [
        ("metrics = \"127.0.0.1:9600\"", "127.0.0.1:8080"),
        ("metrics = \"[::1]:8080\"", "0.0.0.0:8080"),
        ("metrics = \"127.0.0.1:0\"", "127.0.0.1:0"),
    ] {
        parse_config(&file(admin, bind)).unwrap_or_else(|e| panic!("{admin} / {bind}: {e}"));
    }
    parse_config(
        "[admin]\nmetrics = \"127.0.0.1:5353\"\n[[listener]]\nname = \"dns\"\nbind = \"127.0.0.1:5353\"\nprotocol = \"udp\"\n",
    )
    .unwrap();
}

#[test]
fn type_errors_in_several_listeners_are_reported_together() {
    let text = "[runtime]\nworkers = \"two\"\n\
                [[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\nbalance = \"fastest\"\n\
                [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:81\"\n\
                [[listener]]\nname = \"c\"\nbind = \"127.0.0.1:82\"\nbackends = [{ addr = \"127.0.0.2:80\", weight = \"2\" }]\nbogus = 1\n";
    let errors = errors_of(text);
    let found: Vec<(&str, Option<usize>)> = errors.iter().map(|e| (e.0.as_str(), e.1)).collect();
    // The first error of each section and listener (listener[2]'s unknown
    // key comes after its wrong weight), each at its line.
    assert_eq!(
        found,
        [
            ("runtime.workers", Some(2)),
            ("listener[0].balance", Some(6)),
            ("listener[2].backends[0].weight", Some(13)),
        ],
        "{errors:#?}"
    );
    assert!(
        errors[1].2.contains("unknown variant `fastest`"),
        "{errors:#?}"
    );
    // A syntax error stops everything at once.
    let errors = errors_of("[runtime]\nworkers = \n[[listener]]\nname = 1\n");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].2.starts_with("syntax error"), "{errors:#?}");
}
