//! The dynamic state on disk: `state_dir/state.json`, written atomically
//! (temp file, fsync, rename, fsync of the directory) before an apply is
//! acknowledged, and read at start so `lbd` serves its last state even when
//! no controller is reachable. A file that cannot be used is moved aside,
//! never deleted.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use lb_config::DesiredState;

/// File name inside `state_dir`.
pub const FILE: &str = "state.json";

/// Writes `state` to `dir/state.json` atomically and durably.
pub fn save(dir: &Path, state: &DesiredState) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{FILE}.tmp"));
    // Only lbd's user reads it: it names every backend.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut text = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    text.push(b'\n');
    f.write_all(&text)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(FILE))?;
    File::open(dir)?.sync_all()
}

/// The lock file inside `state_dir`.
pub const LOCK: &str = "lock";
/// How long [`StateLock::take`] waits for a holder that is going away.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// One `lbd` per state directory: an exclusive `flock` on `state_dir/lock`,
/// held while this value lives (the kernel drops it when the process
/// ends, however it ends). The file holds the holder's pid.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] File);

impl StateLock {
    /// Takes the lock on `dir` (created if missing), or says which process
    /// holds it.
    pub fn take(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(LOCK);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        use rustix::fs::{flock, FlockOperation};
        // A holder that is exiting (a restart), or whose descriptor a child
        // process briefly shares between fork and exec, lets go within a
        // moment: wait that long, no more.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let mut locked = flock(&file, FlockOperation::NonBlockingLockExclusive);
        while locked.is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            locked = flock(&file, FlockOperation::NonBlockingLockExclusive);
        }
        if let Err(e) = locked {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "admin.state_dir {} is in use by another lbd{holder}: each lbd needs its own ({e})",
                    dir.display()
                ),
            ));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Self(file))
    }
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
            l2: None,
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

    #[test]
    fn one_lock_holder_per_directory() {
        let dir = std::env::temp_dir().join(format!("weir-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let held = StateLock::take(&dir).unwrap();
        let e = StateLock::take(&dir).unwrap_err().to_string();
        assert!(e.contains("in use by another lbd"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        StateLock::take(&dir).expect("free again once the holder is gone");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_state_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weir-mode-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        save(&dir, &DesiredState::default()).unwrap();
        let mode = fs::metadata(dir.join(FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = fs::remove_dir_all(&dir);
    }
}
