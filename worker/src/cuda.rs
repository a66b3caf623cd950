//! CUDA-only device setup (compiled with the `cuda` feature).
//!
//! candle allocates every tensor with `cuMemAllocAsync` from the device's default memory
//! pool, whose release threshold is 0: at every synchronisation (a loss read back, a routing
//! decision, the gradient norm) the pool hands its free memory back to the driver, and the
//! next step maps it again. With activations and optimizer buffers of hundreds of MB that
//! costs more than the arithmetic. Raising the threshold keeps freed memory in the pool for
//! reuse, as PyTorch's caching allocator does; peak use is unchanged.
//!
//! cudarc also creates (and later destroys) two CUDA events with every allocation, to order
//! uses of a buffer across streams. candle keeps each device's work on one stream, where the
//! events are never waited on, so the worker turns that bookkeeping off. The one exception,
//! the products that run on side streams (`fused::cuda::spread`: a grouped product's
//! experts, a triangular product's blocks), orders itself with two events of its own.

#![allow(unsafe_code)] // two driver calls that candle and cudarc do not wrap

use candle_core::cuda_backend::cudarc::driver::{result, sys};

use crate::WorkerError;

/// Makes the default memory pool of `device`'s GPU keep freed memory instead of returning it
/// to the driver at each synchronisation.
pub(crate) fn keep_freed_memory(device: &candle_core::CudaDevice) -> Result<(), WorkerError> {
    let stream = device.cuda_stream();
    let ctx = stream.context();
    let failed = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        WorkerError::Device(format!("could not configure the CUDA memory pool: {e}"))
    };
    ctx.bind_to_thread().map_err(failed)?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: `cu_device` is the device of a context that is open and current on this
    // thread, so it is a valid device handle and its default pool is valid; the release
    // threshold attribute takes a `cuuint64_t`, and `threshold` is one that outlives the call.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(failed)?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(failed)?;
    }
    Ok(())
}

/// Returns to the driver what the default memory pool of `device`'s GPU keeps but nothing
/// holds ([`keep_freed_memory`] makes it keep everything freed), so a later reading of the
/// memory in use starts from what is live now.
pub(crate) fn release_pooled_memory(device: &candle_core::CudaDevice) -> Result<(), WorkerError> {
    let stream = device.cuda_stream();
    let ctx = stream.context();
    let failed = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        WorkerError::Device(format!("could not trim the CUDA memory pool: {e}"))
    };
    stream.synchronize().map_err(failed)?;
    ctx.bind_to_thread().map_err(failed)?;
    // SAFETY: as in `keep_freed_memory`: the device of a context that is open and current
    // on this thread is a valid handle, and its default pool a valid pool.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(failed)?;
        result::mem_pool::trim_to(pool, 0).map_err(failed)?;
    }
    Ok(())
}

/// Stops cudarc from creating two CUDA events per allocation of `device` (see the module
/// documentation). The events only order work between several streams of one context, and
/// candle submits all work of a device to one stream; the worker's side streams wait for
/// that stream before they read a buffer, and it waits for them before anything it enqueues
/// later (a free, a write) runs.
pub(crate) fn skip_event_tracking(device: &candle_core::CudaDevice) {
    // SAFETY: the obligations of `disable_event_tracking` concern work on several streams
    // (a buffer freed or written on one while another still uses it); every tensor of this
    // device is created, written and freed on the device's stream, and the side streams of
    // `fused::cuda::spread` are ordered against it both ways.
    unsafe { device.disable_event_tracking() }
}

/// Bytes in use on `device`'s GPU (its total less what the driver reports free: everything
/// this process and others hold, the memory pool's kept reservations included) and its
/// total. With [`keep_freed_memory`] on, the pool holds on to its peak, so read after a
/// step this is the step's peak reservation.
pub(crate) fn memory_in_use(device: &candle_core::CudaDevice) -> Result<(u64, u64), WorkerError> {
    let failed = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        WorkerError::Device(format!("could not read the GPU's memory use: {e}"))
    };
    device
        .cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(failed)?;
    let (free, total) = result::mem_get_info().map_err(failed)?;
    Ok(((total - free) as u64, total as u64))
}
