//! Accepting again after [`Plane::stop_accepting`] (`lbd undrain`): every
//! listener whose accept loops were stopped gets fresh sockets on the
//! address it had (the same port, when it was chosen at bind), handed to
//! the workers as at an apply. Routes, handles and counters stay as they
//! are.

use lb_config::Protocol;

use super::{bind_tcp, bind_udp, ApplyError, Plane, Sockets};
use crate::routing::BindKey;

impl Plane {
    /// Binds and serves again every listener that stopped accepting. A
    /// listener that cannot be bound again is reported; the others serve.
    pub fn resume_accepting(&mut self) -> Result<usize, ApplyError> {
        let mut resumed = 0;
        let mut first_error = None;
        let stopped: Vec<(BindKey, std::net::SocketAddr, String)> = self
            .listeners
            .iter()
            .filter_map(|l| {
                let key = BindKey::of(l);
                let bound = self.sockets.get(&key)?;
                (*bound.stop.borrow()).then(|| (key, bound.local, l.name.clone()))
            })
            .collect();
        let now = std::time::Instant::now();
        for (key, local, name) in stopped {
            let workers = self.workers.len();
            let bound = match key.protocol {
                Protocol::Tcp => bind_tcp(local, workers).map(|(s, a)| (Sockets::Tcp(s), a)),
                Protocol::Udp => bind_udp(local, workers).map(|(s, a)| (Sockets::Udp(s), a)),
            };
            match bound {
                Ok((sockets, local)) => {
                    if let Some(old) = self.sockets.remove(&key) {
                        self.retired.extend(old.inodes.iter().map(|&i| (i, now)));
                    }
                    self.listen(key, sockets, local);
                    resumed += 1;
                }
                Err(error) => {
                    tracing::error!(listener = %name, addr = %local, %error, "cannot bind again");
                    first_error.get_or_insert(ApplyError::Bind {
                        name,
                        addr: local,
                        error,
                    });
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(resumed),
        }
    }
}
