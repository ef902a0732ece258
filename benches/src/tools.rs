//! Wrappers of the external load tools: wrk (HTTP requests and new
//! connections) and iperf3 (bulk TCP). Each runs its tool once against one
//! target and reads the figures from what the tool prints. Which scenario
//! runs them, how often and on which side, is `scenarios`'s; the clients no
//! Debian package provides (UDP, fixed-rate latency) are in `load`.

use std::net::SocketAddr;
use std::process::Command;

/// Requests (or connections, with `close`) per second, and how many were
/// completed.
pub fn wrk(target: SocketAddr, seconds: u64, close: bool) -> anyhow::Result<(f64, f64)> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c64", &format!("-d{seconds}s")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(format!("http://{target}/")).output()?;
    wrk_figures(&String::from_utf8_lossy(&out.stdout))
}

/// The rate and the count of completed requests in wrk's report.
fn wrk_figures(text: &str) -> anyhow::Result<(f64, f64)> {
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:").map(str::trim))
        .ok_or_else(|| anyhow::anyhow!("wrk printed no rate: {text}"))?
        .parse::<f64>()?;
    let done = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n))
        .ok_or_else(|| anyhow::anyhow!("wrk printed no request count: {text}"))?
        .parse::<f64>()?;
    Ok((rate, done))
}

/// Gbit/s and bytes received through `target` with `streams` parallel streams.
pub fn iperf(target: SocketAddr, seconds: u64, streams: usize) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("iperf3")
        .args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("iperf3: {}", v["error"]))?;
    Ok((bps / 1e9, sum["bytes"].as_f64().unwrap_or(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1's report: the count comes from "N requests in", the rate
    /// from "Requests/sec:"; a report without them is an error.
    #[test]
    fn wrk_report_gives_rate_and_count() {
        let report = "Running 5s test @ http://127.0.0.1:20080/\n  1 threads and 64 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency   561.36us  132.26us   4.11ms   87.51%\n\
            \x20 584321 requests in 5.00s, 85.26MB read\n\
            Requests/sec: 116853.41\nTransfer/sec:     17.05MB\n";
        assert_eq!(wrk_figures(report).unwrap(), (116853.41, 584321.0));
        assert!(wrk_figures("Requests/sec: 5\n").is_err());
        assert!(wrk_figures("unable to connect to 127.0.0.1:20080\n").is_err());
    }
}
