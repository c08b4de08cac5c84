// Shared by the device kernels of the raw ops defined in max_sim.cpp.
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace transmatcher_fast {

// Defensive checks: the Python layer validates user input with friendlier errors; these guard
// direct calls of torch.ops.transmatcher_fast_C.*.
inline void check_kernel_inputs(const at::Tensor& query, const at::Tensor& gallery,
                                const std::optional<at::Tensor>& score_embed) {
  TORCH_CHECK(query.dim() == 3 && gallery.dim() == 3,
              "max_sim kernel: query and gallery must be 3-D, got ", query.sizes(), " and ",
              gallery.sizes());
  TORCH_CHECK(query.size(2) == gallery.size(2), "max_sim kernel: feature size mismatch, query ",
              query.sizes(), " gallery ", gallery.sizes());
  TORCH_CHECK(query.scalar_type() == gallery.scalar_type(),
              "max_sim kernel: query and gallery dtypes differ");
  TORCH_CHECK(query.is_contiguous() && gallery.is_contiguous(),
              "max_sim kernel: inputs must be contiguous");
  if (score_embed.has_value()) {
    TORCH_CHECK(score_embed->dim() == 2 && score_embed->size(0) == gallery.size(1) &&
                    score_embed->size(1) == query.size(1),
                "max_sim kernel: score_embed must be [Lg, Lq] = [", gallery.size(1), ", ",
                query.size(1), "], got ", score_embed->sizes());
  }
}

inline void check_output(const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype,
                         const char* name) {
  TORCH_CHECK(out.sizes() == shape && out.scalar_type() == dtype && out.is_contiguous(),
              "max_sim kernel: ", name, " must be a contiguous ", dtype, " tensor of shape ",
              shape, ", got ", out.scalar_type(), " ", out.sizes());
}

}  // namespace transmatcher_fast
