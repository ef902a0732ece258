//! An in-memory Kubernetes API server for tests and benchmarks (feature
//! `test-support`): enough of the real one's behaviour, quirks included,
//! for the controller to run against it unchanged. Not for production.
//!
//! - list (with `limit`/`continue` pages and `labelSelector`) and watch from a
//!   `resourceVersion`, replaying history after it; a watch can be closed by
//!   the test and resumes; a `resourceVersion` older than the compacted
//!   history gets `410 Gone`, as from etcd compaction;
//! - the `status` subresource: a write to `/status` changes only `.status`,
//!   a write to the object never changes `.status`;
//! - JSON merge patches, strategic merge patches (treated as merge patches,
//!   which is exact for the fields the controller sends) and server-side
//!   apply (merged, with `fieldManager` required);
//! - `409 Conflict` when a write names a stale `metadata.resourceVersion`;
//! - graceful deletion with finalizers (`deletionTimestamp`, removal once the
//!   last finalizer goes);
//! - what the real server does to Services: NodePort and health-check
//!   NodePort allocation; `loadBalancerClass` only on LoadBalancer Services
//!   and immutable while they stay one; leaving LoadBalancer wipes the
//!   class, the NodePorts and `status.loadBalancer`;
//! - the release's view of `status.loadBalancer.ingress[].ipMode`
//!   ([`Release`]): unknown to 1.28 (dropped, with a warning), dropped by
//!   1.29's default feature gates unless already in use, kept from 1.30;
//! - optionally, the storage's commit latency on every write
//!   ([`ApiServer::set_write_latency`]);
//! - RBAC per bearer token, from the rules of a manifest;
//! - who wrote what: every write that reached storage (no-ops included, as
//!   an audit log counts them) and every refused one, with the caller's
//!   bearer token.

mod audit;
mod error;
mod http;
mod json;
mod kinds;
mod objects;
mod rbac;
mod service;
mod store;
mod watches;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

pub use audit::{Rejection, Write};
pub use json::{merge_patch, rfc3339};
use kinds::key_of;
pub use kinds::{Kind, Release, CORE_EVENTS, EVENTS, LEASES, NAMESPACES, NODES, SERVICES, SLICES};
pub use objects::{lb_service, node};
pub use rbac::Rule;
use store::{Shared, Store};

/// The server; dropped = stopped.
pub struct ApiServer {
    /// Its address (`http://` + this).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// The runtime it runs on, when it brought its own.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// Starts on 127.0.0.1 (port chosen by the kernel), behaving like the
    /// newest release ([`Release::default`]).
    pub async fn start() -> Self {
        Self::start_as(Release::default()).await
    }

    /// Starts on its own runtime, for callers that have none; stops when dropped
    /// (outside any runtime).
    pub fn start_on_own_runtime(release: Release) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("test-apiserver")
            .build()?;
        let mut server = runtime.block_on(Self::start_as(release));
        server.runtime = Some(runtime);
        Ok(server)
    }

    /// Starts on 127.0.0.1 (port chosen by the kernel), behaving like `release`.
    pub async fn start_as(release: Release) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (changes, _) = broadcast::channel(200_000);
        let (close, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            release,
            store: Mutex::new(Store {
                rv: 100,
                ..Store::default()
            }),
            changes,
            close,
            write_latency_us: 0.into(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(http::handle(s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            shared,
            task,
            runtime: None,
        }
    }

    /// Writes a kubeconfig for this server, authenticating with `token`.
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{token}"));
        let cfg = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": format!("http://{}", self.addr)}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "u"}}],
        });
        std::fs::write(&path, cfg.to_string()).expect("write kubeconfig");
        path
    }

    /// Creates an object as an administrator would.
    pub fn create(&self, kind: Kind, ns: &str, obj: Value) -> Value {
        self.shared.create(kind, ns, obj, "admin").expect("create")
    }

    /// Applies a merge patch as an administrator would.
    pub fn patch(&self, kind: Kind, ns: &str, name: &str, patch: Value) -> Value {
        self.try_patch("admin", kind, ns, name, false, patch)
            .expect("patch")
    }

    /// Applies a merge patch as `user`, to the object or (`status`) to its
    /// status; `Err` carries the refusal's code and message.
    pub fn try_patch(
        &self,
        user: &str,
        kind: Kind,
        ns: &str,
        name: &str,
        status: bool,
        patch: Value,
    ) -> Result<Value, (u16, String)> {
        self.shared
            .update(
                &store::Update {
                    kind,
                    ns,
                    name,
                    status,
                    user,
                    verb: "patch",
                },
                |cur| {
                    let mut next = cur.clone();
                    merge_patch(&mut next, &patch);
                    Ok(next)
                },
            )
            .map_err(|e| (e.code.as_u16(), e.message().to_owned()))
    }

    /// Deletes (gracefully, if finalizers are set).
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        self.shared.delete(kind, ns, name, "admin").expect("delete");
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let store = self.shared.store.lock().unwrap();
        store.objects.get(&key_of(kind, ns, name)).cloned()
    }

    /// How many stored objects of a kind satisfy `pred` (without copying
    /// them: cheap enough to poll while the server is busy).
    pub fn count(&self, kind: Kind, pred: impl Fn(&Value) -> bool) -> usize {
        let store = self.shared.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((v, p, _, _), o)| *v == kind.api_version && *p == kind.plural && pred(o))
            .count()
    }

    /// Every stored object of a kind.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.shared.list(kind, None, None).1
    }

    /// Ends every open watch (clients must resume from their last version).
    pub fn close_watches(&self) {
        self.shared.close.send_modify(|g| *g += 1);
    }

    /// Forgets history up to now: older watch versions get 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().unwrap();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// From now on, requests with `token` are allowed only what `rules` allow.
    pub fn enforce_rbac(&self, token: &str, rules: Vec<Rule>) {
        self.shared
            .store
            .lock()
            .unwrap()
            .rbac
            .insert(token.to_owned(), rules);
    }

    /// Requests refused by RBAC so far.
    pub fn denied(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().denied.clone()
    }

    /// Every write so far.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.store.lock().unwrap().writes.clone()
    }

    /// How many writes so far `user` made, about `object` (`namespace/name`,
    /// Events counted with the object they regard), per `(verb, resource)`.
    pub fn write_counts(&self, user: &str, object: &str) -> BTreeMap<(String, String), usize> {
        let mut counts = BTreeMap::new();
        let store = self.shared.store.lock().unwrap();
        for w in store
            .writes
            .iter()
            .filter(|w| w.user == user && w.about == object)
        {
            *counts
                .entry((w.verb.clone(), w.resource.clone()))
                .or_insert(0) += 1;
        }
        counts
    }

    /// Every refused write so far.
    pub fn rejections(&self) -> Vec<Rejection> {
        self.shared.store.lock().unwrap().rejections.clone()
    }

    /// From now on every write request waits `latency` before it is
    /// carried out, as a real server waits for its storage (etcd) to commit
    /// (none by default). Requests are still served concurrently.
    pub fn set_write_latency(&self, latency: std::time::Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shared
            .write_latency_us
            .store(us, std::sync::atomic::Ordering::Relaxed);
    }

    /// The release the server behaves like.
    pub fn release(&self) -> Release {
        self.shared.release
    }
}
