//! What the controller writes, counted the way an audit log counts: a
//! bounded number of writes per create, change and delete whatever the
//! number of other Services, none when nothing changed (a restart, a
//! failover, a forwarder acknowledging a state), on each Kubernetes release
//! the in-test API server can behave like.
//!
//! "No write happened" is checked up to a barrier: a Service created
//! afterwards and seen programmed (its address written and a forwarder
//! acknowledgement processed), by which time the controller has handled
//! everything the operation under test caused.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use support::apiserver::Release;
use support::*;

/// A pool of 1,020 addresses from `127.0.{block}.0/22`. Each test has its
/// own block: the tests run at once, each with its own `lbd`, and an `lbd`
/// never shares an address and port with another process.
fn pool(block: u8) -> String {
    format!(
        "[[pool]]\nname = \"big\"\naddresses = [\"127.0.{block}.0/22\"]\navoid_buggy_ips = true\n"
    )
}
const SOLO: &str = "[leader_election]\nenabled = false\n";
const OTHERS: usize = 500;

/// Writes by `user` about `default/name`, as `(verb, resource)` counts.
fn counts(api: &ApiServer, user: &str, name: &str) -> BTreeMap<(String, String), usize> {
    api.write_counts(user, &format!("default/{name}"))
}

/// What creating one Service costs: the finalizer, one status write (the
/// address with the condition True, once the forwarder runs it), one Event.
fn assert_create_cost(counts: &BTreeMap<(String, String), usize>, what: &str) {
    assert_eq!(
        *counts,
        expect(&[
            ("patch", "services", 1),
            ("patch", "services/status", 1),
            ("create", "events", 1)
        ]),
        "{what}"
    );
}

fn expect(list: &[(&str, &str, usize)]) -> BTreeMap<(String, String), usize> {
    list.iter()
        .map(|(v, r, n)| ((v.to_string(), r.to_string()), *n))
        .collect()
}

/// Writes by `user` since `from` about anything but `except`.
fn others_since(api: &ApiServer, user: &str, from: usize, except: &[&str]) -> Vec<String> {
    api.writes()[from..]
        .iter()
        .filter(|w| w.user == user && !except.iter().any(|e| w.about == format!("default/{e}")))
        .map(|w| format!("{} {} {}", w.verb, w.resource, w.about))
        .collect()
}

/// Gives the forwarder 60 s to answer instead of the test config's 3 s.
fn patient(cfg: &std::path::Path) {
    let text = std::fs::read_to_string(cfg).unwrap();
    assert!(text.contains("timeout = \"3s\""), "{text}");
    std::fs::write(cfg, text.replace("timeout = \"3s\"", "timeout = \"60s\"")).unwrap();
}

/// Creates a Service and waits until it is programmed: past this point the
/// controller has processed at least one later forwarder report.
async fn barrier(api: &ApiServer, name: &str) {
    api.create(SERVICES, "default", lb_service(name, &[(80, 0)]));
    programmed(api, "default", name).await;
}

fn reconciles(metrics: &str) -> f64 {
    let text = http_get(metrics, "/metrics").expect("metrics");
    metric(&text, "weir_controller_reconciles_total").expect("reconciles metric")
}

/// With 500 other Services programmed: creating one costs one finalizer
/// write, one status write (address and condition True) and one Event;
/// changing an annotation that changes its listeners costs nothing (the
/// condition stays True while the forwarders take the change) and
/// reconciles a handful of Services, not all; deleting it costs one
/// finalizer write and one Event. No other Service is written to, and no
/// write is refused with 409.
async fn bounded_writes(release: Release, block: u8) {
    let metrics = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let Bed { api, edge, cfg, .. } = bed(
        &format!("writes-{release:?}"),
        release,
        &format!("{}{SOLO}[admin]\nmetrics = \"{metrics}\"\n", pool(block)),
    )
    .await;
    // A forwarder that takes longer than the publish timeout to apply
    // 500 listeners (a loaded machine) is a failure the condition reports,
    // and one more write: not what this test counts.
    patient(&cfg);
    let _ctl = start_controller(&cfg, "a");
    for i in 0..OTHERS {
        api.create(
            SERVICES,
            "default",
            lb_service(&format!("other-{i:03}"), &[(80, 0)]),
        );
    }
    eventually(Duration::from_secs(120), "500 Services programmed", || {
        let done = api
            .list(SERVICES)
            .iter()
            .filter(|s| programmed_status(s) == Some("True"))
            .count();
        (done == OTHERS).then_some(())
    })
    .await;
    let others: Vec<String> = (0..OTHERS).map(|i| format!("other-{i:03}")).collect();
    for name in others.iter().step_by(50) {
        assert_create_cost(
            &counts(&api, "ctl", name),
            &format!("{name}, created with the others ({release:?})"),
        );
    }

    // Create.
    let from = api.writes().len();
    api.create(SERVICES, "default", lb_service("web", &[(80, 0)]));
    programmed(&api, "default", "web").await;
    eventually(Duration::from_secs(30), "IPAllocated", || {
        events_for(&api, "web", "IPAllocated").into_iter().next()
    })
    .await;
    barrier(&api, "after-create").await;
    assert_create_cost(
        &counts(&api, "ctl", "web"),
        &format!("create ({release:?})"),
    );
    assert_eq!(
        others_since(&api, "ctl", from, &["web", "after-create"]),
        Vec::<String>::new(),
        "create ({release:?})"
    );

    // An annotation that changes the listeners.
    let from = api.writes().len();
    let reconciles_before = reconciles(&metrics);
    let web = counts(&api, "ctl", "web");
    api.patch(
        SERVICES,
        "default",
        "web",
        json!({"metadata": {"annotations": {"weir.dev/idle-timeout": "5m"}}}),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state = lbd_state(&edge.socket).await.unwrap_or_default();
        let taken = state["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| {
                l["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("default/web:"))
                    && !l["idle_timeout"].is_null()
            });
        if taken {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the forwarder runs the change"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    barrier(&api, "after-change").await;
    assert_eq!(
        counts(&api, "ctl", "web"),
        web,
        "annotation change ({release:?})"
    );
    assert_eq!(
        others_since(&api, "ctl", from, &["web", "after-change"]),
        Vec::<String>::new(),
        "annotation change ({release:?})"
    );
    let reconciled = reconciles(&metrics) - reconciles_before;
    assert!(
        reconciled < 50.0,
        "{reconciled} reconciles for one annotation change among {OTHERS} Services ({release:?})"
    );

    // Delete.
    let from = api.writes().len();
    api.delete(SERVICES, "default", "web");
    eventually(Duration::from_secs(30), "web gone", || {
        api.get(SERVICES, "default", "web").is_none().then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "IPReleased", || {
        events_for(&api, "web", "IPReleased").into_iter().next()
    })
    .await;
    barrier(&api, "after-delete").await;
    let mut deleted = counts(&api, "ctl", "web");
    for (key, n) in &web {
        *deleted.get_mut(key).unwrap() -= n;
    }
    deleted.retain(|_, n| *n > 0);
    assert_eq!(
        deleted,
        expect(&[("patch", "services", 1), ("create", "events", 1)]),
        "delete ({release:?})"
    );
    assert_eq!(
        others_since(&api, "ctl", from, &["web", "after-delete"]),
        Vec::<String>::new(),
        "delete ({release:?})"
    );
    let conflicts: Vec<_> = api
        .rejections()
        .into_iter()
        .filter(|r| r.user == "ctl")
        .collect();
    assert_eq!(conflicts, [], "refused writes ({release:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_writes_on_1_28_which_drops_ip_mode() {
    bounded_writes(Release::V1_28, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_writes_on_1_30_which_keeps_ip_mode() {
    bounded_writes(Release::V1_30, 12).await;
}

/// Programmed Services and a forwarder that runs them: a restarted
/// controller (on 1.28, which drops `ipMode`, and on 1.29) learns what the
/// forwarder runs before it judges any condition, and writes nothing to
/// any of them: no condition flaps to False and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_nothing_changed_writes_nothing() {
    for release in [Release::V1_28, Release::V1_29] {
        let Bed { api, edge, cfg, .. } = bed(
            &format!("restart-quiet-{release:?}"),
            release,
            &format!("{}{SOLO}", pool(16)),
        )
        .await;
        let mut ctl = start_controller(&cfg, "a");
        let names: Vec<String> = (0..30).map(|i| format!("svc-{i:02}")).collect();
        create_programmed(&api, &edge, &names).await;
        ctl.kill();
        let from = api.writes().len();
        let _ctl = start_controller(&cfg, "b");
        barrier(&api, "after-restart").await;
        assert_eq!(
            others_since(&api, "ctl", from, &["after-restart"]),
            Vec::<String>::new(),
            "{release:?}"
        );
    }
}

/// The same across a failover: the standby that takes over writes nothing
/// to Services whose forwarding did not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_with_nothing_changed_writes_nothing() {
    let dir = temp_dir("failover-quiet");
    let api = ApiServer::start_as(Release::V1_30).await;
    three_nodes(&api);
    let edge = start_forwarder(&dir, "").await;
    let le = "[leader_election]\nnamespace = \"weir-system\"\nlease_name = \"lb-controller\"\nlease_duration = \"2s\"\nrenew_interval = \"500ms\"\n";
    let extra = format!("{}{le}{}[health]\ncluster = \"tcp\"\n", pool(20), edge.toml);
    let cfg_a = controller_config(&dir, &api.kubeconfig(&dir, "alpha"), &extra);
    let cfg_b = controller_config(&dir, &api.kubeconfig(&dir, "beta"), &extra);
    let mut alpha = start_controller(&cfg_a, "alpha");
    eventually(Duration::from_secs(30), "alpha leads", || {
        api.get(LEASES, "weir-system", "lb-controller")
            .filter(|l| l["spec"]["holderIdentity"] == "alpha")
    })
    .await;
    let _beta = start_controller(&cfg_b, "beta");
    let names: Vec<String> = (0..20).map(|i| format!("svc-{i:02}")).collect();
    create_programmed(&api, &edge, &names).await;
    alpha.kill();
    let from = api.writes().len();
    eventually(Duration::from_secs(30), "beta leads", || {
        api.get(LEASES, "weir-system", "lb-controller")
            .filter(|l| l["spec"]["holderIdentity"] == "beta")
    })
    .await;
    barrier(&api, "after-failover").await;
    let services: Vec<String> = api.writes()[from..]
        .iter()
        .filter(|w| {
            w.user != "admin" && w.resource != "leases" && w.about != "default/after-failover"
        })
        .map(|w| format!("{} {} {} by {}", w.verb, w.resource, w.about, w.user))
        .collect();
    assert_eq!(services, Vec::<String>::new());
}

/// A restarted controller judges conditions by what the forwarders run,
/// learnt before its first judgement: when the forwarder already runs
/// every Service as it should and then refuses new states (here it cannot
/// persist them), the Services it runs stay True and are not written to;
/// only a new one, which it does not run, is reported failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_judges_conditions_by_what_the_forwarders_run() {
    let Bed {
        dir,
        api,
        edge,
        cfg,
    } = bed(
        "restart-learns",
        Release::default(),
        &format!("{}{SOLO}", pool(24)),
    )
    .await;
    let mut ctl = start_controller(&cfg, "a");
    let names: Vec<String> = (0..10).map(|i| format!("svc-{i:02}")).collect();
    create_programmed(&api, &edge, &names).await;
    ctl.kill();
    // From now on the forwarder cannot persist a state, so it refuses every
    // PUT (500, nothing changed) while it keeps serving what it runs.
    let state_file = dir.join("edge-state").join("state.json");
    std::fs::remove_file(&state_file).unwrap();
    std::fs::create_dir_all(state_file.join("in-the-way")).unwrap();
    let from = api.writes().len();
    let _ctl = start_controller(&cfg, "b");
    api.create(SERVICES, "default", lb_service("probe", &[(80, 0)]));
    let probe = eventually(Duration::from_secs(30), "probe reported failing", || {
        api.get(SERVICES, "default", "probe").filter(|s| {
            s["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "weir.dev/ForwardersProgrammed"
                        && c["reason"] == "ForwarderFailing"
                })
            })
        })
    })
    .await;
    assert!(!ingress_ips(&probe).is_empty());
    assert_eq!(
        others_since(&api, "ctl", from, &["probe"]),
        Vec::<String>::new()
    );
    for name in &names {
        let svc = api.get(SERVICES, "default", name).unwrap();
        assert_eq!(programmed_status(&svc), Some("True"), "{name}");
    }
}
