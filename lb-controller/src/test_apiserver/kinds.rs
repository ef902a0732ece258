//! The resource types the server knows, how objects are keyed, and the
//! release whose behaviour it copies.

/// A resource type the server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// Plural resource name.
    pub plural: &'static str,
    /// `v1` or `group/version`.
    pub api_version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Has a `status` subresource.
    pub status: bool,
}

pub const SERVICES: Kind = Kind {
    plural: "services",
    api_version: "v1",
    kind: "Service",
    namespaced: true,
    status: true,
};
pub const NODES: Kind = Kind {
    plural: "nodes",
    api_version: "v1",
    kind: "Node",
    namespaced: false,
    status: true,
};
pub const SLICES: Kind = Kind {
    plural: "endpointslices",
    api_version: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    namespaced: true,
    status: false,
};
pub const EVENTS: Kind = Kind {
    plural: "events",
    api_version: "events.k8s.io/v1",
    kind: "Event",
    namespaced: true,
    status: false,
};
pub const CORE_EVENTS: Kind = Kind {
    plural: "events",
    api_version: "v1",
    kind: "Event",
    namespaced: true,
    status: false,
};
pub const LEASES: Kind = Kind {
    plural: "leases",
    api_version: "coordination.k8s.io/v1",
    kind: "Lease",
    namespaced: true,
    status: false,
};
pub const NAMESPACES: Kind = Kind {
    plural: "namespaces",
    api_version: "v1",
    kind: "Namespace",
    namespaced: false,
    status: true,
};
pub(super) const KINDS: [Kind; 7] = [
    SERVICES,
    NODES,
    SLICES,
    EVENTS,
    CORE_EVENTS,
    LEASES,
    NAMESPACES,
];

pub(super) type ObjKey = (&'static str, &'static str, String, String);

pub(super) fn key_of(kind: Kind, ns: &str, name: &str) -> ObjKey {
    (
        kind.api_version,
        kind.plural,
        ns.to_owned(),
        name.to_owned(),
    )
}

/// The Kubernetes release whose behaviour the server copies where releases
/// differ in what the controller sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Release {
    /// 1.28: `ipMode` is an unknown field, dropped with a `Warning` header
    /// (or refused with 400 under `fieldValidation=Strict`).
    V1_28,
    /// 1.29 with its default feature gates (LoadBalancerIPMode off):
    /// `ipMode` is dropped unless the stored status already uses it.
    V1_29,
    /// 1.30 and later: `ipMode` is kept.
    #[default]
    V1_30,
}
