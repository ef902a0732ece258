//! The control runtime's threads (the control API, applies and reloads,
//! health checks, the admin endpoints) give way to the forwarding workers.
//!
//! They run [`CONTROL_NICER`] nicer, so that under contention they get
//! about a tenth of a CPU against a busy worker. And they ask for the
//! scheduler's shortest slice: once picked, a fair-class thread keeps the
//! CPU for its slice before a woken thread of its class may take it (1.4 ms
//! by default on a 2-CPU host), so a control thread woken to build a large
//! state held a woken worker off for that long. With a 0.1 ms slice the
//! worker waits at most that. Measured with `lb-bench listeners` and one
//! full change of 2,000 listeners, then a pause as long as the apply, over
//! and over: p99 on an untouched listener 2.30-2.96 ms with the default
//! slice, 1.16-1.77 ms with this one (5 rounds each, idle 0.4-0.6 ms).

/// How much nicer than the process the control threads run (at most 19).
const CONTROL_NICER: i32 = 10;

/// The slice the control threads ask for, in nanoseconds: the smallest
/// the kernel takes. Linux 6.12 and later take a fair-class thread's
/// `sched_runtime` as its slice; older kernels ignore it, and only the
/// niceness applies.
const CONTROL_SLICE_NS: u64 = 100_000;

/// `SCHED_FLAG_KEEP_POLICY`: keep the thread's scheduling policy (normal,
/// batch, or whatever the unit file set) and change only what is given.
const SCHED_FLAG_KEEP_POLICY: u64 = 0x08;

/// `struct sched_attr` of `sched_setattr(2)`, its first version (48 bytes;
/// `size` tells the kernel which version it reads).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Run by every control thread as it starts. A failure costs only the
/// priority, and is logged.
pub(super) fn lower_control_thread() {
    let this_thread = Some(rustix::thread::gettid());
    let nice = rustix::process::getpriority_process(this_thread)
        .map(|nice| (nice + CONTROL_NICER).min(19))
        .and_then(|nice| rustix::process::setpriority_process(this_thread, nice).map(|()| nice));
    let nice = match nice {
        Ok(nice) => nice,
        Err(error) => {
            tracing::debug!(%error, "cannot lower the control thread's priority");
            return;
        }
    };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: 0,
        flags: SCHED_FLAG_KEEP_POLICY,
        nice,
        priority: 0,
        runtime: CONTROL_SLICE_NS,
        deadline: 0,
        period: 0,
    };
    // SAFETY: `attr` is a whole `struct sched_attr` of the size it states,
    // alive for the call; pid 0 is the calling thread; flags argument 0.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        tracing::debug!(%error, "cannot shorten the control thread's slice");
    }
}
