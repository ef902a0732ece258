//! The `lb-controller` TOML file: its spec as written (`file`), the
//! resolved, validated configuration (`resolved`), and label selectors
//! (`selector`). Errors carry field paths and lines, like `lbd`'s.

mod file;
mod resolved;
mod selector;

use std::path::Path;

use lb_config::ConfigErrors;

pub use file::FileSpec;
pub use resolved::{ClusterHealth, Config, Forwarder, ForwarderTarget, L2Settings, LeaderElection};
pub use selector::{parse_selector, Requirement};

/// Parses and validates the text of a controller configuration file.
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let mut config = lb_config::parse_toml(text, FileSpec::resolve)?;
    lb_config::place_lines(text, &mut config.warnings);
    Ok(config)
}

/// Reads and validates a controller configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(&lb_config::read_file(path)?)
}
