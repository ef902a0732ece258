//! The open-files limit `lbd` runs under, and the connection cap it
//! allows. Raising the soft limit to the hard one is what HAProxy and
//! nginx do at start; the cap comes from what is left once listeners,
//! splice pipes and the control side have their descriptors.

/// Descriptors kept for everything but proxied connections (listening
/// sockets, the control side, health probes, files).
pub const RESERVED: u64 = 256;
/// Below this derived cap `lbd` refuses to start: it could not serve.
pub const MIN_CONNECTIONS: u64 = 64;
/// Below this derived cap `lbd` warns at start.
pub const FEW_CONNECTIONS: u64 = 1024;

/// The open-files limit after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    /// The soft limit in force.
    pub soft: u64,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

/// Raises the open-files soft limit to the hard limit (at most 2^20).
pub fn raise_nofile() -> NoFile {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let Some(soft) = lim.current else {
        return NoFile {
            soft: 1 << 20,
            hard: None,
        };
    };
    let target = lim.maximum.unwrap_or(1 << 20).min(1 << 20);
    let raised = target > soft
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: lim.maximum,
            },
        )
        .is_ok();
    NoFile {
        soft: if raised { target } else { soft },
        hard: lim.maximum,
    }
}

/// The global connection cap, and a warning to log with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Proxied connections (and UDP flows) at once, all listeners.
    pub max: u64,
    /// Why the cap may be a problem, if it may.
    pub warning: Option<String>,
}

/// The cap for `runtime.max_connections = configured` (0: derived from the
/// limit) under `nofile`, with `pipe_fds` descriptors kept for splice
/// pipes. Each proxied connection holds two descriptors. An error when a
/// derived cap is below [`MIN_CONNECTIONS`], saying what to raise.
pub fn connection_cap(configured: u64, nofile: NoFile, pipe_fds: u64) -> Result<Cap, String> {
    let derived = nofile.soft.saturating_sub(RESERVED + pipe_fds) / 2;
    let hard = nofile
        .hard
        .map_or_else(|| "unlimited".to_owned(), |h| h.to_string());
    let why = format!(
        "the open-files limit is {} (hard {hard}); each proxied connection needs two descriptors, and {} are kept for listeners, splice pipes and the control side",
        nofile.soft,
        RESERVED + pipe_fds
    );
    let fix = "raise LimitNOFILE= in the unit (or ulimit -n)";
    if configured > 0 {
        let warning = (configured > derived).then(|| {
            format!("runtime.max_connections = {configured}, but {why}, which leaves room for about {derived}: connects will fail with EMFILE before the cap; {fix}")
        });
        return Ok(Cap {
            max: configured,
            warning,
        });
    }
    if derived < MIN_CONNECTIONS {
        return Err(format!(
            "only {derived} proxied connections would fit: {why}; {fix}, or set runtime.max_connections"
        ));
    }
    let warning = (derived < FEW_CONNECTIONS)
        .then(|| format!("at most {derived} proxied connections at once: {why}; {fix}"));
    Ok(Cap {
        max: derived,
        warning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(soft: u64) -> NoFile {
        NoFile {
            soft,
            hard: Some(soft),
        }
    }

    #[test]
    fn a_derived_cap_below_the_minimum_refuses_to_start() {
        let e = connection_cap(0, limit(256), 0).unwrap_err();
        assert!(e.contains("only 0 proxied connections"), "{e}");
        assert!(e.contains("LimitNOFILE"), "{e}");
        assert!(connection_cap(0, limit(256 + 2 * 63), 0).is_err());
        assert_eq!(connection_cap(0, limit(256 + 2 * 64), 0).unwrap().max, 64);
    }

    #[test]
    fn a_small_derived_cap_warns_and_a_large_one_does_not() {
        let cap = connection_cap(0, limit(1024), 128).unwrap();
        assert_eq!(cap.max, (1024 - 256 - 128) / 2);
        assert!(cap.warning.unwrap().contains("at most 320"));
        let cap = connection_cap(0, limit(1 << 20), 128).unwrap();
        assert_eq!(cap.warning, None);
    }

    #[test]
    fn a_configured_cap_is_kept_and_warns_above_the_limit() {
        let cap = connection_cap(5000, limit(300), 0).unwrap();
        assert_eq!(cap.max, 5000);
        assert!(cap.warning.unwrap().contains("EMFILE"));
        assert_eq!(connection_cap(10, limit(1 << 20), 0).unwrap().warning, None);
    }
}
