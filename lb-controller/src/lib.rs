//! `lb-controller`: the Kubernetes side of Weir.
//!
//! This version holds the pure IP address manager ([`ipam`]): pools,
//! requested addresses, dual-stack, sharing, reseeding from Service status.
//! It makes no API calls. The reconciler, translation to listeners,
//! publishing to forwarders and leader election build on it.

#![forbid(unsafe_code)]

pub mod ipam;
