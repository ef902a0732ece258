//! `lbd apply FILE`: push a dynamic state (TOML or JSON) to a running
//! `lbd` by hand.

use anyhow::Context;
use lb_api::client::PutOutcome;

use super::{block_on, say, Output, Remote};

/// Pushes the state in `file` to the `lbd` that `remote` names.
pub fn apply(file: &std::path::Path, remote: &Remote, output: Output) -> anyhow::Result<()> {
    let target = remote.target()?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let is_json =
        file.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    // Both forms name the field of the first error (TOML also its line),
    // as the control API and `check-config` do.
    let state: lb_config::DesiredState = if is_json {
        lb_config::parse_json(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: not a JSON state: {e}", file.display()))?
    } else {
        lb_config::parse_toml(&text, |s: &lb_config::DesiredState| Ok(s.clone()))
            .map_err(|e| anyhow::anyhow!("{}: not a TOML state: {e}", file.display()))?
    };
    let outcome = block_on(lb_api::client::put_state(&target, &state))??;
    if output == Output::Json {
        let (ok, body) = match &outcome {
            PutOutcome::Applied(v) => (true, serde_json::json!({ "version": v })),
            PutOutcome::Conflict(v) => (false, serde_json::json!({ "current_version": v })),
            PutOutcome::Rejected(errors) => (false, serde_json::json!({ "errors": errors })),
            PutOutcome::Failed { message, .. } => (false, serde_json::json!({ "error": message })),
        };
        say(&format!("{}\n", serde_json::to_string_pretty(&body)?));
        if ok {
            return Ok(());
        }
        anyhow::bail!("lbd refused the state");
    }
    match outcome {
        PutOutcome::Applied(version) => {
            say(&format!("applied version {version}\n"));
            Ok(())
        }
        PutOutcome::Conflict(current) => anyhow::bail!(
            "version {} refused: lbd runs version {current} (a state's version must be above it, or equal with the same content)",
            state.version
        ),
        PutOutcome::Rejected(errors) => {
            for e in &errors {
                eprintln!("{}: {}: {}", file.display(), e.path, e.message);
            }
            anyhow::bail!("state rejected; lbd keeps running its current state")
        }
        PutOutcome::Failed { code, message } => anyhow::bail!("lbd answered {code}: {message}"),
    }
}
