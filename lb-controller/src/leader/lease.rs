//! Where the Lease is kept: the [`LeaseStore`] the elector reads and
//! writes, and [`ApiLease`], the one in the API server.

use std::future::Future;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};

/// The answer to a write of the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Stored.
    Stored,
    /// Someone else wrote first (`409 Conflict`).
    Conflict,
}

/// Where one Lease is kept.
pub trait LeaseStore: Send + Sync {
    /// The Lease, if it exists.
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, kube::Error>> + Send;
    /// Creates it.
    fn create(&self, lease: Lease) -> impl Future<Output = Result<Written, kube::Error>> + Send;
    /// Replaces it; `lease` carries the `resourceVersion` it was read at.
    fn replace(&self, lease: Lease) -> impl Future<Output = Result<Written, kube::Error>> + Send;
}

/// The Lease `name` in the API server.
#[derive(Clone)]
pub struct ApiLease {
    api: Api<Lease>,
    name: String,
}

impl ApiLease {
    /// The Lease `namespace/name`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
        }
    }
}

fn written(result: Result<Lease, kube::Error>) -> Result<Written, kube::Error> {
    match result {
        Ok(_) => Ok(Written::Stored),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Written::Conflict),
        Err(e) => Err(e),
    }
}

impl LeaseStore for ApiLease {
    async fn get(&self) -> Result<Option<Lease>, kube::Error> {
        self.api.get_opt(&self.name).await
    }

    async fn create(&self, lease: Lease) -> Result<Written, kube::Error> {
        written(self.api.create(&PostParams::default(), &lease).await)
    }

    async fn replace(&self, lease: Lease) -> Result<Written, kube::Error> {
        written(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }
}
