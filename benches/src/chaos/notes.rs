//! The notes under the chaos table: how each scenario is set up and
//! measured, so a row can be read without the source.

use super::plan::{Plan, REQUEST_TIMEOUT};

/// One note per scenario, plus the load and the backends.
pub fn notes(plan: &Plan) -> Vec<String> {
    vec![
        format!(
            "Steady load: {} threads, {:.0} new connections/s in all, one HTTP/1.1 request per \
             connection (`Connection: close`), each request failed unless answered whole with a \
             200 within {} s. Failure kinds: refused (connect refused), connect timeout, reset, \
             closed early (end of stream before the whole answer), no answer in time, non-200. \
             Backends: small HTTP servers in `lb-bench` on 127.0.0.2-4 (thread per connection, \
             answer at once). lbd: the release binary, `--engine` as the row says, `--workers {}`.",
            plan.concurrency,
            plan.rate,
            REQUEST_TIMEOUT.as_secs(),
            plan.workers
        ),
        "Health checks on every TCP listener: HTTP `GET /healthz` every 1 s, 500 ms timeout, \
         rise 2, fall 3; `connect_timeout = \"1s\"`. A failed connect counts against the backend \
         (passive health) and lbd retries it on another backend."
            .into(),
        "Applies and SIGHUPs alternate two configurations: A (weights 1/1/1 and a second \
         listener on one backend) and B (weights 2/1/1, no second listener). Each apply waits \
         for its 200; each SIGHUP waits until `GET /v1/status` shows a new generation (the file \
         is replaced atomically before the signal)."
            .into(),
        "Backend faults: one lbd, three backends; the faulted one is a child process \
         (`lb-bench chaos-backend`) in a network namespace of its own behind a veth pair, lbd and \
         the clients in another (`weir-chaos-lb`, `weir-chaos-backend`). Killed = SIGKILL, \
         frozen = SIGSTOP (its kernel still completes handshakes), black-holed = \
         `iptables -j DROP` of TCP in its namespace (or its veth end set down). Time to \
         ejection: from the fault to `healthy: false` in `GET /v1/status` (polled every 5 ms). \
         Failures are split by the request's start: before the ejection, after it, after healing."
            .into(),
        format!(
            "Descriptor exhaustion: lbd under `prlimit --nofile={n}:{n}`, clients open {} \
             keep-alive connections through it (one answered request each) on top of the steady \
             load, hold them for a settle period, then close them all. Refusals by reason are \
             lbd's `weir_connections_rejected_total`; 'service back' is the time from closing \
             them to the first answered request on a new connection.",
            plan.nofile as usize * 3 / 5,
            n = plan.nofile
        ),
        format!(
            "Control clients: {} connections on the unix socket and {} on the TLS port (from 50 \
             source addresses, 127.0.2.1-50), half idle, half trickling a request head (unix) or \
             a TLS handshake record announcing 16,000 bytes (TLS) at 1 byte per 100 ms; a \
             connection lbd closes is opened again. Meanwhile one authorised client sends \
             `GET /v1/status` every 100 ms on each surface (unix: `lbd status`, a process of its own \
             as an operator's, its start included in the time; TLS: the bearer token, a new \
             connection and handshake each time) for {} s.",
            plan.control_clients, plan.control_clients, plan.control_seconds
        ),
        "UDP flood: one datagram from each new source address and port, as fast as one thread \
         binds sockets; flow cap = the listener's `max_connections`, flows idle out after 3 s. \
         Memory is lbd's RSS from /proc."
            .into(),
        "kill -9: the listener under load exists only in the dynamic state (one PUT before the \
         first kill); lbd is restarted at once with the same file and state_dir. Outage: the \
         longest time between two answered requests (their ends) from the kill to the restarted \
         lbd's readiness; its failures are the requests that ended within it."
            .into(),
    ]
}
