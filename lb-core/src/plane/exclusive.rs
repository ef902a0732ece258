//! Keeping listening ports ours: before a new listener is published, its
//! freshly bound sockets are compared with the kernel's socket table
//! ([`super::owners`]); another process on the same address and port
//! (`SO_REUSEPORT` would let it share the traffic) refuses the apply.

use std::collections::HashSet;
use std::net::SocketAddr;

use lb_config::Protocol;

use super::diff::Diff;
use super::owners;
use super::{ApplyError, Plane, Sockets};
use crate::routing::BindKey;

impl Plane {
    /// Refuses new listeners whose address another process's socket also
    /// receives on (see [`owners`]).
    pub(super) fn check_owners(
        &self,
        diff: &Diff,
        fresh: &[(BindKey, Sockets, SocketAddr)],
    ) -> Result<(), ApplyError> {
        if fresh.is_empty() {
            return Ok(());
        }
        let mut ours: HashSet<u64> = self
            .sockets
            .values()
            .flat_map(|b| b.inodes.iter().copied())
            .chain(self.retired.iter().map(|&(inode, _)| inode))
            .collect();
        for (_, sockets, _) in fresh {
            ours.extend(sockets.inodes());
        }
        let protocols: Vec<Protocol> = [Protocol::Tcp, Protocol::Udp]
            .into_iter()
            .filter(|p| fresh.iter().any(|(k, _, _)| k.protocol == *p))
            .collect();
        let table = match owners::Table::read(&protocols) {
            Ok(t) => t,
            Err(e) => {
                // No socket table (no sock_diag here): nothing to compare.
                tracing::warn!(error = %e, "cannot read the socket table; listeners bound without checking for other holders");
                return Ok(());
            }
        };
        for (key, _, local) in fresh {
            let others = table.others(key.protocol, *local, &ours);
            if others.is_empty() {
                continue;
            }
            let name = diff
                .added
                .iter()
                .find(|l| BindKey::of(l) == *key)
                .map(|l| l.name.clone())
                .unwrap_or_default();
            // A process with several sockets there (one per worker, with
            // SO_REUSEPORT) is named once.
            let mut holders: Vec<String> = Vec::new();
            for h in others {
                let who = format!("{} at {}", owners::describe(&h), h.local);
                if !holders.contains(&who) {
                    holders.push(who);
                }
            }
            let holders = holders.join(", ");
            return Err(ApplyError::Shared {
                name,
                addr: *local,
                holders,
            });
        }
        Ok(())
    }
}
