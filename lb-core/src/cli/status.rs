//! `lbd status`: listeners and backends of a running `lbd`, as a table for
//! people or JSON for scripts.

use lb_api::wire::{AnnounceStatus, Status};

use super::{block_on, say, Output, Remote};

/// Prints the status of the `lbd` that `remote` names.
pub fn status(remote: &Remote, output: Output) -> anyhow::Result<()> {
    let target = remote.target()?;
    let st = block_on(lb_api::client::status(&target))??;
    match output {
        Output::Json => say(&format!("{}\n", serde_json::to_string_pretty(&st)?)),
        Output::Table => say(&render_status(&st)),
    }
    Ok(())
}

fn render_announce(out: &mut String, a: &AnnounceStatus) {
    use std::fmt::Write;
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "announce {} on {} ({}): {} of {} VIPs announced",
        a.mode,
        a.interface,
        a.kind,
        a.vips.iter().filter(|v| v.announced).count(),
        a.vips.len()
    );
    let _ = writeln!(
        out,
        "  {:<40} {:<10} {:>9}  WHY NOT",
        "VIP", "ANNOUNCED", "FOR"
    );
    for v in &a.vips {
        let _ = writeln!(
            out,
            "  {:<40} {:<10} {:>8.1}s  {}",
            v.vip.to_string(),
            if v.announced { "yes" } else { "no" },
            v.for_ms as f64 / 1000.0,
            why_not(v)
        );
    }
}

/// Why a VIP is not announced, with its L2 owner when another one has it.
fn why_not(v: &lb_api::wire::VipStatus) -> String {
    let reason = v.reason.as_deref().unwrap_or("-");
    match (&v.owner, v.epoch) {
        (Some(owner), Some(epoch)) if reason == "not_owner" => {
            format!("not_owner ({owner} owns it, epoch {epoch})")
        }
        _ => reason.to_owned(),
    }
}

fn render_status(st: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "engine {}, {} workers, config generation {}, dynamic state version {}",
        st.engine, st.workers, st.generation, st.dynamic_version
    );
    if let Some(phase) = st.drain {
        let _ = writeln!(
            out,
            "DRAINING ({}): not ready; `lbd undrain` serves again",
            phase.name()
        );
    }
    if let Some(a) = &st.announce {
        render_announce(&mut out, a);
    }
    if st.listeners.is_empty() {
        let _ = writeln!(out, "no listeners");
    }
    for l in &st.listeners {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<32} {:<24} {:<5} {:>8} {:>10}",
            "LISTENER", "BIND", "PROTO", "ACTIVE", "ACCEPTED"
        );
        let proto = format!("{:?}", l.protocol).to_lowercase();
        let _ = writeln!(
            out,
            "{:<32} {:<24} {:<5} {:>8} {:>10}",
            l.name,
            l.bind.to_string(),
            proto,
            l.active,
            l.accepted
        );
        let _ = writeln!(
            out,
            "  {:<30} {:<9} {:>8} {:>6}  LAST CHECK ERROR",
            "BACKEND", "HEALTH", "ACTIVE", "WEIGHT"
        );
        for b in &l.backends {
            let health = match (b.draining, b.healthy) {
                (true, _) => "draining",
                (false, true) => "up",
                (false, false) => "down",
            };
            let err = b.last_error.as_deref().unwrap_or("-");
            let _ = writeln!(
                out,
                "  {:<30} {:<9} {:>8} {:>6}  {}",
                b.addr.to_string(),
                health,
                b.active,
                b.weight,
                err
            );
        }
    }
    out
}
