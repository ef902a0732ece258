//! Processes and namespaces a run starts, and how they are stopped:
//! process groups (each peer runs in its own), counted from `/proc`, and
//! network namespaces; plus the bounded polling every waiter here uses.
//! A leaf: the peers, the topology and the signal handler all use it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Stops the process groups led by `groups`: SIGTERM to each group (so
/// nginx's workers go with their master: killing the master alone orphans
/// workers that keep serving the port), up to 3 s for every member to
/// exit, then SIGKILL to what is left.
pub fn stop_groups(groups: &[u32]) {
    use rustix::process::{kill_process_group, Pid, Signal};
    let signal = |sig| {
        for &g in groups {
            if let Some(pid) = i32::try_from(g).ok().and_then(Pid::from_raw) {
                // ESRCH: the group is gone already.
                let _ = kill_process_group(pid, sig);
            }
        }
    };
    let gone = || groups.iter().all(|&g| group_members(g) == 0);
    signal(Signal::TERM);
    if !wait_for(Duration::from_secs(3), gone) {
        signal(Signal::KILL);
        wait_for(Duration::from_secs(3), gone);
    }
}

/// How many live processes (zombies not counted) are in process group
/// `pgid`, from `/proc`.
pub fn group_members(pgid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let pgid = pgid.to_string();
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                return false;
            };
            // "pid (comm) state ppid pgrp ...", where comm may hold spaces
            // and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            state != Some("Z") && fields.nth(1) == Some(pgid.as_str())
        })
        .count()
}

/// Polls `done` until it holds or `wait` has passed; whether it held.
pub fn wait_for(wait: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deletes the namespaces `names` (and with them the veth pairs).
pub fn remove_namespaces(names: &[String]) {
    for name in names {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
