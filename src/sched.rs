//! How the kernel schedules the data-plane threads: their policy and the
//! CPUs they may run on.
//!
//! Under the default policy a thread woken by a socket event preempts
//! whatever runs on its CPU. On a machine the proxy shares (with the load,
//! the engine, other services) that makes each worker wake for a request or
//! two, sleep, and wake again, paying a wake-up each time. `SCHED_BATCH`
//! turns wake-up preemption off for these threads only, so events gather
//! while the running thread finishes its slice and a worker handles them
//! in one go (README, "Performance", has the measurements).
//!
//! The kernel may also put two workers on one CPU for a while, where they
//! take turns while the other CPU runs the rest, and the rate drops for as
//! long as it lasts. With as many workers as CPUs, each worker keeps to its own CPU (`sched_setaffinity`,
//! `worker_cpu_affinity: auto`).
//!
//! Setting the policy is the crate's one `unsafe` block (`lib.rs` denies
//! the rest): the call has no safe wrapper that fits. rustix leaves
//! `sched_setscheduler` out, and the thread-priority crate sets the
//! thread's nice value along with the policy, which would undo an
//! operator's `nice`. CPU affinity goes through rustix's safe calls.
#![allow(unsafe_code)]

#[cfg(target_os = "linux")]
use rustix::thread::{CpuSet, Pid, sched_getaffinity, sched_setaffinity};

/// Puts the calling thread under `SCHED_BATCH` (Linux; a no-op elsewhere).
pub fn batch_this_thread() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid, initialised `sched_param` that lives
        // across the call; pid 0 names the calling thread; priority 0 is the
        // one SCHED_BATCH accepts. Nothing else is touched.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Keeps the calling thread on CPU `cpu` (Linux; a no-op elsewhere).
pub fn pin_this_thread(cpu: usize) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if cpu >= CpuSet::MAX_CPU {
            return Err(std::io::Error::other(format!("no CPU {cpu}")));
        }
        let mut set = CpuSet::new();
        set.set(cpu);
        sched_setaffinity(None, &set)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
    Ok(())
}

/// The CPUs each worker keeps to: the CPUs this process may use, one per
/// worker, when there are as many of them as workers (and more than one).
/// Otherwise `None`: pinning fewer workers than CPUs would leave CPUs idle
/// that the kernel could have used, and several workers on one CPU could
/// not move off it when it is busy.
pub fn one_per_cpu(workers: usize, allowed: &[usize]) -> Option<&[usize]> {
    (workers > 1 && allowed.len() == workers).then_some(allowed)
}

/// The online CPUs the calling thread may run on (Linux).
pub fn allowed_cpus() -> Option<Vec<usize>> {
    #[cfg(target_os = "linux")]
    return sched_getaffinity(None).ok().map(cpus_in);
    #[cfg(not(target_os = "linux"))]
    None
}

/// The online CPUs thread `tid` of this process may run on (Linux).
pub fn cpus_of(tid: u32) -> Option<Vec<usize>> {
    #[cfg(target_os = "linux")]
    return sched_getaffinity(Some(Pid::from_raw(i32::try_from(tid).ok()?)?))
        .ok()
        .map(cpus_in);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = tid;
        None
    }
}

#[cfg(target_os = "linux")]
fn cpus_in(set: CpuSet) -> Vec<usize> {
    (0..CpuSet::MAX_CPU)
        .filter(|cpu| set.is_set(*cpu))
        .collect()
}

/// The calling thread's kernel id, from `/proc/thread-self` (Linux).
pub fn thread_id() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// The scheduling policy of thread `tid` of this process, as
/// `/proc/self/task/<tid>/stat` reports it (3 is `SCHED_BATCH`).
pub fn policy_of(tid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Field 41; the command name (field 2) may hold spaces, so count after it.
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(41 - 3)?.parse().ok()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn own_tid() -> u32 {
        thread_id().unwrap()
    }

    #[test]
    fn a_thread_moves_to_sched_batch_and_others_stay() {
        let main_policy = policy_of(own_tid());
        let moved = std::thread::spawn(|| {
            batch_this_thread().unwrap();
            policy_of(own_tid())
        })
        .join()
        .unwrap();
        assert_eq!(moved, Some(libc::SCHED_BATCH as u32));
        assert_ne!(main_policy, None);
        assert_eq!(policy_of(own_tid()), main_policy);
    }

    #[test]
    fn workers_are_pinned_only_one_per_cpu() {
        assert_eq!(one_per_cpu(2, &[0, 1]), Some(&[0, 1][..]));
        assert_eq!(one_per_cpu(2, &[4, 6]), Some(&[4, 6][..]));
        assert_eq!(one_per_cpu(1, &[0]), None);
        assert_eq!(one_per_cpu(2, &[0, 1, 2, 3]), None);
        assert_eq!(one_per_cpu(4, &[0, 1]), None);
    }

    #[test]
    fn a_pinned_thread_keeps_to_its_cpu_and_others_do_not() {
        let allowed = allowed_cpus().unwrap();
        let last = *allowed.last().unwrap();
        let pinned = std::thread::spawn(move || {
            pin_this_thread(last).unwrap();
            allowed_cpus()
        })
        .join()
        .unwrap();
        assert_eq!(pinned, Some(vec![last]));
        assert_eq!(allowed_cpus(), Some(allowed));
        assert!(pin_this_thread(1 << 20).is_err());
    }
}
