// C glue over libtorch's CUDA graphs (at::cuda::CUDAGraph) for loraloom-cuda-graph.
//
// Every function returns NULL on success or a malloc'd error message (free it with
// loraloom_graph_error_free); no C++ exception crosses into Rust.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>

struct LoraloomGraph {
  at::cuda::CUDAGraph graph;
  // The stream that was current on the capturing thread before capture.
  std::optional<c10::cuda::CUDAStream> outer;
};

namespace {

char* message(const char* what) {
  char* copy = strdup(what);
  return copy != nullptr ? copy : strdup("out of memory");
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception");
  }
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

// Waits for the device, then makes a stream of libtorch's pool current on this thread (capture
// cannot use the default stream).
char* loraloom_graph_enter_stream(LoraloomGraph* g, int device) {
  return guarded([&] {
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::set_device(index);
    c10::cuda::device_synchronize();
    g->outer = c10::cuda::getCurrentCUDAStream(index);
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
  });
}

// Waits for the device, then makes the stream current before enter_stream current again.
char* loraloom_graph_leave_stream(LoraloomGraph* g) {
  return guarded([&] {
    if (g->outer) {
      c10::cuda::set_device(g->outer->device_index());
      c10::cuda::device_synchronize();
      c10::cuda::setCurrentCUDAStream(*g->outer);
      g->outer.reset();
    }
  });
}

// Starts recording this thread's work on the current stream; other threads' CUDA calls go on
// as usual (thread-local capture mode).
char* loraloom_graph_capture_begin(LoraloomGraph* g) {
  return guarded([&] { g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal); });
}

char* loraloom_graph_capture_end(LoraloomGraph* g) {
  return guarded([&] { g->graph.capture_end(); });
}

// Launches the recorded work on the current stream.
char* loraloom_graph_replay(LoraloomGraph* g) {
  return guarded([&] { g->graph.replay(); });
}

}  // extern "C"
