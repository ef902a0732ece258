//! systemd readiness notifications (`sd_notify`), without libsystemd: one
//! datagram to `$NOTIFY_SOCKET` per state change. A no-op when not under
//! systemd.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `RELOADING=1` with the monotonic timestamp systemd's notify-reload expects.
pub fn reloading() {
    let ts = monotonic_usec();
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={ts}"));
}

fn monotonic_usec() -> u128 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u128 * 1_000_000 + ts.tv_nsec as u128 / 1_000
}
