//! Errors as the API server answers them: a `Status` object with a code
//! and a reason.

use hyper::StatusCode;
use serde_json::{json, Value};

/// Errors in the shape of a `Status`.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) code: StatusCode,
    reason: &'static str,
    message: String,
}

pub(super) fn api_err(
    code: StatusCode,
    reason: &'static str,
    message: impl Into<String>,
) -> ApiError {
    ApiError {
        code,
        reason,
        message: message.into(),
    }
}

impl ApiError {
    pub(super) fn message(&self) -> &str {
        &self.message
    }

    pub(super) fn body(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code.as_u16()})
    }
}
