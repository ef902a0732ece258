//! Events on Services, recorded in the background: a reconcile never waits
//! for one, and a failure to record one is only logged.

use k8s_openapi::api::core::v1::Service;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use crate::desired::key_of;

/// The field manager / Event reporter name.
pub const MANAGER: &str = "weir-lb-controller";

/// Records Events as this replica.
#[derive(Clone)]
pub(super) struct Events {
    recorder: Recorder,
}

impl Events {
    /// Events reported by `identity`.
    pub(super) fn new(client: Client, identity: &str) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(identity.to_owned()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Records an Event on `svc` (its note cut at 1,000 characters).
    pub(super) fn publish(&self, svc: &Service, type_: EventType, reason: &str, note: String) {
        let recorder = self.recorder.clone();
        let reference = svc.object_ref(&());
        let reason = reason.to_owned();
        tracing::info!(service = %key_of(svc), %reason, %note, "event");
        tokio::spawn(async move {
            let ev = Event {
                type_,
                reason: reason.clone(),
                note: Some(note.chars().take(1000).collect()),
                action: reason,
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!(error = %e, "cannot record event");
            }
        });
    }
}
