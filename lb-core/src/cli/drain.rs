//! `lbd drain` and `lbd undrain`: planned maintenance of a running `lbd`
//! through the control API (`POST` and `DELETE /v1/drain`).

use super::{block_on, say, Remote};

/// Drains (`start`) or undrains the `lbd` that `remote` names.
pub fn drain(remote: &Remote, start: bool) -> anyhow::Result<()> {
    let target = remote.target()?;
    let answer = block_on(lb_api::client::drain(&target, start))??;
    if !start {
        say("undrained: ready, listeners accepting, VIPs announced as their health says\n");
    } else if answer.withdrawn > 0 {
        say(&format!(
            "draining: not ready; {} VIPs withdrawn; listeners close in {:.1}s, then connections finish (`lbd status` shows the phase; `lbd undrain` reverts)\n",
            answer.withdrawn,
            answer.grace_ms as f64 / 1000.0
        ));
    } else {
        say("draining: not ready; no VIP was announced; listeners closing, then connections finish (`lbd status` shows the phase; `lbd undrain` reverts)\n");
    }
    Ok(())
}
