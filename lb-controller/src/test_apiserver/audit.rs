//! The audit log: every write that reached storage (no-ops included, as
//! a real audit log counts them) and every refused one, with the caller.

use serde_json::Value;

use super::kinds::{Kind, CORE_EVENTS, EVENTS};

/// A write that reached storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The bearer token that made it (empty if none).
    pub user: String,
    /// `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// Plural resource (with `/status` for the subresource).
    pub resource: String,
    /// Namespace/name.
    pub object: String,
    /// Namespace/name of the object the write is about: for an Event the
    /// object it regards, otherwise `object`.
    pub about: String,
}

/// A write the server refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The bearer token that asked (empty if none).
    pub user: String,
    /// `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// Plural resource (with `/status` for the subresource).
    pub resource: String,
    /// Namespace/name.
    pub object: String,
    /// The HTTP status of the refusal (409 for a stale resourceVersion).
    pub code: u16,
}

/// The object a write is about, `namespace/name`: an Event's is the object
/// it regards; any other object's is itself.
pub(super) fn about(kind: Kind, ns: &str, name: &str, obj: &Value) -> String {
    let regarding = match kind {
        EVENTS => &obj["regarding"],
        CORE_EVENTS => &obj["involvedObject"],
        _ => return format!("{ns}/{name}"),
    };
    format!(
        "{}/{}",
        regarding["namespace"].as_str().unwrap_or(ns),
        regarding["name"].as_str().unwrap_or_default()
    )
}
