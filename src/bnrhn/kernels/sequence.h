// What the whole-sequence loops (highway, BN-LSTM, GRU, MUT and RNN) share: the layout of packed rows
// and the checks of their arguments.
//
// Packed rows (sorted by length, n_t rows at step t, non-increasing): every per-step record is stored in one
// buffer [N, ·] with N = Σ n_t, step t's rows at offset Σ_{u<t} n_u, so a weight gradient is one product over
// the buffer; a row that drops out keeps its state as its final state.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace bnrhn_kernels {

struct Packing {
  int64_t T = 0, B = 0, N = 0;
  std::vector<int64_t> rows, offset;  // n_t and Σ_{u<t} n_u
};

// The packing of `active` (n_t per step; empty: B at every step), every step with at least min_rows rows
// (2 where batch statistics are taken; 0 otherwise: steps past the longest sequence compute nothing)
inline Packing packing(const char* op, int64_t T, int64_t B, at::IntArrayRef active, int64_t min_rows) {
  TORCH_CHECK(T >= 1, op, ": a sequence needs at least one step");
  TORCH_CHECK(active.empty() || static_cast<int64_t>(active.size()) == T, op, ": active needs T entries");
  Packing p;
  p.T = T;
  p.B = B;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = active.empty() ? B : active[t];
    TORCH_CHECK(n >= min_rows, op, ": batch statistics need ≥ ", min_rows, " rows at every step");
    TORCH_CHECK(n >= 0 && n <= B && (t == 0 || n <= p.rows.back()), op, ": active must be non-increasing in [0, B]");
    p.offset.push_back(p.N);
    p.rows.push_back(n);
    p.N += n;
  }
  return p;
}

inline void check_tensor(const char* op, const char* what, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(), op, ": ", what,
              " must be a contiguous CPU tensor of dtype ", like.scalar_type());
}

// The step input every time loop reads by row stride: xp [T, B, G·H] of float32 or float64 on the CPU with
// contiguous rows, beside h0 [B, H]
inline void check_step_input(const char* op, const at::Tensor& xp, const at::Tensor& h0, int64_t G) {
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble, op, ": float32 or float64 only");
  TORCH_CHECK(xp.dim() == 3 && h0.dim() == 2 && h0.size(0) == xp.size(1) && xp.size(2) == G * h0.size(1),
              op, ": xp [T, B, ", (G == 1 ? std::string() : std::to_string(G)), "H], h0 [B, H]");
  TORCH_CHECK(xp.device().is_cpu() && xp.stride(2) == 1, op, ": xp must be a CPU tensor with contiguous rows");
}

// A recurrent-dropout mask, when given: a contiguous CPU tensor of xp's dtype, shaped as the state it multiplies
inline void check_mask(const char* op, const c10::optional<at::Tensor>& h_mask, const at::Tensor& state,
                       const char* state_name, const at::Tensor& like) {
  if (!h_mask.has_value()) return;
  check_tensor(op, "h_mask", *h_mask, like);
  TORCH_CHECK(h_mask->sizes() == state.sizes(), op, ": h_mask must be shaped as ", state_name);
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// rows [m, n) of a final-state gradient into dst (zeros where none came)
template <typename T>
void final_rows(T* dst, const T* grad, int64_t m, int64_t n, int64_t H) {
  if (n <= m) return;
  if (grad != nullptr) {
    std::memcpy(dst + m * H, grad + m * H, (n - m) * H * sizeof(T));
  } else {
    std::memset(dst + m * H, 0, (n - m) * H * sizeof(T));
  }
}

// Rows [n, rows) of the state entering a step end before it: their state is final (both [·, H], rows aligned)
template <typename T>
void keep_final_rows(T* final_state, const T* state, int64_t n, int64_t rows, int64_t H) {
  if (n < rows) std::memcpy(final_state + n * H, state + n * H, (rows - n) * H * sizeof(T));
}

// dst ← src ⊙ mask over count elements, or a copy of src where there is no mask (a recurrent-dropout mask on h)
template <typename T>
void masked_copy(T* dst, const T* src, const T* mask, int64_t count) {
  if (mask == nullptr) {
    std::memcpy(dst, src, count * sizeof(T));
    return;
  }
  for (int64_t e = 0; e < count; ++e) dst[e] = src[e] * mask[e];
}

// oneDNN's inner product input [n, K] · Pᵀ (+ bias, or + other [n, W]) on a weight P [W, K] it has reordered
// (mkldnn::_reorder_linear_weight; bnrhn/kernels/onednn.py decides when the loops use it). PyTorch registers the
// mkldnn ops only where it was built with oneDNN, so they are looked up by name on first use; their results are
// new tensors, which the callers below copy or add where they belong.
inline at::Tensor onednn_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         c10::string_view, c10::List<c10::optional<c10::Scalar>>,
                                         c10::optional<c10::string_view>)>();
  const c10::optional<at::Tensor> b = bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  return op.call(input, packed, b, "none", c10::List<c10::optional<c10::Scalar>>(), c10::nullopt);
}

inline at::Tensor onednn_linear_add(const at::Tensor& input, const at::Tensor& other, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, c10::string_view)>();
  return op.call(input, other, packed, c10::nullopt, "add");
}

// A forward's recurrent product, act [n, W] = input [n, K] Wᵀ (+ base [n, W], rows of a larger matrix, or + a
// bias [W]; either may be undefined): PyTorch's mm/addmm on weight_t = Wᵀ, or oneDNN's inner product on W
// reordered (`packed`)
inline void recurrent_product(at::Tensor act, const at::Tensor& input, const at::Tensor& weight_t,
                              const at::Tensor& packed, const at::Tensor& base, const at::Tensor& bias) {
  if (!packed.defined()) {
    if (base.defined()) {
      at::addmm_out(act, base, input, weight_t);
    } else if (bias.defined()) {
      at::addmm_out(act, bias, input, weight_t);
    } else {
      at::mm_out(act, input, weight_t);
    }
  } else if (base.defined() && base.is_contiguous()) {
    act.copy_(onednn_linear_add(input, base, packed));
  } else if (base.defined()) {
    act.copy_(onednn_linear(input, packed, at::Tensor())).add_(base);
  } else {
    act.copy_(onednn_linear(input, packed, bias));
  }
}

// next [n, H] += (d W) ⊙ m: the gradient through a recurrent product (h ⊙ m) Wᵀ. d W is PyTorch's mm (one addmm
// where there is no mask; else into scratch [≥ n, H]) or oneDNN's inner product on Wᵀ reordered (`packed_t`)
template <typename T>
void add_masked_product(at::Tensor next, const at::Tensor& d, const at::Tensor& weight, const T* mask,
                        const at::Tensor& scratch, const at::Tensor& packed_t = at::Tensor()) {
  at::Tensor product;
  if (packed_t.defined()) {
    product = onednn_linear(d, packed_t, at::Tensor());
    if (mask == nullptr) {
      next.add_(product);
      return;
    }
  } else if (mask == nullptr) {
    next.addmm_(d, weight);
    return;
  } else {
    product = scratch.narrow(0, 0, next.size(0));
    at::mm_out(product, d, weight);
  }
  const T* pp = product.data_ptr<T>();
  T* np = next.data_ptr<T>();
  for (int64_t e = 0; e < next.numel(); ++e) np[e] += pp[e] * mask[e];
}

// out [n, K] = d [n, W] W, the gradient through a product input Wᵀ: PyTorch's mm, or oneDNN's inner product on
// Wᵀ reordered (`packed_t`)
inline void gradient_product(at::Tensor out, const at::Tensor& d, const at::Tensor& weight,
                             const at::Tensor& packed_t) {
  if (packed_t.defined()) {
    out.copy_(onednn_linear(d, packed_t, at::Tensor()));
  } else {
    at::mm_out(out, d, weight);
  }
}

// The optional reordered weights of a loop (none, or one per weight, each of its weight's shape), checked. Weights
// of one shape (MUT's [H, H] ones, a weight and its transpose when square) cannot be told apart here: their order
// and direction are the caller's to get right (bnrhn/kernels/onednn.py packs them in the loops' order).
inline std::vector<at::Tensor> packed_weights(const char* op, const c10::optional<at::TensorList>& packed,
                                              at::TensorList weights, const char* role = "weight") {
  std::vector<at::Tensor> out(weights.size());
  if (!packed.has_value()) return out;
  TORCH_CHECK(packed->size() == weights.size(), op, ": expected ", weights.size(), " packed weights, got ",
              packed->size());
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].scalar_type() == at::kFloat, op, ": packed (oneDNN) weights serve float32 tensors only");
    TORCH_CHECK((*packed)[i].sizes() == weights[i].sizes(), op, ": packed ", role, " ", i, " has shape ",
                (*packed)[i].sizes(), ", the ", role, " ", weights[i].sizes());
    out[i] = (*packed)[i];
  }
  return out;
}

// The backward's optional reordered weights: one per weight's transpose Wᵀ (the products d W), checked against it
inline std::vector<at::Tensor> packed_transposed_weights(const char* op, const c10::optional<at::TensorList>& packed_t,
                                                         at::TensorList weights) {
  std::vector<at::Tensor> transposed;
  for (const at::Tensor& w : weights) transposed.push_back(w.t());
  return packed_weights(op, packed_t, transposed, "transposed weight");
}

// A gradient input given or not (as a contiguous tensor, or undefined)
inline at::Tensor dense_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// ∂L/∂xp [T, B, P] for the backward to fill row by row: zeros where rows end before the last step
inline at::Tensor input_gradient(const Packing& pk, int64_t P, const at::TensorOptions& opts) {
  return pk.rows.back() < pk.B ? at::zeros({pk.T, pk.B, P}, opts) : at::empty({pk.T, pk.B, P}, opts);
}

// The state's gradient as step t's backward starts, in rows [lo, hi) of ds [≥ n, H], whose first m rows are in use:
// rows [m, hi) take the final state's gradient (their last step is t), then every row adds the output's gradient
template <typename T>
void state_gradient_rows(T* ds, int64_t m, int64_t lo, int64_t hi, int64_t t, int64_t B, int64_t H,
                         const T* grad_final, const T* grad_out) {
  final_rows(ds, grad_final, std::max(lo, m), hi, H);
  if (grad_out != nullptr) {
    const T* g = grad_out + t * B * H;
    for (int64_t e = lo * H; e < hi * H; ++e) ds[e] += g[e];
  }
}

// After a backward loop that swapped its two state-gradient buffers `swaps` times (once per step, or per step and
// layer): the rows that never ran (no step) take the final state's gradient, h0 being their final state, and the
// caller reads ∂L/∂h0 from dh_a
template <typename T>
void finish_state_gradient(const Packing& pk, int64_t H, const at::Tensor& grad_final, const at::Tensor& dh_a,
                           const at::Tensor& dh_b, int64_t swaps) {
  const at::Tensor& dh = swaps % 2 == 0 ? dh_a : dh_b;
  final_rows(dh.data_ptr<T>(), grad_final.defined() ? grad_final.data_ptr<T>() : nullptr, pk.rows.front(), pk.B, H);
  if (dh.data_ptr() != dh_a.data_ptr()) dh_a.copy_(dh);
}

}  // namespace bnrhn_kernels
