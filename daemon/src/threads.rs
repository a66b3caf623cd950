//! The number of CPU threads the worker's math uses (`cpu_threads`). candle runs its CPU
//! kernels on rayon's global pool (element-wise ops with `par_iter`, matrix products through
//! gemm's rayon parallelism), so the pool's size bounds the cores a daemon's training takes,
//! whatever candle asks gemm for. The global pool is made once per process, on first use,
//! so it is built here, explicitly, when the daemon starts and before any tensor operation;
//! its threads are named `potluck-math-N`. A process whose pool already exists with another
//! size (a second daemon in one process, as tests run them) gets a clear error, not a
//! silently different setting.

/// Why the thread count could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ThreadsError {
    #[error(
        "`cpu_threads` = {want} cannot be applied: this process's math thread pool already \
         runs {running} threads (it is made once per process; restart the daemon)"
    )]
    AlreadyStarted { want: usize, running: usize },
    #[error("`cpu_threads` must be at least 1")]
    Zero,
}

/// Makes rayon's global pool `n` threads. Succeeds when it already has `n`.
pub fn apply(n: usize) -> Result<(), ThreadsError> {
    if n == 0 {
        return Err(ThreadsError::Zero);
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("potluck-math-{i}"))
        .build_global();
    match built {
        Ok(()) => {
            tracing::info!(threads = n, "CPU math thread pool started");
            Ok(())
        }
        // Outside the pool, this is the global pool's size.
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(_) => Err(ThreadsError::AlreadyStarted {
            want: n,
            running: rayon::current_num_threads(),
        }),
    }
}
