// A whole sequence of Elman (tanh) RNN steps, forward and backward, as one C++ loop, for training on the CPU:
//
//   forward, t = 0..T−1:   h_t = tanh(xp_t + (h_{t−1} ⊙ m) W_hhᵀ)     (the biases are in xp; PyTorch's mm or oneDNN)
//   backward, in reverse:  da_t = dh_t ⊙ (1 − h_t²) = dxp_t,  dh_{t−1} = (da_t W_hh) ⊙ m  (mm or oneDNN)
//   once:                  dW_hh = [da_0; …]ᵀ [h_{−1} ⊙ m; …]
//
// Why: measured on a 2-core AVX-512 EPYC (docs/performance.md), torch.nn.RNN's CPU training step reaches about
// half of nn.LSTM's GFLOP/s at hidden size 128 (its backward is one autograd node per step and operation), and
// a recurrent-dropout mask (which nn.RNN cannot apply) sends the cell to the Python step loop; this loop serves
// both. Packed rows as sequence.h describes.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
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

constexpr const char* kOp = "rnn_sequence";

// Per step t (rows at offset Σ n_u): h_in = h_{t−1} ⊙ m, and h_t.
struct Records {
  Tensor h_in, act;
};

// The forward of this thread's rows of every step (team.range: all of them when it works alone); the caller
// keeps the last step's final rows
template <typename T>
void forward_loop(Team& team, const Packing& pk, int64_t H, const Tensor& xp, const Tensor& h0,
                  const c10::optional<Tensor>& h_mask, const Tensor& weight, const Tensor& packed, const Tensor& out,
                  const Tensor& h_final, const Tensor& hp, Records& rec) {
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
    masked_copy(rec.h_in.data_ptr<T>() + (off + lo) * H, h + lo * H, mask_p != nullptr ? mask_p + lo * H : nullptr,
                c * H);
    T* h_out = out_p + t * B * H;
    if (c > 0) {
      Tensor hp_t = hp.narrow(0, lo, c);
      recurrent_product(hp_t, rec.h_in.narrow(0, off + lo, c), weight_t, packed, Tensor(), Tensor());
      rnn_rows_forward<T>(c, H, hp_t.data_ptr<T>(), xp_p + t * xs0 + lo * xs1, xs1, h_out + lo * H,
                          rec.act.data_ptr<T>() + (off + lo) * H);
    }
    h = h_out;
  }
}

// The backward of this thread's rows of every step; the caller finishes dh0
template <typename T>
void backward_loop(Team& team, const Packing& pk, int64_t H, const Tensor& grad_out, const Tensor& grad_final,
                   const c10::optional<Tensor>& h_mask, const Tensor& weight, const Records& rec, const Tensor& dxp,
                   const Tensor& das, const Tensor& dh_a, const Tensor& dh_b, const Tensor& packed_t) {
  const int64_t steps = pk.T, B = pk.B;
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
    T* dh_p = dh.data_ptr<T>();
    state_gradient_rows(dh_p, m, lo, hi, t, B, H, gf, go);
    m = std::max(m, n);
    if (c > 0) {
      Tensor da = das.narrow(0, off + lo, c);
      rnn_rows_backward<T>(c, H, dh_p + lo * H, rec.act.data_ptr<T>() + (off + lo) * H, da.data_ptr<T>(),
                           dxp_p != nullptr ? dxp_p + (t * B + lo) * H : nullptr, H);
      Tensor prev = dh_other.narrow(0, lo, c);
      gradient_product(prev, da, weight, packed_t);
      if (mask_p != nullptr) {
        T* pp = prev.data_ptr<T>();
        const T* mp = mask_p + lo * H;
        for (int64_t e = 0; e < c * H; ++e) pp[e] *= mp[e];
      }
    }
    std::swap(dh, dh_other);
  }
}

// → [out [T, B, H], h_T [B, H], then the records h_in, act [N, H]]
std::vector<Tensor> rnn_sequence_forward(const Tensor& xp, const Tensor& h0, const c10::optional<Tensor>& h_mask,
                                         const Tensor& weight, at::IntArrayRef active,
                                         const c10::optional<at::TensorList>& packed, int64_t parts) {
  check_step_input(kOp, xp, h0, 1);
  const int64_t T = xp.size(0), B = xp.size(1), H = h0.size(1);
  check_tensor(kOp, "h0", h0, xp);
  check_tensor(kOp, "weight", weight, xp);
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({H, H}), kOp, ": weight must be [H, H]");
  check_mask(kOp, h_mask, h0, "h0", xp);
  const Packing pk = packing(kOp, T, B, active, 0);
  const auto opts = xp.options();
  Tensor out = pk.rows.back() < B ? at::zeros({T, B, H}, opts) : at::empty({T, B, H}, opts);
  Tensor h_final = at::empty({B, H}, opts);
  Tensor hp = at::empty({B, H}, opts);
  Records rec;
  rec.h_in = at::empty({pk.N, H}, opts);
  rec.act = at::empty({pk.N, H}, opts);
  const Tensor packed_w = packed_weights(kOp, packed, {weight})[0];
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "rnn_sequence_forward", [&] {
    run_loop(parts, 0, [&](Team& team) {
      forward_loop<scalar_t>(team, pk, H, xp, h0, h_mask, weight, packed_w, out, h_final, hp, rec);
    });
    keep_final_rows(h_final.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + (T - 1) * B * H, 0, pk.rows.back(), H);
  });
  return {out, h_final, rec.h_in, rec.act};
}

// records = [h_in, act] → (dxp [T, B, H] or None, dh0 [B, H], dW_hh [H, H])
std::tuple<Tensor, Tensor, Tensor> rnn_sequence_backward(
    const c10::optional<Tensor>& grad_out, const c10::optional<Tensor>& grad_final, int64_t T, int64_t B,
    const c10::optional<Tensor>& h_mask, const Tensor& weight, at::TensorList records, at::IntArrayRef active,
    bool need_xp, const c10::optional<at::TensorList>& packed_t, int64_t parts) {
  TORCH_CHECK(records.size() == 2, kOp, ": expected 2 records");
  const Tensor packed_w_t = packed_transposed_weights(kOp, packed_t, {weight})[0];
  Records rec;
  rec.h_in = records[0];
  rec.act = records[1];
  const int64_t H = weight.size(1);
  const Packing pk = packing(kOp, T, B, active, 0);
  TORCH_CHECK(rec.h_in.size(0) == pk.N, kOp, ": the records do not match the packing");
  const auto opts = rec.act.options();
  const Tensor go = dense_or_undefined(grad_out), gf = dense_or_undefined(grad_final);
  const Tensor dxp = need_xp ? input_gradient(pk, H, opts) : Tensor();
  Tensor das = at::empty({pk.N, H}, opts);
  Tensor dh_a = at::empty({B, H}, opts), dh_b = at::empty({B, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(rec.act.scalar_type(), "rnn_sequence_backward", [&] {
    run_loop(parts, 0, [&](Team& team) {
      backward_loop<scalar_t>(team, pk, H, go, gf, h_mask, weight, rec, dxp, das, dh_a, dh_b, packed_w_t);
    });
    finish_state_gradient<scalar_t>(pk, H, gf, dh_a, dh_b, pk.T);  // one swap per step
  });
  return {dxp, dh_a, at::mm(das.t(), rec.h_in)};
}

}  // namespace
}  // namespace bnrhn_kernels

TORCH_LIBRARY_FRAGMENT(bnrhn_gates, m) {
  m.def("rnn_sequence_forward(Tensor xp, Tensor h0, Tensor? h_mask, Tensor weight, int[] active, "
        "Tensor[]? packed=None, int parts=1) -> Tensor[]");
  m.def("rnn_sequence_backward(Tensor? grad_out, Tensor? grad_final, int T, int B, Tensor? h_mask, Tensor weight, "
        "Tensor[] records, int[] active, bool need_xp, Tensor[]? packed_t=None, int parts=1) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnrhn_gates, CPU, m) {
  m.impl("rnn_sequence_forward", bnrhn_kernels::rnn_sequence_forward);
  m.impl("rnn_sequence_backward", bnrhn_kernels::rnn_sequence_backward);
}
