//! The HTTP surfaces of `lbd`: the metrics endpoint ([`endpoint`]:
//! `/metrics`, `/healthz`, `/readyz` on `admin.metrics`) and the control
//! API ([`control`], on `admin.control_socket` and, with TLS and a token,
//! `admin.control_tcp`), both on one small HTTP server ([`http`]) that
//! bounds what clients can hold. Each surface gets only the handle it
//! needs: the endpoint the metrics and readiness, the control API the
//! [`control::ControlApi`] a running server implements.

pub mod control;
pub mod endpoint;
pub mod http;
pub mod tls;
