// C glue for loraloom-mxfp4: MXFP4 weights (OpenAI's format for GPT-OSS's experts) kept packed
// and dequantized where they are used, with autograd functions whose backward pass dequantizes
// again instead of keeping the dequantized weights alive until then (a whole model's worth).
//
// Every function returns NULL on success or a malloc'd error message (free it with
// loraloom_mxfp4_error_free); no C++ exception crosses into Rust. Tensors come and go as
// tch's handles (`at::Tensor*`); a returned one is new'd here and freed by tch.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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

// Packed bytes dequantized per slice of the leading dimension: bounds the int32 copy of the
// bytes that indexes the table (4 bytes per byte).
constexpr int64_t kChunkBytes = int64_t{1} << 26;

// `blocks` [N, rows, G, 16] bytes (two E2M1 values each, the low nibble first) and `scales`
// [N, rows, G] (2^(scale - 127) per 32 values) as [N, rows, 32 G] in `table`'s type; `table`
// [256, 2] holds each byte's two values.
at::Tensor dequantize(const at::Tensor& blocks, const at::Tensor& scales, const at::Tensor& table) {
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(3) == 16, "MXFP4 blocks must be [N, rows, G, 16], got ",
              blocks.sizes());
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte,
              "MXFP4 blocks and scales must be uint8");
  const int64_t n = blocks.size(0), rows = blocks.size(1), groups = blocks.size(2);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == n && scales.size(1) == rows && scales.size(2) == groups,
              "MXFP4 scales must be [N, rows, G] = [", n, ", ", rows, ", ", groups, "], got ", scales.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(0) == 256 && table.size(1) == 2, "the byte table must be [256, 2]");
  auto out = at::empty({n, rows, groups, 32}, blocks.options().dtype(table.scalar_type()));
  const int64_t per = std::max<int64_t>(rows * groups * 16, 1);
  const int64_t step = std::max<int64_t>(kChunkBytes / per, 1);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t len = std::min(step, n - start);
    auto bytes = blocks.narrow(0, start, len).reshape({-1}).to(at::kInt);
    auto values = table.index_select(0, bytes).view({len, rows, groups, 32});
    auto power = at::exp2(scales.narrow(0, start, len).to(table.scalar_type()) - 127).unsqueeze(-1);
    auto slice = out.narrow(0, start, len);
    at::mul_out(slice, values, power);
  }
  return out.view({n, rows, groups * 32});
}

// x [rows, in] times each expert's W [E, out, in] (transposed), expert e taking its run of
// rows ending at offsets[e] (int32, as `_grouped_mm` takes them).
struct GroupedMm : public torch::autograd::Function<GroupedMm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& blocks,
                            const at::Tensor& scales, const at::Tensor& table, const at::Tensor& offsets) {
    ctx->save_for_backward({blocks, scales, table, offsets});
    auto w = dequantize(blocks, scales, table);
    return at::_grouped_mm(x, w.transpose(1, 2), offsets);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto w = dequantize(saved[0], saved[1], saved[2]);
    auto dx = at::_grouped_mm(grads[0].contiguous(), w, saved[3]);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// x [P, in], row p times the W of expert experts[p] (int64) (transposed): only the experts the
// rows name are dequantized, once per row.
struct GatheredMm : public torch::autograd::Function<GatheredMm> {
  static at::Tensor weights(const at::Tensor& blocks, const at::Tensor& scales, const at::Tensor& table,
                            const at::Tensor& experts) {
    return dequantize(blocks.index_select(0, experts), scales.index_select(0, experts), table);
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& blocks,
                            const at::Tensor& scales, const at::Tensor& table, const at::Tensor& experts) {
    ctx->save_for_backward({blocks, scales, table, experts});
    auto w = weights(blocks, scales, table, experts);
    return at::bmm(x.unsqueeze(1), w.transpose(1, 2)).squeeze(1);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto w = weights(saved[0], saved[1], saved[2], saved[3]);
    auto dx = at::bmm(grads[0].unsqueeze(1), w).squeeze(1);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void loraloom_mxfp4_error_free(char* error) { std::free(error); }

char* loraloom_mxfp4_dequantize(const at::Tensor* blocks, const at::Tensor* scales, const at::Tensor* table,
                                at::Tensor** out) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    *out = new at::Tensor(dequantize(*blocks, *scales, *table));
  });
}

char* loraloom_mxfp4_grouped_mm(const at::Tensor* x, const at::Tensor* blocks, const at::Tensor* scales,
                                const at::Tensor* table, const at::Tensor* offsets, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(GroupedMm::apply(*x, *blocks, *scales, *table, *offsets)); });
}

char* loraloom_mxfp4_gathered_mm(const at::Tensor* x, const at::Tensor* blocks, const at::Tensor* scales,
                                 const at::Tensor* table, const at::Tensor* experts, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(GatheredMm::apply(*x, *blocks, *scales, *table, *experts)); });
}

}  // extern "C"
