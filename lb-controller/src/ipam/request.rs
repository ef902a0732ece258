//! What a Service asks of the allocator: its key, families, requested
//! addresses, pool, sharing key and ports.

use std::fmt;
use std::net::IpAddr;

use super::pool::Family;

/// A Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service port's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (reserved: forwarders do not carry it, but it still occupies the port).
    Sctp,
}

/// The families a Service asks for (`ipFamilies` + `ipFamilyPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyPolicy {
    /// One address of this family.
    Single(Family),
    /// Both families if possible, else the primary one (or the other).
    PreferDual(Family),
    /// Both families, or nothing.
    RequireDual(Family),
}

impl FamilyPolicy {
    pub(super) fn families(self) -> Vec<Family> {
        let other = |f| {
            if f == Family::V4 {
                Family::V6
            } else {
                Family::V4
            }
        };
        match self {
            FamilyPolicy::Single(f) => vec![f],
            FamilyPolicy::PreferDual(f) | FamilyPolicy::RequireDual(f) => vec![f, other(f)],
        }
    }
}

/// What a Service asks of the allocator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Families wanted.
    pub policy: FamilyPolicy,
    /// Specific addresses (`weir.dev/load-balancer-ips` or `spec.loadBalancerIP`).
    pub addresses: Vec<IpAddr>,
    /// `weir.dev/pool`: only this pool.
    pub pool: Option<String>,
    /// `weir.dev/allow-shared-ip`.
    pub sharing_key: Option<String>,
    /// The Service's (port, protocol) pairs.
    pub ports: Vec<(u16, Proto)>,
}
