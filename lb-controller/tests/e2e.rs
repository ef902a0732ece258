//! End to end on loopback, no mocks in the data path: the in-test API
//! server, the real `lb-controller` binary, a real `lbd` process, and
//! "nodes" that are listeners on 127.0.0.2–127.0.0.4 at the NodePort.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// A node's NodePort: answers every connection with the node's name.
struct NodePort {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodePort {
    fn start(addr: SocketAddr, name: &'static str) -> Self {
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // Bounded: stops when told, or after 5 minutes at most.
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            while !flag.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// The node dies: its port closes.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NodePort {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ask(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    (!out.is_empty()).then_some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_to_traffic_and_back_on_loopback() {
    let dir = temp_dir("e2e");
    let api = ApiServer::start().await;
    let node_port = free_port("127.0.0.2");
    let names = ["node-a", "node-b", "node-c"];
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        api.create(NODES, "", node(name, &ip));
        nodes.push(NodePort::start(
            format!("{ip}:{node_port}").parse().unwrap(),
            name,
        ));
    }
    let edge = start_forwarder(&dir, "").await;
    let socket = &edge.socket;
    let extra = format!(
        "[leader_election]\nenabled = false\n\n[[pool]]\nname = \"loopback\"\naddresses = [\"127.0.10.0/24\"]\navoid_buggy_ips = true\n\n[health]\ncluster = \"tcp\"\n\n{}",
        edge.toml
    );
    let cfg = controller_config(&dir, &api.kubeconfig(&dir, "ctl"), &extra);
    api.enforce_rbac("ctl", manifest_rules());
    let _ctl = start_controller(&cfg, "e2e");

    let port = free_port("127.0.0.1");
    api.create(SERVICES, "shop", lb_service("web", &[(port, node_port)]));
    let svc = assigned(&api, "shop", "web").await;
    let ip = ingress_ips(&svc)[0].clone();
    assert!(ip.starts_with("127.0.10."), "{ip}");
    let vip: SocketAddr = format!("{ip}:{port}").parse().unwrap();

    // A TCP client to that IP and port reaches a node; many reach all three.
    eventually(WAIT, "the VIP answers", || ask(vip)).await;
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        seen.insert(ask(vip).expect("answer through the VIP"));
    }
    assert_eq!(seen, names.iter().map(|s| s.to_string()).collect());

    // Kill one node: traffic continues through the others, at once (connect
    // failures are retried on another node) and after health catches up.
    nodes[1].kill();
    let mut after = BTreeSet::new();
    for _ in 0..60 {
        after.insert(ask(vip).expect("answer with one node down"));
    }
    assert!(!after.contains("node-b"), "{after:?}");
    assert_eq!(after.len(), 2, "{after:?}");

    // Delete the Service: the listener goes, then the address is free again.
    api.delete(SERVICES, "shop", "web");
    eventually(WAIT, "Service deleted", || {
        api.get(SERVICES, "shop", "web").is_none().then_some(())
    })
    .await;
    let state = lbd_state(socket).await.unwrap();
    assert_eq!(state["listeners"], json!([]));
    assert!(
        TcpStream::connect_timeout(&vip, Duration::from_secs(1)).is_err(),
        "the VIP still accepts"
    );
    let mut again = lb_service("again", &[(port, node_port)]);
    again["metadata"]["annotations"] = json!({"weir.dev/load-balancer-ips": ip});
    api.create(SERVICES, "shop", again);
    let again = assigned(&api, "shop", "again").await;
    assert_eq!(ingress_ips(&again), vec![ip]);
    eventually(WAIT, "and serves again", || ask(vip)).await;
    assert_eq!(
        api.denied(),
        Vec::<String>::new(),
        "the manifest's RBAC is not enough"
    );
}
