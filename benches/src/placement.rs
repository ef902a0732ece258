//! Where the latency measurement's processes run (CPU affinity).
//!
//! The latency client keeps one request in flight per connection, so it
//! can only keep its rate while a round trip is shorter than a
//! connection's interval (16 connections at 60k requests/s: 267 µs). On a
//! machine with fewer CPUs than busy threads, the scheduler sometimes
//! leaves two of the client, the backend and the proxy sharing one CPU
//! while the other idles, for a hundred milliseconds or more; round trips
//! triple, every connection falls behind its schedule, and the lag sets
//! the run's p99 whatever the proxy does. So during the latency runs the
//! client, the HTTP backend and the proxy are each held to CPUs of their
//! own where there are enough, and to the same CPUs for every peer where
//! there are not ([`Placement::plan`]). Throughput runs are left to the
//! scheduler: they measure what the machine does as a whole.

use rustix::io::Errno;
use rustix::process::Pid;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// The CPUs each part of a latency run is held to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub client: Vec<usize>,
    pub backend: Vec<usize>,
    pub proxy: Vec<usize>,
}

impl Placement {
    /// The placement for a proxy of `workers` workers on `cpus` (the CPUs
    /// this run may use, ascending): the client on the first, the backend
    /// on the second and the proxy on the next `workers` where there are
    /// that many; otherwise the backend on the last CPU and the proxy on
    /// the last `workers` (with 2 CPUs: one worker shares the backend's
    /// CPU, two workers get both). `None` with fewer than 2 CPUs: there is
    /// nothing to separate.
    pub fn plan(cpus: &[usize], workers: usize) -> Option<Placement> {
        let n = cpus.len();
        if n < 2 {
            return None;
        }
        let workers = workers.clamp(1, n);
        Some(if n >= workers + 2 {
            Placement {
                client: vec![cpus[0]],
                backend: vec![cpus[1]],
                proxy: cpus[2..2 + workers].to_vec(),
            }
        } else {
            Placement {
                client: vec![cpus[0]],
                backend: vec![cpus[n - 1]],
                proxy: cpus[n - workers..].to_vec(),
            }
        })
    }

    /// "client on CPU 0, backend on CPU 1, proxy on CPUs 0,1".
    pub fn describe(&self) -> String {
        let cpus = |c: &[usize]| {
            let list: Vec<String> = c.iter().map(usize::to_string).collect();
            let s = if c.len() == 1 { "" } else { "s" };
            format!("CPU{s} {}", list.join(","))
        };
        format!(
            "client on {}, backend on {}, proxy on {}",
            cpus(&self.client),
            cpus(&self.backend),
            cpus(&self.proxy)
        )
    }
}

/// The CPUs the calling thread may run on, ascending.
pub fn allowed() -> anyhow::Result<Vec<usize>> {
    let set = sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect())
}

fn set_of(cpus: &[usize]) -> CpuSet {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c);
    }
    set
}

/// Holds every thread of the processes `pids` to `cpus`. Threads they
/// start later inherit it from the thread that starts them.
pub fn pin(pids: &[u32], cpus: &[usize]) -> anyhow::Result<()> {
    let set = set_of(cpus);
    for &pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let name = task?.file_name();
            let tid: i32 = name.to_string_lossy().parse()?;
            let Some(tid) = Pid::from_raw(tid) else {
                continue;
            };
            match sched_setaffinity(Some(tid), &set) {
                // A thread that ended since the listing needs no place.
                Ok(()) | Err(Errno::SRCH) => {}
                Err(e) => anyhow::bail!("holding thread {tid:?} of {pid} to CPUs {cpus:?}: {e}"),
            }
        }
    }
    Ok(())
}

/// Runs `f` with the calling thread held to `cpus`, then gives the thread
/// back the CPUs it had (also when `f` panics).
pub fn on<T>(cpus: &[usize], f: impl FnOnce() -> T) -> anyhow::Result<T> {
    struct Restore(CpuSet);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = sched_setaffinity(None, &self.0);
        }
    }
    let _restore = Restore(sched_getaffinity(None)?);
    sched_setaffinity(None, &set_of(cpus))?;
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cpus_share_the_way_a_2_core_machine_must() {
        let one = Placement::plan(&[0, 1], 1).unwrap();
        assert_eq!(one.client, [0]);
        assert_eq!(one.backend, [1]);
        assert_eq!(one.proxy, [1]);
        let two = Placement::plan(&[0, 1], 2).unwrap();
        assert_eq!(two.backend, [1]);
        assert_eq!(two.proxy, [0, 1]);
        assert_eq!(
            two.describe(),
            "client on CPU 0, backend on CPU 1, proxy on CPUs 0,1"
        );
    }

    #[test]
    fn enough_cpus_give_every_part_its_own() {
        let cpus = [0, 1, 2, 3, 4, 5, 6, 7];
        let p = Placement::plan(&cpus, 2).unwrap();
        assert_eq!(
            (p.client, p.backend, p.proxy),
            (vec![0], vec![1], vec![2, 3])
        );
        // Offline or excluded CPUs are skipped, not assumed.
        let p = Placement::plan(&[2, 5, 7, 9], 1).unwrap();
        assert_eq!((p.client, p.backend, p.proxy), (vec![2], vec![5], vec![7]));
        // More workers than CPUs: the proxy gets them all.
        let p = Placement::plan(&[0, 1, 2], 4).unwrap();
        assert_eq!(p.proxy, [0, 1, 2]);
        assert_eq!(p.backend, [2]);
    }

    #[test]
    fn one_cpu_is_left_alone() {
        assert_eq!(Placement::plan(&[3], 1), None);
        assert_eq!(Placement::plan(&[], 2), None);
    }

    /// A real process and its two children all end up held to the CPU
    /// asked for (through each one's task list); the calling thread gets
    /// its CPUs back after `on`.
    #[test]
    fn pin_reaches_every_process_and_on_restores() {
        let cpus = allowed().unwrap();
        let first = cpus[0];
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let kids = loop {
            let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            let kids: Vec<u32> = kids
                .split_whitespace()
                .filter_map(|k| k.parse().ok())
                .collect();
            if kids.len() == 2 || std::time::Instant::now() > deadline {
                break kids;
            }
            std::thread::yield_now();
        };
        assert_eq!(kids.len(), 2, "the shell's two sleeps started");
        let mut pids = vec![pid];
        pids.extend(&kids);
        pin(&pids, &[first]).unwrap();
        for p in &pids {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_owned();
            assert_eq!(list, first.to_string(), "process {p}");
        }
        let _ = child.kill();
        let _ = child.wait();
        for k in kids {
            let _ = rustix::process::kill_process(
                Pid::from_raw(k as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }

        let inside = on(&[first], || allowed().unwrap()).unwrap();
        assert_eq!(inside, [first]);
        assert_eq!(allowed().unwrap(), cpus);
    }
}
