//! CUDA graphs of libtorch work issued from Rust (tch exposes none).
//!
//! A decode step of a small batch is bound by the host issuing its few hundred small kernels,
//! not by the device running them. [`CudaGraph::capture`] records the kernels a closure issues
//! (through tch, on this thread) once; [`CudaGraph::replay`] launches them all again with one
//! call. A graph replays the same kernels on the same memory: whatever the closure read or wrote
//! (inputs, weights, caches, its outputs) must stay allocated, at the same addresses, for as long
//! as the graph may replay, and new inputs are written into those tensors in place.
//!
//! Built without CUDA (libtorch without `libtorch_cuda.so`, or no CUDA headers found; see
//! `build.rs`), [`available`] is false and capture fails with [`GraphError::Unavailable`].

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Mutex, PoisonError};

/// Why a graph could not be captured or replayed.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// This build has no CUDA graphs.
    #[error("this build of loraloom has no CUDA graphs (libtorch without CUDA)")]
    Unavailable,
    /// libtorch or CUDA refused (the message is theirs).
    #[error("CUDA graph: {0}")]
    Cuda(String),
}

/// Whether this build can capture CUDA graphs (it still needs a CUDA device to do so).
pub fn available() -> bool {
    cfg!(cuda_graphs)
}

/// A recorded sequence of CUDA work, replayable on the stream current at replay.
pub struct CudaGraph {
    raw: ffi::Graph,
}

/// What [`CudaGraph::capture`] returns: the closure's result from its first (real) run, the
/// graph, and the closure's result from the recorded run (tensors whose storage every replay
/// writes).
pub struct Captured<T> {
    /// The first run's result: the step this capture served, computed.
    pub first: T,
    /// The recorded run's result: nothing is computed into it until the first replay.
    pub recorded: T,
    /// The graph.
    pub graph: CudaGraph,
}

impl CudaGraph {
    /// Runs `work` on `device`'s capture stream (one per device, from libtorch's pool; ordered
    /// after the work already issued on this thread's stream, which is ordered after it when
    /// this returns), then records a second run of it as a graph. `work` must issue only device work on this thread (no copy from or
    /// to the host, no synchronisation) and issue the same work on both runs: running it twice
    /// must be harmless (it writes what it reads from nowhere else).
    ///
    /// One capture runs at a time in the process (a capture fails when another thread
    /// synchronises the device meanwhile, and the captures of several decode loops would
    /// otherwise meet). An error of `work` (in either run) or of CUDA, or a panic of `work`,
    /// leaves no capture in progress and the thread's stream and device as they were.
    pub fn capture<T, E: From<GraphError>>(
        device: usize,
        mut work: impl FnMut() -> Result<T, E>,
    ) -> Result<Captured<T>, E> {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _capturing = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let raw = ffi::Graph::new()?;
        if let Err(e) = raw.enter_stream(device) {
            let _ = raw.leave_stream();
            return Err(e.into());
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(T, T), E> {
            let first = work()?;
            raw.capture_begin()?;
            let recorded = catch_unwind(AssertUnwindSafe(&mut work));
            let ended = raw.capture_end();
            let recorded = recorded.unwrap_or_else(|panic| resume_unwind(panic))?;
            ended?;
            Ok((first, recorded))
        }));
        let left = raw.leave_stream();
        let (first, recorded) = outcome.unwrap_or_else(|panic| resume_unwind(panic))?;
        left?;
        Ok(Captured {
            first,
            recorded,
            graph: CudaGraph { raw },
        })
    }

    /// Launches the recorded work on the current stream (it runs after the work queued there).
    pub fn replay(&self) -> Result<(), GraphError> {
        self.raw.replay()
    }
}

#[cfg(cuda_graphs)]
mod ffi {
    //! The glue's functions (src/graph.cpp) behind a safe handle.

    use std::ffi::{c_char, c_int, CStr};
    use std::ptr::NonNull;

    use super::GraphError;

    #[repr(C)]
    pub struct RawGraph {
        _opaque: [u8; 0],
    }

    extern "C" {
        fn loraloom_graph_new(out: *mut *mut RawGraph) -> *mut c_char;
        fn loraloom_graph_free(g: *mut RawGraph);
        fn loraloom_graph_error_free(error: *mut c_char);
        fn loraloom_graph_enter_stream(g: *mut RawGraph, device: c_int) -> *mut c_char;
        fn loraloom_graph_leave_stream(g: *mut RawGraph) -> *mut c_char;
        fn loraloom_graph_capture_begin(g: *mut RawGraph) -> *mut c_char;
        fn loraloom_graph_capture_end(g: *mut RawGraph) -> *mut c_char;
        fn loraloom_graph_replay(g: *mut RawGraph) -> *mut c_char;
    }

    /// Turns a glue function's return value (NULL, or a message it allocated) into a result.
    fn checked(error: *mut c_char) -> Result<(), GraphError> {
        if error.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null return is a NUL-terminated string the glue allocated with strdup
        // and hands over; it is read once and freed once, by the glue's own free.
        let text = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above; nothing reads `error` after this.
        unsafe { loraloom_graph_error_free(error) };
        Err(GraphError::Cuda(text))
    }

    /// An owned `LoraloomGraph` of the glue.
    pub struct Graph(NonNull<RawGraph>);

    // SAFETY: the glue's graph holds no thread-bound state between calls (the stream it makes
    // current is restored by leave_stream, which `CudaGraph::capture` calls on the thread that
    // entered before returning); libtorch's CUDAGraph may be replayed from any thread.
    unsafe impl Send for Graph {}

    impl Graph {
        pub fn new() -> Result<Graph, GraphError> {
            let mut raw = std::ptr::null_mut();
            // SAFETY: `raw` is a valid out-pointer; the glue writes a fresh allocation or null.
            checked(unsafe { loraloom_graph_new(&mut raw) })?;
            NonNull::new(raw)
                .map(Graph)
                .ok_or_else(|| GraphError::Cuda("no graph allocated".to_owned()))
        }

        pub fn enter_stream(&self, device: usize) -> Result<(), GraphError> {
            let device = c_int::try_from(device)
                .map_err(|_| GraphError::Cuda(format!("no CUDA device {device}")))?;
            // SAFETY: `self.0` is a live graph this handle owns.
            checked(unsafe { loraloom_graph_enter_stream(self.0.as_ptr(), device) })
        }

        pub fn leave_stream(&self) -> Result<(), GraphError> {
            // SAFETY: as in `enter_stream`.
            checked(unsafe { loraloom_graph_leave_stream(self.0.as_ptr()) })
        }

        pub fn capture_begin(&self) -> Result<(), GraphError> {
            // SAFETY: as in `enter_stream`.
            checked(unsafe { loraloom_graph_capture_begin(self.0.as_ptr()) })
        }

        pub fn capture_end(&self) -> Result<(), GraphError> {
            // SAFETY: as in `enter_stream`.
            checked(unsafe { loraloom_graph_capture_end(self.0.as_ptr()) })
        }

        pub fn replay(&self) -> Result<(), GraphError> {
            // SAFETY: as in `enter_stream`.
            checked(unsafe { loraloom_graph_replay(self.0.as_ptr()) })
        }
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            // SAFETY: this handle owns the graph and drops it once.
            unsafe { loraloom_graph_free(self.0.as_ptr()) }
        }
    }
}

#[cfg(not(cuda_graphs))]
mod ffi {
    //! A build without CUDA graphs: no graph can be made.

    use super::GraphError;

    pub struct Graph(());

    impl Graph {
        pub fn new() -> Result<Graph, GraphError> {
            Err(GraphError::Unavailable)
        }
        pub fn enter_stream(&self, _device: usize) -> Result<(), GraphError> {
            Err(GraphError::Unavailable)
        }
        pub fn leave_stream(&self) -> Result<(), GraphError> {
            Err(GraphError::Unavailable)
        }
        pub fn capture_begin(&self) -> Result<(), GraphError> {
            Err(GraphError::Unavailable)
        }
        pub fn capture_end(&self) -> Result<(), GraphError> {
            Err(GraphError::Unavailable)
        }
        pub fn replay(&self) -> Result<(), GraphError> {
            Err(GraphError::Unavailable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_with_cuda_builds_graphs() {
        // PyPI's PyTorch (requirements.txt) has CUDA, on CPU-only machines too: a build that
        // lost the glue (headers not found) would silently decode without graphs on a GPU.
        if option_env!("LORALOOM_LIBTORCH_HAS_CUDA").is_some() {
            assert!(
                available(),
                "libtorch has CUDA but the CUDA graph glue was not built"
            );
        }
    }

    #[test]
    fn capture_without_a_cuda_device_fails_cleanly() {
        // No GPU here (CI and the development machine): whichever way the crate was built,
        // capture must fail with an error and never run the work a second time.
        let mut runs = 0;
        let result = CudaGraph::capture(0, || -> Result<(), GraphError> {
            runs += 1;
            Ok(())
        });
        if std::path::Path::new("/dev/nvidiactl").exists() {
            return; // a GPU machine: capture may well succeed
        }
        assert!(result.is_err());
        assert_eq!(runs, 0, "work ran before the device was checked");
    }
}
