//! Where listeners come from: the configuration file (static) and the
//! control API (dynamic). Pure: what a new file or a new state means for
//! the set in force, without applying anything.

use lb_config::{Config, DesiredState, FieldError, Listener};

use crate::admin::control::PutError;

/// Static listeners (the file) and dynamic ones (the control API).
#[derive(Debug)]
pub struct Sources {
    /// The file in force.
    pub file: Config,
    /// The dynamic state in force (version 0 before any).
    pub dynamic: DesiredState,
    /// `dynamic`'s listeners, resolved against the file's defaults.
    pub dynamic_listeners: Vec<Listener>,
}

/// What a `PUT /v1/state` comes to, before anything is applied.
#[derive(Debug)]
pub enum Admitted {
    /// The state in force again: nothing to do.
    Same(u64),
    /// A new state, resolved: its listeners.
    New(Vec<Listener>),
}

impl Sources {
    /// The file's listeners and no dynamic state.
    pub fn new(file: Config) -> Self {
        Self {
            file,
            dynamic: DesiredState::default(),
            dynamic_listeners: Vec::new(),
        }
    }

    /// Every listener: the file's, then the dynamic ones.
    pub fn all(&self, dynamic: &[Listener]) -> Vec<Listener> {
        self.file.listeners.iter().chain(dynamic).cloned().collect()
    }

    /// Whether `state` may replace the dynamic state in force: a stale
    /// version (or the same version with other content) is a conflict;
    /// invalid content names every field.
    pub fn admit(&self, state: &DesiredState) -> Result<Admitted, PutError> {
        if state.version > lb_config::MAX_VERSION {
            // Accepted, it would hold every later state off with 409s,
            // across restarts.
            return Err(PutError::Invalid(vec![FieldError::new(
                "version",
                format!(
                    "{} is above {} (2^53 - 1, the largest integer every JSON reader holds exactly)",
                    state.version,
                    lb_config::MAX_VERSION
                ),
            )]));
        }
        let current = self.dynamic.version;
        if state.version < current || (state.version == current && *state != self.dynamic) {
            return Err(PutError::Conflict { current });
        }
        if state.version == current {
            return Ok(Admitted::Same(current));
        }
        self.resolve_dynamic(state)
            .map(Admitted::New)
            .map_err(PutError::Invalid)
    }

    /// Resolves a dynamic state against the file's defaults and checks it
    /// against the file's listeners; its L2 owner map must be valid too.
    pub fn resolve_dynamic(&self, state: &DesiredState) -> Result<Vec<Listener>, Vec<FieldError>> {
        let owners = state.l2.as_ref().map(lb_config::l2::validate);
        let listeners =
            lb_config::resolve_listeners(&state.listeners, &self.file.defaults, "listeners")
                .map_err(|mut errors| {
                    errors.extend(owners.clone().unwrap_or_default());
                    errors
                })?;
        let mut problems = collisions(&self.file.listeners, &listeners, true);
        problems.extend(owners.unwrap_or_default());
        if problems.is_empty() {
            let unused = lb_config::unused_check_settings(
                &state.listeners,
                &self.file.defaults,
                "listeners",
            );
            for w in &unused {
                tracing::warn!(version = state.version, "dynamic state: {w}");
            }
            Ok(listeners)
        } else {
            Err(problems)
        }
    }

    /// Checks a new file against the dynamic listeners in force.
    pub fn check_file(&self, file: &Config) -> Result<(), Vec<FieldError>> {
        let clash = collisions(&file.listeners, &self.dynamic_listeners, false);
        if clash.is_empty() {
            Ok(())
        } else {
            Err(clash)
        }
    }
}

/// Names and binds that a static and a dynamic listener share. Paths are
/// on the `side` being changed: `listeners[i]` for an API state,
/// `listener[i]` for a file.
fn collisions(file: &[Listener], dynamic: &[Listener], blame_dynamic: bool) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (i, d) in dynamic.iter().enumerate() {
        for (j, f) in file.iter().enumerate() {
            let (path, other) = if blame_dynamic {
                (
                    format!("listeners[{i}]"),
                    format!(
                        "the static listener[{j}] ({:?}) of the configuration file",
                        f.name
                    ),
                )
            } else {
                (
                    format!("listener[{j}]"),
                    format!(
                        "the dynamic listeners[{i}] ({:?}) set through the control API",
                        d.name
                    ),
                )
            };
            if d.name == f.name {
                out.push(FieldError::new(
                    format!("{path}.name"),
                    format!("{:?} is already the name of {other}", d.name),
                ));
            }
            if d.bind == f.bind && d.protocol == f.protocol {
                out.push(FieldError::new(
                    format!("{path}.bind"),
                    format!("{} is already bound by {other}", d.bind),
                ));
            }
        }
    }
    out
}
