// A whole sequence of GRU steps (PyTorch's form, Cho et al. 2014), forward and backward, as one C++ loop, for
// training on the CPU (row_kernels.h has the step's equations):
//
//   forward, t = 0..T−1:   hp = (h_{t−1} ⊙ m) W_hhᵀ + b_hh                (PyTorch's addmm, or oneDNN: sequence.h)
//                          r, z, n from xp_t and hp;  h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}
//   backward, in reverse:  dhp, dxp_t, dh ⊙ z from dh_t;  dh_{t−1} = dh ⊙ z + (dhp W_hh) ⊙ m    (addmm or oneDNN)
//   once:                  dW_hh = [dhp_0; …]ᵀ [h_{−1} ⊙ m; …],  db_hh = Σ dhp
//
// Why: measured on a 2-core AVX-512 EPYC (docs/performance.md), torch.nn.GRU's CPU training step reaches
// ~0.6–0.7× nn.LSTM's GFLOP/s at hidden size 128, and a recurrent-dropout mask (which nn.GRU cannot apply)
// sends the cell to the Python step loop; this loop serves both. Packed rows as sequence.h describes.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "row_kernels.h"
#include "sequence.h"

namespace bnrhn_kernels {
namespace {

using at::Tensor;

constexpr const char* kOp = "gru_sequence";

// Per step t (rows at offset Σ n_u): h_in = h_{t−1} ⊙ m, h_{t−1}, the activations [r, z, n], hp_n.
struct Records {
  Tensor h_in, h_prev, act, hpn;
};

// The forward of this thread's rows of every step (team.range: all of them when it works alone); the caller
// keeps the last step's final rows
template <typename T>
void forward_loop(Team& team, const Packing& pk, int64_t H, const Tensor& xp, const Tensor& h0,
                  const c10::optional<Tensor>& h_mask, const Tensor& weight, const c10::optional<Tensor>& bias,
                  const Tensor& packed, const Tensor& out, const Tensor& h_final, Records& rec) {
  const int64_t steps = pk.T, B = pk.B;
  const Tensor weight_t = weight.t();
  const T* xp_p = xp.data_ptr<T>();
  const int64_t xs0 = xp.stride(0), xs1 = xp.stride(1);
  const T* mask_p = ptr_or_null<T>(h_mask);
  T* out_p = out.data_ptr<T>();
  T* hf = h_final.data_ptr<T>();
  const T* h = h0.data_ptr<T>();  // the state entering step t, ≥ n_t rows
  int64_t rows_in = B;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t n = pk.rows[t], off = pk.offset[t];
    team.enter_step(n);
    if (team.leader()) keep_final_rows(hf, h, n, rows_in, H);  // rows ending before step t
    rows_in = n;
    const auto [lo, hi] = team.range(n);
    const int64_t c = hi - lo;
    T* h_prev = rec.h_prev.data_ptr<T>() + (off + lo) * H;
    std::memcpy(h_prev, h + lo * H, c * H * sizeof(T));
    masked_copy(rec.h_in.data_ptr<T>() + (off + lo) * H, h_prev, mask_p != nullptr ? mask_p + lo * H : nullptr,
                c * H);
    T* h_out = out_p + t * B * H;
    if (c > 0) {
      Tensor act = rec.act.narrow(0, off + lo, c);
      recurrent_product(act, rec.h_in.narrow(0, off + lo, c), weight_t, packed, Tensor(),
                        bias.has_value() ? *bias : Tensor());
      gru_rows_forward<T>(c, H, act.data_ptr<T>(), xp_p + t * xs0 + lo * xs1, xs1, h_prev, h_out + lo * H,
                          rec.hpn.data_ptr<T>() + (off + lo) * H);
    }
    h = h_out;
  }
}

// The backward of this thread's rows of every step; the caller finishes dh0
template <typename T>
void backward_loop(Team& team, const Packing& pk, int64_t H, const Tensor& grad_out, const Tensor& grad_final,
                   const c10::optional<Tensor>& h_mask, const Tensor& weight, const Records& rec, const Tensor& dxp,
                   const Tensor& dhps, const Tensor& dh_a, const Tensor& dh_b, const Tensor& product,
                   const Tensor& packed_t) {
  const int64_t steps = pk.T, B = pk.B, H3 = 3 * H;
  const T* go = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  const T* gf = grad_final.defined() ? grad_final.data_ptr<T>() : nullptr;
  const T* mask_p = ptr_or_null<T>(h_mask);
  T* dxp_p = dxp.defined() ? dxp.data_ptr<T>() : nullptr;
  Tensor dh = dh_a, dh_other = dh_b;  // ∂L/∂h_t, and ∂L/∂h_{t−1} being computed
  int64_t m = 0;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t n = pk.rows[t], off = pk.offset[t];
    team.enter_step(n);
    const auto [lo, hi] = team.range(n);
    const int64_t c = hi - lo;
    T* dhp_ = dh.data_ptr<T>();
    state_gradient_rows(dhp_, m, lo, hi, t, B, H, gf, go);
    m = std::max(m, n);
    if (c > 0) {
      gru_rows_backward<T>(c, H, dhp_ + lo * H, rec.act.data_ptr<T>() + (off + lo) * H3,
                           rec.hpn.data_ptr<T>() + (off + lo) * H, rec.h_prev.data_ptr<T>() + (off + lo) * H,
                           dhps.data_ptr<T>() + (off + lo) * H3,
                           dxp_p != nullptr ? dxp_p + (t * B + lo) * H3 : nullptr, H3, dh_other.data_ptr<T>() + lo * H);
      add_masked_product<T>(dh_other.narrow(0, lo, c), dhps.narrow(0, off + lo, c), weight,
                            mask_p != nullptr ? mask_p + lo * H : nullptr,
                            product.defined() ? product.narrow(0, lo, c) : product, packed_t);
    }
    std::swap(dh, dh_other);
  }
}

// → [out [T, B, H], h_T [B, H], then the records h_in, h_prev [N, H], act [N, 3H], hpn [N, H]]
std::vector<Tensor> gru_sequence_forward(const Tensor& xp, const Tensor& h0, const c10::optional<Tensor>& h_mask,
                                         const Tensor& weight, const c10::optional<Tensor>& bias,
                                         at::IntArrayRef active, const c10::optional<at::TensorList>& packed,
                                         int64_t parts) {
  check_step_input(kOp, xp, h0, 3);
  const int64_t T = xp.size(0), B = xp.size(1), H = h0.size(1);
  check_tensor(kOp, "h0", h0, xp);
  check_tensor(kOp, "weight", weight, xp);
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({3 * H, H}), kOp, ": weight must be [3H, H]");
  if (bias.has_value()) {
    check_tensor(kOp, "bias", *bias, xp);
    TORCH_CHECK(bias->numel() == 3 * H, kOp, ": bias must have 3H entries");
  }
  check_mask(kOp, h_mask, h0, "h0", xp);
  const Packing pk = packing(kOp, T, B, active, 0);
  const auto opts = xp.options();
  Tensor out = pk.rows.back() < B ? at::zeros({T, B, H}, opts) : at::empty({T, B, H}, opts);
  Tensor h_final = at::empty({B, H}, opts);
  Records rec;
  rec.h_in = at::empty({pk.N, H}, opts);
  rec.h_prev = at::empty({pk.N, H}, opts);
  rec.act = at::empty({pk.N, 3 * H}, opts);
  rec.hpn = at::empty({pk.N, H}, opts);
  const Tensor packed_w = packed_weights(kOp, packed, {weight})[0];
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "gru_sequence_forward", [&] {
    run_loop(parts, 0, [&](Team& team) {
      forward_loop<scalar_t>(team, pk, H, xp, h0, h_mask, weight, bias, packed_w, out, h_final, rec);
    });
    keep_final_rows(h_final.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + (T - 1) * B * H, 0, pk.rows.back(), H);
  });
  return {out, h_final, rec.h_in, rec.h_prev, rec.act, rec.hpn};
}

// records = [h_in, h_prev, act, hpn] → (dxp [T, B, 3H] or None, dh0 [B, H], dW_hh [3H, H], db_hh [3H])
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_sequence_backward(
    const c10::optional<Tensor>& grad_out, const c10::optional<Tensor>& grad_final, int64_t T, int64_t B,
    const c10::optional<Tensor>& h_mask, const Tensor& weight, at::TensorList records, at::IntArrayRef active,
    bool need_xp, const c10::optional<at::TensorList>& packed_t, int64_t parts) {
  TORCH_CHECK(records.size() == 4, kOp, ": expected 4 records");
  const Tensor packed_w_t = packed_transposed_weights(kOp, packed_t, {weight})[0];
  Records rec;
  rec.h_in = records[0];
  rec.h_prev = records[1];
  rec.act = records[2];
  rec.hpn = records[3];
  const int64_t H = weight.size(1);
  const Packing pk = packing(kOp, T, B, active, 0);
  TORCH_CHECK(rec.h_in.size(0) == pk.N, kOp, ": the records do not match the packing");
  const auto opts = rec.act.options();
  const Tensor go = dense_or_undefined(grad_out), gf = dense_or_undefined(grad_final);
  const Tensor dxp = need_xp ? input_gradient(pk, 3 * H, opts) : Tensor();
  Tensor dhps = at::empty({pk.N, 3 * H}, opts);
  Tensor dh_a = at::empty({B, H}, opts), dh_b = at::empty({B, H}, opts);
  const Tensor product = h_mask.has_value() ? at::empty({B, H}, opts) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(rec.act.scalar_type(), "gru_sequence_backward", [&] {
    run_loop(parts, 0, [&](Team& team) {
      backward_loop<scalar_t>(team, pk, H, go, gf, h_mask, weight, rec, dxp, dhps, dh_a, dh_b, product, packed_w_t);
    });
    finish_state_gradient<scalar_t>(pk, H, gf, dh_a, dh_b, pk.T);  // one swap per step
  });
  return {dxp, dh_a, at::mm(dhps.t(), rec.h_in), dhps.sum(at::IntArrayRef{0})};
}

}  // namespace
}  // namespace bnrhn_kernels

TORCH_LIBRARY_FRAGMENT(bnrhn_gates, m) {
  m.def("gru_sequence_forward(Tensor xp, Tensor h0, Tensor? h_mask, Tensor weight, Tensor? bias, int[] active, Tensor[]? packed=None, "
        "int parts=1) -> Tensor[]");
  m.def("gru_sequence_backward(Tensor? grad_out, Tensor? grad_final, int T, int B, Tensor? h_mask, Tensor weight, "
        "Tensor[] records, int[] active, bool need_xp, Tensor[]? packed_t=None, int parts=1) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnrhn_gates, CPU, m) {
  m.impl("gru_sequence_forward", bnrhn_kernels::gru_sequence_forward);
  m.impl("gru_sequence_backward", bnrhn_kernels::gru_sequence_backward);
}
