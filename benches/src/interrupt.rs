//! What a stopped run leaves behind. Each peer runs in its own process
//! group, so neither Ctrl-C at the terminal nor a `kill` of `lb-bench`
//! reaches it: without this, nginx, HAProxy and the backends would go on
//! serving the benchmark's ports, and the namespaces of `--setup netns`
//! would stay. On SIGINT, SIGTERM or SIGHUP, [`install`]'s thread stops
//! every tracked process group, removes the tracked namespaces, and exits
//! with 128 + the signal's number, as a shell reports a signalled command.
//! (SIGKILL leaves them, as it must; the next run refuses ports still held
//! and removes namespaces left behind.)

use std::sync::{Mutex, MutexGuard};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// What a signal must clean up.
struct Leftovers {
    /// Process group ids of the running peers.
    groups: Vec<u32>,
    /// Namespaces the run created.
    namespaces: Vec<String>,
    /// A signal is being handled: nothing new may start.
    stopping: bool,
}

impl Leftovers {
    const fn new() -> Self {
        Self {
            groups: Vec::new(),
            namespaces: Vec::new(),
            stopping: false,
        }
    }
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers::new());

fn lock(l: &Mutex<Leftovers>) -> MutexGuard<'_, Leftovers> {
    // The lists stay valid whatever panicked while holding the lock.
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tracks the process group `pgid` until [`untrack_group`]. False when a
/// signal is already being handled: the caller then stops the group itself.
pub fn track_group(pgid: u32) -> bool {
    track_in(&LEFTOVERS, pgid)
}

fn track_in(leftovers: &Mutex<Leftovers>, pgid: u32) -> bool {
    let mut l = lock(leftovers);
    if !l.stopping {
        l.groups.push(pgid);
    }
    !l.stopping
}

pub fn untrack_group(pgid: u32) {
    lock(&LEFTOVERS).groups.retain(|&g| g != pgid);
}

/// Tracks namespaces about to be created, until [`untrack_namespaces`].
pub fn track_namespaces(names: &[String]) {
    lock(&LEFTOVERS).namespaces.extend(names.iter().cloned());
}

pub fn untrack_namespaces(names: &[String]) {
    lock(&LEFTOVERS).namespaces.retain(|n| !names.contains(n));
}

/// Starts the thread that cleans up and exits on SIGINT, SIGTERM or
/// SIGHUP.
pub fn install() -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("lb-bench-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!(
                    "lb-bench: signal {signal}: stopping the peers and removing the run's namespaces"
                );
                clean_up(&LEFTOVERS);
                std::process::exit(128 + signal);
            }
        })?;
    Ok(())
}

/// Stops every tracked group and removes every tracked namespace; from
/// then on, [`track_group`] refuses. Runs on the signal thread, which never
/// enters a namespace, so `ip netns del` sees the host's view.
fn clean_up(leftovers: &Mutex<Leftovers>) {
    let (groups, namespaces) = {
        let mut l = lock(leftovers);
        l.stopping = true;
        (
            std::mem::take(&mut l.groups),
            std::mem::take(&mut l.namespaces),
        )
    };
    crate::procs::stop_groups(&groups);
    crate::procs::remove_namespaces(&namespaces);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// The cleanup a signal triggers stops a tracked group, its leader and
    /// the child it forked alike, and refuses new groups afterwards.
    #[test]
    fn clean_up_stops_tracked_groups() {
        use std::os::unix::process::CommandExt;
        // A leader that ignores SIGTERM, with a child that does not: both
        // must go (the leader by SIGKILL after the grace period).
        let mut leader = Command::new("sh")
            .args(["-c", "trap '' TERM; sleep 60 & wait; sleep 60"])
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("sh runs");
        let pgid = leader.id();
        assert!(crate::procs::wait_for(
            std::time::Duration::from_secs(5),
            || crate::procs::group_members(pgid) == 2
        ));
        // A list of its own: other tests' peers are not this test's.
        let leftovers = Mutex::new(Leftovers::new());
        assert!(track_in(&leftovers, pgid));
        clean_up(&leftovers);
        assert_eq!(crate::procs::group_members(pgid), 0);
        assert!(leader.wait().is_ok());
        assert!(lock(&leftovers).groups.is_empty());
        assert!(
            !track_in(&leftovers, pgid),
            "a group started after the signal was accepted"
        );
    }
}
