//! The dynamic state on disk: `state_dir/state.json`, written atomically
//! (temp file, fsync, rename, fsync of the directory) before an apply is
//! acknowledged, and read at start so `lbd` serves its last state even when
//! no controller is reachable. A file that cannot be used is moved aside,
//! never deleted.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use lb_config::DesiredState;

/// File name inside `state_dir`.
pub const FILE: &str = "state.json";

/// Writes `state` to `dir/state.json` atomically and durably.
pub fn save(dir: &Path, state: &DesiredState) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    let mut text = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    text.push(b'\n');
    f.write_all(&text)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(FILE))?;
    File::open(dir)?.sync_all()
}

/// What was found at start.
#[derive(Debug)]
pub enum Loaded {
    /// No state file: start with static listeners only.
    Missing,
    /// A parsed state (still to be validated by the caller).
    Found(DesiredState),
    /// The file was unreadable or corrupt and was renamed to `to`.
    MovedAside {
        /// The new name.
        to: PathBuf,
        /// Why it could not be used.
        reason: String,
    },
}

/// Reads `dir/state.json`.
pub fn load(dir: &Path) -> Loaded {
    let path = dir.join(FILE);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return move_aside(dir, format!("unreadable: {e}")),
    };
    match serde_json::from_slice(&text) {
        Ok(state) => Loaded::Found(state),
        Err(e) => move_aside(dir, format!("corrupt: {e}")),
    }
}

/// Renames `dir/state.json` to `dir/state.json.bad-<unix seconds>`.
pub fn move_aside(dir: &Path, reason: String) -> Loaded {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let to = dir.join(format!("{FILE}.bad-{secs}"));
    match fs::rename(dir.join(FILE), &to) {
        Ok(()) => Loaded::MovedAside { to, reason },
        Err(e) => Loaded::MovedAside {
            to: dir.join(FILE),
            reason: format!("{reason}; could not move it aside: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_move_aside() {
        let dir = std::env::temp_dir().join(format!("weir-persist-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert!(matches!(load(&dir), Loaded::Missing));
        let state = DesiredState {
            version: 7,
            listeners: Vec::new(),
        };
        save(&dir, &state).unwrap();
        match load(&dir) {
            Loaded::Found(s) => assert_eq!(s, state),
            other => panic!("{other:?}"),
        }
        fs::write(dir.join(FILE), b"{not json").unwrap();
        match load(&dir) {
            Loaded::MovedAside { to, reason } => {
                assert!(reason.contains("corrupt"), "{reason}");
                assert_eq!(fs::read(&to).unwrap(), b"{not json", "kept, not deleted");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(load(&dir), Loaded::Missing));
        let _ = fs::remove_dir_all(&dir);
    }
}
