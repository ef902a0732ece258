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
    let state: lb_config::DesiredState = if is_json {
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON state", file.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{}: not a TOML state", file.display()))?
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
