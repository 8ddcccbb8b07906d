// C glue for loraloom-mxfp4: MXFP4 weights (OpenAI's format for GPT-OSS's experts) kept packed
// and dequantized where they are used, with autograd functions whose backward pass dequantizes
// again instead of keeping the dequantized weights alive until then (a whole model's worth).
//
// Every function returns NULL on success or a malloc'd error message (free it with
// loraloom_mxfp4_error_free); no C++ exception crosses into Rust. Tensors come and go as
// tch's handles (`at::Tensor*`); a returned one is new'd here and freed by tch.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "loraloom_guarded.h"

#include <cstdlib>
#include <cstring>
#include <exception>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using loraloom::guarded;

// `blocks` [N, rows, G, 16] bytes (two E2M1 values each, the low nibble first) and `scales`
// [N, rows, G] (2^(scale - 127) per 32 values) as [N, rows, 32 G] in `table`'s type; `table`
// [256, 2] holds each byte's two values. Slices of the leading dimension of at most `chunk`
// packed bytes (or one) are dequantized at a time, which bounds the temporaries: the bytes as
// int32 indices and their values before scaling.
at::Tensor dequantize(const at::Tensor& blocks, const at::Tensor& scales, const at::Tensor& table,
                      int64_t chunk) {
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(3) == 16, "MXFP4 blocks must be [N, rows, G, 16], got ",
              blocks.sizes());
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte,
              "MXFP4 blocks and scales must be uint8");
  const int64_t n = blocks.size(0), rows = blocks.size(1), groups = blocks.size(2);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == n && scales.size(1) == rows && scales.size(2) == groups,
              "MXFP4 scales must be [N, rows, G] = [", n, ", ", rows, ", ", groups, "], got ", scales.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(0) == 256 && table.size(1) == 2, "the byte table must be [256, 2]");
  // Each byte's two values as one word, so the lookup gathers one element per byte (half the
  // time of gathering rows of two on the CPU).
  const auto kind = table.scalar_type();
  const int64_t width = at::elementSize(kind);
  TORCH_CHECK(width == 2 || width == 4, "MXFP4 dequantizes into 2- or 4-byte types, not ", kind);
  auto words = table.contiguous().view(width == 2 ? at::kInt : at::kLong).reshape({256});
  auto out = at::empty({n, rows, groups, 32}, blocks.options().dtype(kind));
  const int64_t per = std::max<int64_t>(rows * groups * 16, 1);
  const int64_t step = std::max<int64_t>(chunk / per, 1);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t len = std::min(step, n - start);
    auto bytes = blocks.narrow(0, start, len).reshape({-1}).to(at::kInt);
    auto values = words.index_select(0, bytes).view(kind).view({len, rows, groups, 32});
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
                            const at::Tensor& scales, const at::Tensor& table, const at::Tensor& offsets,
                            int64_t chunk) {
    ctx->save_for_backward({blocks, scales, table, offsets});
    ctx->saved_data["chunk"] = chunk;
    auto w = dequantize(blocks, scales, table, chunk);
    return at::_grouped_mm(x, w.transpose(1, 2), offsets);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto w = dequantize(saved[0], saved[1], saved[2], ctx->saved_data["chunk"].toInt());
    auto dx = at::_grouped_mm(grads[0].contiguous(), w, saved[3]);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// x [P, in], row p times the W of expert experts[p] (int64) (transposed): only the experts the
// rows name are dequantized, once per row.
struct GatheredMm : public torch::autograd::Function<GatheredMm> {
  static at::Tensor weights(const at::Tensor& blocks, const at::Tensor& scales, const at::Tensor& table,
                            const at::Tensor& experts, int64_t chunk) {
    return dequantize(blocks.index_select(0, experts), scales.index_select(0, experts), table, chunk);
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& blocks,
                            const at::Tensor& scales, const at::Tensor& table, const at::Tensor& experts,
                            int64_t chunk) {
    ctx->save_for_backward({blocks, scales, table, experts});
    ctx->saved_data["chunk"] = chunk;
    auto w = weights(blocks, scales, table, experts, chunk);
    // squeeze_: an output that is a view of a temporary could not be modified in place later.
    return at::bmm(x.unsqueeze(1), w.transpose(1, 2)).squeeze_(1);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto w = weights(saved[0], saved[1], saved[2], saved[3], ctx->saved_data["chunk"].toInt());
    auto dx = at::bmm(grads[0].unsqueeze(1), w).squeeze_(1);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void loraloom_mxfp4_error_free(char* error) { std::free(error); }

char* loraloom_mxfp4_dequantize(const at::Tensor* blocks, const at::Tensor* scales, const at::Tensor* table,
                                int64_t chunk, at::Tensor** out) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    *out = new at::Tensor(dequantize(*blocks, *scales, *table, chunk));
  });
}

char* loraloom_mxfp4_grouped_mm(const at::Tensor* x, const at::Tensor* blocks, const at::Tensor* scales,
                                const at::Tensor* table, const at::Tensor* offsets, int64_t chunk,
                                at::Tensor** out) {
  return guarded(
      [&] { *out = new at::Tensor(GroupedMm::apply(*x, *blocks, *scales, *table, *offsets, chunk)); });
}

char* loraloom_mxfp4_gathered_mm(const at::Tensor* x, const at::Tensor* blocks, const at::Tensor* scales,
                                 const at::Tensor* table, const at::Tensor* experts, int64_t chunk,
                                 at::Tensor** out) {
  return guarded(
      [&] { *out = new at::Tensor(GatheredMm::apply(*x, *blocks, *scales, *table, *experts, chunk)); });
}

}  // extern "C"
