// C glue over libtorch's CUDA graphs (at::cuda::CUDAGraph) for loraloom-cuda-graph.
//
// Every function returns NULL on success or a malloc'd error message (free it with
// loraloom_graph_error_free); no C++ exception crosses into Rust. Only libtorch's exported
// functions and virtual interfaces are called (no CUDA runtime symbol is referenced), so the
// binary needs no direct link to libcudart.
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "loraloom_guarded.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <optional>

struct LoraloomGraph {
  at::cuda::CUDAGraph graph;
  // This capture's own memory pool (so a failed capture's allocator routing can be ended).
  c10::MempoolId_t pool{0, 0};
  c10::DeviceIndex device = 0;
  // What was current on the capturing thread before enter_stream.
  std::optional<c10::cuda::CUDAStream> outer;
  std::optional<c10::cuda::CUDAStream> side;
  c10::DeviceIndex outer_device = 0;
};

namespace {

using loraloom::guarded;

// The stream captures on `device` run on: one per device for the process (each stream that
// runs cuBLAS work gets its own workspace from libtorch, so a new pool stream per capture would
// end up holding one workspace for each of the pool's streams).
c10::cuda::CUDAStream capture_stream(c10::DeviceIndex device) {
  static std::mutex lock;
  static std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams;
  std::lock_guard<std::mutex> guard(lock);
  auto found = streams.find(device);
  if (found == streams.end()) {
    found = streams.emplace(device, c10::cuda::getStreamFromPool(false, device)).first;
  }
  return found->second;
}

// Work on `waiter` issued from now on runs after the work already issued on `waited`, without
// the host waiting (a device-wide synchronisation would invalidate other threads' captures).
void order_after(const c10::cuda::CUDAStream& waited, const c10::cuda::CUDAStream& waiter) {
  c10::Event event(c10::DeviceType::CUDA);
  event.record(waited.unwrap());
  event.block(waiter.unwrap());
}

// After a capture that failed: ends the device and host allocators' routing of this capture's
// allocations to its pool (PyTorch 2.11's capture_end throws before doing so when CUDA refuses
// to end the capture; 2.13's ends it first, and then these calls throw, harmlessly), and
// releases the pool, which ~CUDAGraph does only for a capture that ended (errors mean there
// was no such pool).
void abandon_pool(LoraloomGraph* g) {
  auto quietly = [](auto&& f) {
    try {
      f();
    } catch (...) {
    }
  };
  quietly([&] { c10::cuda::CUDACachingAllocator::endAllocateToPool(g->device, g->pool); });
  quietly([&] { at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(g->pool); });
  quietly([&] { c10::cuda::CUDACachingAllocator::releasePool(g->device, g->pool); });
  quietly([&] { at::getHostAllocator(at::kCUDA)->release_pool(g->pool); });
}

}  // namespace

extern "C" {

char* loraloom_graph_new(LoraloomGraph** out) {
  *out = nullptr;
  return guarded([&] { *out = new LoraloomGraph(); });
}

void loraloom_graph_free(LoraloomGraph* g) {
  try {
    delete g;
  } catch (...) {
  }
}

void loraloom_graph_error_free(char* error) { free(error); }

// Makes `device` this thread's current device and a stream of libtorch's pool its current
// stream (capture cannot use the default stream), ordered after the work already issued on the
// stream that was current.
char* loraloom_graph_enter_stream(LoraloomGraph* g, int device) {
  return guarded([&] {
    g->device = static_cast<c10::DeviceIndex>(device);
    g->outer_device = c10::cuda::current_device();
    g->outer = c10::cuda::getCurrentCUDAStream(g->device);
    c10::cuda::set_device(g->device);
    g->side = capture_stream(g->device);
    order_after(*g->outer, *g->side);
    c10::cuda::setCurrentCUDAStream(*g->side);
  });
}

// Makes the stream and device that were current before enter_stream current again, the work
// issued there from now on ordered after the side stream's.
char* loraloom_graph_leave_stream(LoraloomGraph* g) {
  return guarded([&] {
    if (!g->outer) {
      return;
    }
    auto outer = *g->outer;
    g->outer.reset();
    c10::cuda::setCurrentCUDAStream(outer);
    c10::cuda::set_device(g->outer_device);
    if (g->side) {
      order_after(*g->side, outer);
    }
  });
}

// Starts recording this thread's work on the current stream into the capture's own pool; other
// threads' CUDA calls go on as usual (thread-local capture mode).
char* loraloom_graph_capture_begin(LoraloomGraph* g) {
  return guarded([&] {
    g->pool = at::cuda::graph_pool_handle();
    try {
      g->graph.capture_begin(g->pool, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
      abandon_pool(g);
      throw;
    }
  });
}

char* loraloom_graph_capture_end(LoraloomGraph* g) {
  return guarded([&] {
    try {
      g->graph.capture_end();
    } catch (...) {
      abandon_pool(g);
      throw;
    }
  });
}

// Launches the recorded work on the current stream.
char* loraloom_graph_replay(LoraloomGraph* g) {
  return guarded([&] { g->graph.replay(); });
}

}  // extern "C"
