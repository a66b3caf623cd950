//! `cpu_threads` sizes the pool the worker's CPU math runs on. Its own test binary, so its
//! process's global pool is made here and nowhere else: a daemon started with
//! `cpu_threads = 2` leaves exactly two math threads, a candle matrix product runs on them,
//! and a second daemon in the same process asking for another count is refused.
#![allow(clippy::unwrap_used)]

mod common;

use potluck_daemon::Node;
use potluck_daemon::node::NodeError;
use potluck_daemon::threads::ThreadsError;

/// Names of this process's threads that belong to the math pool.
fn math_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("potluck-math-"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_math_pool_has_the_configured_threads() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(potluck_daemon::Config {
        cpu_threads: Some(2),
        ..common::config(dir.path(), vec![])
    })
    .await
    .unwrap();
    assert_eq!(rayon::current_num_threads(), 2);
    // A product large enough for gemm to go parallel runs on the pool.
    let dev = candle_core::Device::Cpu;
    let a = candle_core::Tensor::ones((512, 512), candle_core::DType::F32, &dev).unwrap();
    let sum: f32 = a
        .matmul(&a)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(sum, 512.0 * 512.0 * 512.0);
    assert_eq!(math_threads(), 2);

    // The same count again is fine (two daemons in one process); another is refused.
    let same = tempfile::tempdir().unwrap();
    let again = Node::start(potluck_daemon::Config {
        cpu_threads: Some(2),
        ..common::config(same.path(), vec![])
    })
    .await
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    let err = Node::start(potluck_daemon::Config {
        cpu_threads: Some(3),
        ..common::config(other.path(), vec![])
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            NodeError::Threads(ThreadsError::AlreadyStarted {
                want: 3,
                running: 2
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("cpu_threads"), "{err}");
    again.shutdown().await;
    node.shutdown().await;
}
