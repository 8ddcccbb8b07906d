// Shared by loraloom's C glue over libtorch (crates/cuda-graph, crates/mxfp4): every exported
// function runs its body through `loraloom::guarded`, which returns NULL on success or a malloc'd
// error message, so no C++ exception crosses into Rust. Each crate's build.rs puts this
// directory on the include path.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace loraloom {

// A malloc'd copy of `what` (the caller frees it).
inline char* message(const char* what) {
  char* copy = strdup(what);
  return copy != nullptr ? copy : strdup("out of memory");
}

// Runs `f`; NULL when it returns, else its exception's message (libtorch's without the C++
// backtrace it appends).
template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception");
  }
}

}  // namespace loraloom
