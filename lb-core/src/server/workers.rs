//! Starting the worker threads, each reporting from inside its running
//! runtime.

use std::sync::Arc;

/// Why the workers did not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A thread could not be created.
    #[error("worker thread: {0}")]
    Thread(std::io::Error),
    /// A worker's runtime failed before it ran (or the worker panicked).
    #[error("worker runtime: {0}")]
    Runtime(std::io::Error),
}

/// A worker's way to say that its runtime runs.
pub struct Started(std::sync::mpsc::Sender<std::io::Result<()>>);

impl Started {
    /// Says that this worker's runtime runs.
    pub fn running(self) {
        let _ = self.0.send(Ok(()));
    }
}

/// Starts one thread `lbd-worker-{id}` per input, running
/// `body(id, input, started)`, and returns them once every one has called
/// `started.running()` from inside its runtime. A body that returns an
/// error before that, or panics, fails the start (the threads already
/// running stop when their command channels close).
pub fn spawn_workers<I, F>(
    inputs: Vec<I>,
    body: F,
) -> Result<Vec<std::thread::JoinHandle<()>>, WorkerError>
where
    I: Send + 'static,
    F: Fn(usize, I, Started) -> std::io::Result<()> + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let mut threads = Vec::with_capacity(inputs.len());
    let mut reports = Vec::with_capacity(inputs.len());
    for (id, input) in inputs.into_iter().enumerate() {
        // One channel per worker: a worker that panics drops its senders,
        // which its receiver sees, whatever the others do.
        let (tx, rx) = std::sync::mpsc::channel();
        reports.push(rx);
        let body = body.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lbd-worker-{id}"))
            .spawn(move || {
                if let Err(e) = body(id, input, Started(tx.clone())) {
                    tracing::error!(worker = id, error = %e, "worker runtime failed");
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(WorkerError::Thread)?;
        threads.push(thread);
    }
    for report in reports {
        let source = match report.recv() {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::other("a worker stopped before its runtime ran"),
        };
        return Err(WorkerError::Runtime(source));
    }
    Ok(threads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A worker whose runtime fails to start fails the whole start, even
    /// when the others run; one that runs is waited for.
    #[test]
    fn a_worker_that_never_runs_fails_the_start() {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let stop_rx = Mutex::new(stop_rx);
        let started = spawn_workers(vec![0, 1, 2], move |_, n, started: Started| {
            if n == 1 {
                return Err(std::io::Error::other("no runtime for worker 1"));
            }
            started.running();
            let _ = stop_rx
                .lock()
                .map(|rx| rx.recv_timeout(Duration::from_secs(5)));
            Ok(())
        });
        let err = started.expect_err("worker 1 never ran").to_string();
        assert!(err.contains("no runtime for worker 1"), "{err}");
        drop(stop_tx);
    }

    /// A worker that panics before its runtime runs fails the start
    /// instead of hanging it.
    #[test]
    fn a_worker_that_panics_fails_the_start() {
        let started = spawn_workers(vec![(), ()], |id, (), started: Started| {
            if id == 0 {
                panic!("worker 0 could not build its runtime");
            }
            started.running();
            Ok(())
        });
        let err = started.expect_err("worker 0 never ran").to_string();
        assert!(err.contains("stopped before its runtime ran"), "{err}");
    }

    /// Every worker running: the start goes on with all of them.
    #[test]
    fn running_workers_start() {
        let threads = spawn_workers(vec![(); 3], |_, (), started: Started| {
            started.running();
            Ok(())
        })
        .unwrap();
        assert_eq!(threads.len(), 3);
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
