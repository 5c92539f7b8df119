//! The data-plane threads: their scheduling policy and CPU affinity.

mod common;

use common::*;

#[cfg(target_os = "linux")]
#[tokio::test]
async fn worker_threads_run_under_sched_batch_unless_told_otherwise() {
    // Policies of one gateway's worker threads (other tests' gateways may
    // share this process).
    fn policies(gw: &Gw) -> Vec<u32> {
        let threads = &gw.running.as_ref().unwrap().worker_threads;
        assert!(!threads.is_empty());
        threads
            .iter()
            .map(|tid| keygate::sched::policy_of(*tid).expect("worker is alive"))
            .collect()
    }
    const SCHED_BATCH: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let (gw, _) = alice_owns_wf(&dir, &upstream.url(), "").await;
    assert_eq!(policies(&gw), [SCHED_BATCH]);

    let other = tempfile::tempdir().unwrap();
    let normal = Gw::start(config(
        other.path(),
        &embedded(&other),
        &upstream.url(),
        "worker_policy: normal\n",
    ))
    .await;
    assert_eq!(policies(&normal), [0]);
    drop((gw, normal));
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn workers_keep_one_cpu_each_when_there_is_one_per_cpu() {
    fn cpus(gw: &Gw) -> Vec<Vec<usize>> {
        let threads = &gw.running.as_ref().unwrap().worker_threads;
        threads
            .iter()
            .map(|tid| keygate::sched::cpus_of(*tid).expect("worker is alive"))
            .collect()
    }
    let allowed = keygate::sched::allowed_cpus().unwrap();
    if allowed.len() < 2 {
        eprintln!("skipped: pinning needs two CPUs, this process may use {allowed:?}");
        return;
    }
    let upstream = Upstream::start().await;
    let start = |workers: usize, extra: &'static str| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = embedded_config(&dir, &upstream.url(), extra);
        c.workers = workers;
        async move { (Gw::start(c).await, dir) }
    };

    let (one_each, _d1) = start(allowed.len(), "").await;
    let (told_not_to, _d2) = start(allowed.len(), "worker_cpu_affinity: none\n").await;
    let (more_than_cpus, _d3) = start(allowed.len() + 1, "").await;
    let pinned: Vec<Vec<usize>> = allowed.iter().map(|cpu| vec![*cpu]).collect();
    assert_eq!(cpus(&one_each), pinned);
    assert!(cpus(&told_not_to).iter().all(|c| *c == allowed));
    assert!(cpus(&more_than_cpus).iter().all(|c| *c == allowed));
    assert_eq!(cpus(&more_than_cpus).len(), allowed.len() + 1);
    // Pinned workers serve.
    assert_eq!(one_each.webhook("wf", None).await.0, 401);
}
