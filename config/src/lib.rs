//! `lb-config`: Weir's shared vocabulary.
//!
//! The listener model (`Listener`, `Backend`, `HealthCheck`, ...), its TOML
//! file form and its JSON control-API form, and validation that reports every
//! error with its field path (and line, for files). Pure: no sockets, no
//! clock, no async runtime.

#![forbid(unsafe_code)]

pub mod announce;
mod duration;
mod file;
mod json;
pub mod l2;
pub mod model;
pub mod validate;

use std::fmt;

pub use announce::{Announce, AnnounceMode, AnnounceSpec, AnnounceWhen};
pub use duration::{Duration, DurationError};
pub use file::{parse_config, parse_config_warned, parse_toml, place_lines};
pub use json::parse_json;
pub use l2::{L2State, VipOwner};
pub use model::*;
pub use validate::{binds_overlap, resolve_listeners, unused_check_settings, DEFAULT_METRICS};

/// One problem in a configuration or state, named by its field path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldError {
    /// Dotted path such as `listener[2].backends[0].addr`; empty for syntax errors.
    pub path: String,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
    /// 1-based line in the file, when the input was a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

impl FieldError {
    /// An error at `path` with no line yet.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            line: None,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Longest part of a value an error message repeats back.
const SHOWN: usize = 64;

/// `value` as an error message quotes it: debug-escaped, and cut after
/// [`SHOWN`] characters (with its full length), so a huge value in a
/// request or file does not come back at full size.
pub fn shown(value: &str) -> String {
    if value.chars().count() <= SHOWN {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(SHOWN).collect();
    format!("{head:?}... ({} bytes)", value.len())
}

/// Every error found in one input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads and validates an `lbd` file from disk.
pub fn load_config(path: &std::path::Path) -> Result<Config, ConfigErrors> {
    parse_config(&read_file(path)?)
}

/// [`load_config`], with the file's warnings ([`parse_config_warned`]).
pub fn load_config_warned(
    path: &std::path::Path,
) -> Result<(Config, Vec<FieldError>), ConfigErrors> {
    parse_config_warned(&read_file(path)?)
}

/// Largest configuration file read (a file of 2,000 listeners is about
/// 1 MiB).
pub const MAX_FILE: u64 = 16 << 20;

/// Reads a configuration file, or says which one could not be read: it must
/// be a regular file of at most [`MAX_FILE`] bytes of UTF-8 (a device such
/// as `/dev/zero` would otherwise be read until memory runs out).
pub fn read_file(path: &std::path::Path) -> Result<String, ConfigErrors> {
    use std::io::Read;
    let fail = |why: String| ConfigErrors(vec![FieldError::new("", why)]);
    let file = std::fs::File::open(path)
        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(fail(format!("{} is not a regular file", path.display())));
    }
    let mut text = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_FILE {
        return Err(fail(format!(
            "{} is larger than {MAX_FILE} bytes",
            path.display()
        )));
    }
    String::from_utf8(text).map_err(|e| fail(format!("{}: not UTF-8: {e}", path.display())))
}
