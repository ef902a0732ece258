//! What operators import rather than write: the Grafana dashboard
//! (`deploy/grafana/weir.json`) and the Prometheus alerting rules
//! (`deploy/prometheus/weir-rules.yaml`, with its promtool unit tests).
//! promtool (Debian's `prometheus`) checks the rules, runs their unit
//! tests and parses every dashboard query; and every metric the dashboard
//! and the rules query is exported by a running `lbd` and a running
//! `lb-controller` (against the in-test API server), scraped over HTTP.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::deploy::repo;
use support::*;

fn dashboard() -> Value {
    serde_json::from_slice(&std::fs::read(repo().join("deploy/grafana/weir.json")).unwrap())
        .expect("weir.json is JSON")
}

/// Every PromQL expression of the dashboard: panel targets and the
/// template variables' queries.
fn dashboard_exprs() -> Vec<String> {
    let d = dashboard();
    let mut out = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(
                target["expr"]
                    .as_str()
                    .expect("a target has expr")
                    .to_owned(),
            );
        }
    }
    for var in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

fn rules() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/weir-rules.yaml")).unwrap();
    serde_saphyr::from_str(&text).expect("weir-rules.yaml is YAML")
}

fn rule_exprs() -> Vec<String> {
    let mut out = Vec::new();
    for group in rules()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            out.push(rule["expr"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// The `weir_*` names an expression mentions.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("weir_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

fn promtool() -> bool {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "\n*** SKIPPED: promtool is not installed (apt-get install prometheus; .ci/run does) ***\n"
        );
    }
    ok
}

fn promtool_ok(args: &[&str], cwd: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    if !promtool() {
        return;
    }
    let dir = repo().join("deploy/prometheus");
    promtool_ok(&["check", "rules", "weir-rules.yaml"], &dir);
    promtool_ok(&["test", "rules", "weir-rules.test.yaml"], &dir);
}

#[test]
fn the_rules_cover_what_operators_page_on() {
    let alerts: BTreeSet<String> = rules()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| r["alert"].as_str().unwrap().to_owned())
        .collect();
    for alert in [
        "WeirBackendDown",
        "WeirForwarderBehind",
        "WeirPoolNearlyFull",
        "WeirReloadRejected",
        "WeirVipNotAnnounced",
    ] {
        assert!(alerts.contains(alert), "{alert} missing from {alerts:?}");
    }
}

#[test]
fn the_dashboard_has_its_rows_and_promtool_parses_every_query() {
    let d = dashboard();
    let rows: Vec<&str> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        rows,
        [
            "Traffic",
            "Backends and health",
            "Control plane",
            "Controller"
        ]
    );
    let ids: Vec<_> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "panel ids are unique"
    );
    if !promtool() {
        return;
    }
    // Each query as a recording rule, with Grafana's variables filled in
    // as Grafana would, so that promtool parses it.
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs().iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "2m")
            .replace("$instance", ".*")
            .replace("$controller", ".*");
        let expr = match expr.strip_prefix("label_values(") {
            // label_values(metric, label) is Grafana's, not PromQL.
            Some(args) => args.split(',').next().unwrap().to_owned(),
            None => expr,
        };
        file.push_str(&format!(
            "      - record: weir:dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = temp_dir("dashboard-rules");
    std::fs::write(dir.join("dashboard.yaml"), file).unwrap();
    promtool_ok(&["check", "rules", "dashboard.yaml"], &dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// `GET path` over plain HTTP/1.1; the body.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The metric names of a Prometheus text exposition (histograms by their
/// sample names: `_bucket`, `_sum`, `_count`).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_query_is_exported() {
    let dir = temp_dir("observability");
    let api = ApiServer::start().await;

    // A real lbd: a TCP listener with a live and a dead backend (health
    // checked) and a UDP listener, its control socket for the controller.
    let live = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let dead = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let udp_backend = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let socket = dir.join("lbd.sock");
    let lbd_config = dir.join("lbd.toml");
    std::fs::write(
        &lbd_config,
        format!(
            r#"[runtime]
workers = 1

[admin]
metrics = "{metrics}"
control_socket = "{socket}"
state_dir = "{state}"

[[listener]]
name = "web"
bind = "127.0.0.30:0"
backends = [{{ addr = "{live}" }}, {{ addr = "{dead}" }}]
[listener.health]
kind = "tcp"
interval = "200ms"
timeout = "200ms"

[[listener]]
name = "dns"
bind = "127.0.0.30:{udp_port}"
protocol = "udp"
backends = [{{ addr = "{udp}" }}]
"#,
            socket = socket.display(),
            state = dir.display(),
            live = live.local_addr().unwrap(),
            udp_port = free_port("127.0.0.30"),
            udp = udp_backend.local_addr().unwrap(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(lbd_binary());
    cmd.args(["run", "--config"])
        .arg(&lbd_config)
        .env("LBD_LOG", "warn");
    let _lbd = Proc::spawn(cmd, dir.join("lbd.log"));
    eventually(Duration::from_secs(30), "lbd control socket", || {
        socket.exists().then_some(())
    })
    .await;

    // A real lb-controller with a pool, that lbd, and a forwarder that is
    // not there (publish errors), serving its metrics.
    api.create(NODES, "", node("node-a", "127.0.0.4"));
    let controller_metrics: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let extra = format!(
        r#"[leader_election]
enabled = false

[admin]
metrics = "{controller_metrics}"

[[pool]]
name = "loopback"
addresses = ["127.0.21.0/24"]

[[forwarder]]
name = "edge"
url = "unix://{socket}"

[[forwarder]]
name = "gone"
url = "unix://{gone}"
"#,
        socket = socket.display(),
        gone = dir.join("gone.sock").display(),
    );
    let cfg = controller_config(&dir, &api.kubeconfig(&dir, "ctl"), &extra);
    let _ctl = start_controller(&cfg, "observability");
    api.create(
        SERVICES,
        "shop",
        lb_service("web", &[(free_port("127.0.0.1"), 0)]),
    );
    assigned(&api, "shop", "web").await;

    // Scrape until the labelled families the queries need have appeared.
    let scrape = || -> Option<BTreeSet<String>> {
        let mut names = exported(&http_get(metrics, "/metrics")?);
        names.extend(exported(&http_get(controller_metrics, "/metrics")?));
        let needed = [
            "weir_controller_forwarder_acked_version",
            "weir_controller_publish_errors_total",
            "weir_controller_pool_addresses_used",
            "weir_api_requests_total",
            "weir_api_applies_total",
            "weir_health_checks_total",
        ];
        needed.iter().all(|n| names.contains(*n)).then_some(names)
    };
    let names = eventually(Duration::from_secs(30), "every metric family", scrape).await;

    let mut queried = BTreeSet::new();
    for expr in dashboard_exprs().iter().chain(&rule_exprs()) {
        queried.extend(metric_names(expr));
    }
    assert!(queried.len() > 30, "{queried:?}");
    // Exported only by an lbd with `[announce]` on, which needs an
    // interface of its own: lb-core/tests/bgp.rs scrapes them there.
    let announce_only = ["weir_vip_announced", "weir_vip_announce_changes_total"];
    let bgp_test = include_str!("../../lb-core/tests/bgp.rs");
    for name in announce_only {
        assert!(bgp_test.contains(name), "{name} is checked nowhere");
    }
    let missing: Vec<_> = queried
        .difference(&names)
        .filter(|n| !announce_only.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but exported by neither lbd nor lb-controller: {missing:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
