//! Storage and the write path: objects, resource versions, history for
//! watches, and what the server does on create, update and delete.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hyper::StatusCode;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use super::audit::{about, Rejection, Write};
use super::error::{api_err, ApiError};
use super::json::{labels_match, now_rfc3339, rv_of};
use super::kinds::{key_of, Kind, ObjKey, Release, SERVICES};
use super::rbac::Rule;
use super::service;

/// One change, as a watch sees it.
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub(super) rv: u64,
    pub(super) kind: Kind,
    pub(super) namespace: String,
    pub(super) kind_of_change: &'static str,
    pub(super) object: Value,
}

#[derive(Default)]
pub(super) struct Store {
    pub(super) rbac: BTreeMap<String, Vec<Rule>>,
    pub(super) denied: Vec<String>,
    pub(super) rv: u64,
    pub(super) objects: BTreeMap<ObjKey, Value>,
    pub(super) history: Vec<Change>,
    pub(super) compacted: u64,
    pub(super) writes: Vec<Write>,
    pub(super) rejections: Vec<Rejection>,
    pub(super) uid: u64,
    pub(super) node_ports: u16,
}

pub(super) struct Shared {
    pub(super) release: Release,
    pub(super) store: Mutex<Store>,
    pub(super) changes: broadcast::Sender<Change>,
    pub(super) close: watch::Sender<u64>,
    /// Added to every write request, in microseconds.
    pub(super) write_latency_us: AtomicU64,
}

/// Who updates which object, and how.
pub(super) struct Update<'a> {
    pub(super) kind: Kind,
    pub(super) ns: &'a str,
    pub(super) name: &'a str,
    /// The `status` subresource.
    pub(super) status: bool,
    pub(super) user: &'a str,
    /// `update` or `patch`.
    pub(super) verb: &'a str,
}

impl Update<'_> {
    /// The resource as RBAC and the audit log name it.
    fn resource(&self) -> String {
        if self.status {
            format!("{}/status", self.kind.plural)
        } else {
            self.kind.plural.to_owned()
        }
    }
}

impl Shared {
    pub(super) fn write_latency(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.write_latency_us.load(Ordering::Relaxed))
    }
}

impl Shared {
    pub(super) fn record(
        &self,
        store: &mut Store,
        kind: Kind,
        ns: &str,
        what: &'static str,
        obj: &Value,
    ) {
        let change = Change {
            rv: store.rv,
            kind,
            namespace: ns.to_owned(),
            kind_of_change: what,
            object: obj.clone(),
        };
        store.history.push(change.clone());
        let _ = self.changes.send(change);
    }

    pub(super) fn bump(store: &mut Store, obj: &mut Value) {
        store.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    }

    /// Records a refused write.
    fn refused<T>(
        &self,
        result: Result<T, ApiError>,
        user: &str,
        verb: &str,
        resource: String,
        object: String,
    ) -> Result<T, ApiError> {
        if let Err(e) = &result {
            self.store.lock().unwrap().rejections.push(Rejection {
                user: user.into(),
                verb: verb.into(),
                resource,
                object,
                code: e.code.as_u16(),
            });
        }
        result
    }

    /// Create: fills in server-owned metadata (and NodePorts for Services).
    pub(super) fn create(
        &self,
        kind: Kind,
        ns: &str,
        obj: Value,
        user: &str,
    ) -> Result<Value, ApiError> {
        let object = format!(
            "{ns}/{}",
            obj["metadata"]["name"].as_str().unwrap_or_default()
        );
        let result = self.try_create(kind, ns, obj, user);
        self.refused(result, user, "create", kind.plural.into(), object)
    }

    fn try_create(
        &self,
        kind: Kind,
        ns: &str,
        mut obj: Value,
        user: &str,
    ) -> Result<Value, ApiError> {
        let mut store = self.store.lock().unwrap();
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                api_err(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                )
            })?;
        let key = key_of(kind, ns, &name);
        if store.objects.contains_key(&key) {
            return Err(api_err(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.plural),
            ));
        }
        if rv_of(&obj).is_some() {
            return Err(api_err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.resourceVersion: must not be set on create",
            ));
        }
        obj["apiVersion"] = json!(kind.api_version);
        obj["kind"] = json!(kind.kind);
        if kind.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        store.uid += 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", store.uid));
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        obj["metadata"]["generation"] = json!(1);
        if kind == SERVICES {
            service::prepare_create(&mut store.node_ports, &mut obj)?;
        }
        omit_empty_metadata(&mut obj);
        Self::bump(&mut store, &mut obj);
        store.objects.insert(key, obj.clone());
        store.writes.push(Write {
            user: user.into(),
            verb: "create".into(),
            resource: kind.plural.into(),
            object: format!("{ns}/{name}"),
            about: about(kind, ns, &name, &obj),
        });
        self.record(&mut store, kind, ns, "ADDED", &obj);
        Ok(obj)
    }

    /// Update by a function of the current object; the function returns the
    /// new object (for the subresource only its status is kept).
    pub(super) fn update(
        &self,
        u: &Update<'_>,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let result = self.try_update(u, change);
        self.refused(
            result,
            u.user,
            u.verb,
            u.resource(),
            format!("{}/{}", u.ns, u.name),
        )
    }

    fn try_update(
        &self,
        u: &Update<'_>,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let &Update {
            kind,
            ns,
            name,
            status,
            user,
            verb,
        } = u;
        let mut store = self.store.lock().unwrap();
        let key = key_of(kind, ns, name);
        let current = store.objects.get(&key).cloned().ok_or_else(|| {
            api_err(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            )
        })?;
        let proposed = change(&current)?;
        if let Some(rv) = rv_of(&proposed) {
            if Some(rv) != rv_of(&current) {
                return Err(api_err(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        kind.plural
                    ),
                ));
            }
        }
        let mut next = current.clone();
        if status {
            next["status"] = proposed["status"].clone();
        } else {
            // Spec and metadata from the request; server-owned fields stay.
            next = proposed;
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "namespace",
                "name",
            ] {
                match current["metadata"].get(f) {
                    Some(v) => next["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = next["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            next["apiVersion"] = current["apiVersion"].clone();
            next["kind"] = current["kind"].clone();
            if kind.status {
                next["status"] = current["status"].clone();
            }
            if kind == SERVICES {
                service::prepare_update(&mut store.node_ports, &current, &mut next)?;
            }
            if next.get("spec") != current.get("spec") {
                let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
                next["metadata"]["generation"] = json!(g + 1);
            }
        }
        if kind == SERVICES && status {
            service::prepare_status_update(self.release, &current, &mut next)?;
        }
        omit_empty_metadata(&mut next);
        next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        store.writes.push(Write {
            user: user.into(),
            verb: verb.into(),
            resource: u.resource(),
            object: format!("{ns}/{name}"),
            about: about(kind, ns, name, &current),
        });
        if next == current {
            return Ok(current); // a no-op write does not bump the version
        }
        Self::bump(&mut store, &mut next);
        let finalizers_empty = next["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if next["metadata"]["deletionTimestamp"].is_string() && finalizers_empty {
            store.objects.remove(&key);
            self.record(&mut store, kind, ns, "DELETED", &next);
        } else {
            store.objects.insert(key, next.clone());
            self.record(&mut store, kind, ns, "MODIFIED", &next);
        }
        Ok(next)
    }

    pub(super) fn delete(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        user: &str,
    ) -> Result<Value, ApiError> {
        let result = self.try_delete(kind, ns, name, user);
        self.refused(
            result,
            user,
            "delete",
            kind.plural.into(),
            format!("{ns}/{name}"),
        )
    }

    fn try_delete(&self, kind: Kind, ns: &str, name: &str, user: &str) -> Result<Value, ApiError> {
        let mut store = self.store.lock().unwrap();
        let key = key_of(kind, ns, name);
        let mut obj = store.objects.get(&key).cloned().ok_or_else(|| {
            api_err(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            )
        })?;
        store.writes.push(Write {
            user: user.into(),
            verb: "delete".into(),
            resource: kind.plural.into(),
            object: format!("{ns}/{name}"),
            about: about(kind, ns, name, &obj),
        });
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if !obj["metadata"]["deletionTimestamp"].is_string() {
                obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                Self::bump(&mut store, &mut obj);
                store.objects.insert(key, obj.clone());
                self.record(&mut store, kind, ns, "MODIFIED", &obj);
            }
        } else {
            store.objects.remove(&key);
            Self::bump(&mut store, &mut obj);
            self.record(&mut store, kind, ns, "DELETED", &obj);
        }
        Ok(obj)
    }

    pub(super) fn list(
        &self,
        kind: Kind,
        ns: Option<&str>,
        selector: Option<&str>,
    ) -> (u64, Vec<Value>) {
        let store = self.store.lock().unwrap();
        let items = store
            .objects
            .iter()
            .filter(|((v, p, n, _), _)| {
                *v == kind.api_version && *p == kind.plural && ns.is_none_or(|ns| ns == n)
            })
            .map(|(_, o)| o.clone())
            .filter(|o| selector.is_none_or(|s| labels_match(o, s)))
            .collect();
        (store.rv, items)
    }
}

/// Metadata lists and maps are `omitempty` in the real server's encoding:
/// an empty one is not stored.
fn omit_empty_metadata(obj: &mut Value) {
    if let Some(meta) = obj["metadata"].as_object_mut() {
        for field in ["finalizers", "labels", "annotations"] {
            let empty = match meta.get(field) {
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                Some(Value::Null) => true,
                _ => false,
            };
            if empty {
                meta.remove(field);
            }
        }
    }
}
