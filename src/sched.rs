//! The kernel scheduling policy of the data-plane threads.
//!
//! Under the default policy a thread woken by a socket event preempts
//! whatever runs on its CPU. On a machine the proxy shares (with the load,
//! the engine, other services) that makes each worker wake for a request or
//! two, sleep, and wake again: measured here at 0.4 sleeps per request
//! against nginx's 0.02, at several µs each. `SCHED_BATCH` turns wake-up
//! preemption off for these threads only, so events gather while the
//! running thread finishes its slice and a worker handles them in one go
//! (README, "Performance").
//!
//! This is the crate's one `unsafe` block (`lib.rs` denies the rest): the
//! call has no safe wrapper that fits. rustix leaves `sched_setscheduler`
//! out, and the thread-priority crate sets the thread's nice value along
//! with the policy, which would undo an operator's `nice`.
#![allow(unsafe_code)]

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
}
