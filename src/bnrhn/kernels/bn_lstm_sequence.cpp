// A whole sequence of BN-LSTM steps (Cooijmans et al. 2016), forward and backward, as one C++ loop: what
// bnrhn/cells/bn_lstm.py's BNLSTMSequence does in Python, for every configuration in which no step reads
// population statistics that an earlier step of the same sequence updates. Same equations (row_kernels.h has
// the gates' and the batch norm's):
//
//   forward, t = 0..T−1:   r = (h_{t−1} ⊙ m) W_hᵀ                          (PyTorch's mm, or oneDNN: sequence.h)
//                          [i, f, g, o] = BN(r; γ_h) + xp_t,   c = σ(f) c_{t−1} + σ(i) tanh(g)
//                          ĉ = BN(c; γ_c, β_c),   h_t = σ(o) tanh(ĉ),   c_t = c (or ĉ: carry_norm="recurrence")
//   backward, in reverse:  dĉ = dh σ(o)(1 − tanh² ĉ) (+ dc_t),  dc = BN′(dĉ) (+ dc_t),  dc_{t−1} = dc σ(f)
//                          d[i, f, g, o] = the gates' derivatives,  dxp_t = d[i, f, g, o],  dr = BN′(d[i, f, g, o])
//                          dh_{t−1} = (dr W_h) ⊙ m                         (PyTorch's mm, or oneDNN: sequence.h)
//   once:                  dW_h = [dr_0; …; dr_{T−1}]ᵀ [h_{−1} ⊙ m; …]
// with batch renormalization's r and d (Ioffe 2017) inside each BN where the population terms are given.
// Why in C++: as highway_sequence.cpp (one product and a few passes of row kernels per step, no tensor
// operations around them).

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

constexpr const char* kOp = "bn_lstm_sequence";

// What the forward keeps for the backward, and the batch statistics it hands back. Per step t (rows at offset
// Σ n_u): h_in = h_{t−1} ⊙ m, the activations [σi, σf, tanh g, σo], x̂ of r and of c, c_{t−1}, tanh ĉ;
// per step: the statistics of both norms (and r, d with renormalization).
struct Records {
  Tensor h_in, act, xhat_h, c_prev, xhat_c, tanh_c;                 // [N, H] or [N, 4H]
  Tensor mean_h, var_h, invstd_h, mean_c, var_c, invstd_c, r_h, d_h, r_c, d_c;  // [T, 4H] or [T, H]
};

template <typename T>
ColumnNorm<T> norm_of(const Records& rec, bool recurrent, const Tensor& gamma, const T* beta,
                      const c10::optional<Tensor>& bounds, int64_t t, int64_t off, int64_t steps) {
  const Tensor& invstd = recurrent ? rec.invstd_h : rec.invstd_c;
  const int64_t W = invstd.size(1);
  auto at_step = [&](const Tensor& x) { return x.defined() ? x.data_ptr<T>() + t * W : nullptr; };
  ColumnNorm<T> g;
  g.width = W;
  g.gamma = gamma.data_ptr<T>();
  g.beta = beta;
  g.xhat = (recurrent ? rec.xhat_h : rec.xhat_c).data_ptr<T>() + off * W;
  g.mean = at_step(recurrent ? rec.mean_h : rec.mean_c);
  g.var = at_step(recurrent ? rec.var_h : rec.var_c);
  g.invstd = at_step(invstd);
  g.stride = steps * W;
  g.bounds = bounds.has_value() ? bounds->data_ptr<T>() + t * W : nullptr;
  g.r = at_step(recurrent ? rec.r_h : rec.r_c);
  g.d = at_step(recurrent ? rec.d_h : rec.d_c);
  return g;
}

// The forward of this thread's rows of every step (team.range: all of them when it works alone; the batch norms'
// statistics are the team's); the caller keeps the last step's final rows. r, c_buf and c_hat: scratch [B, ·]
template <typename T>
void forward_loop(Team& team, const Packing& pk, int64_t H, const Tensor& xp, const Tensor& h0, const Tensor& c0,
                  const c10::optional<Tensor>& h_mask, const Tensor& weight, const Tensor& gamma_h,
                  const Tensor& gamma_c, const Tensor& beta_c, bool carry_normed, double eps,
                  const c10::optional<Tensor>& renorm_h, const c10::optional<Tensor>& renorm_c, const Tensor& packed,
                  const Tensor& out, const Tensor& h_final, const Tensor& c_final, const Tensor& r,
                  const Tensor& c_buf, const Tensor& c_hat, Records& rec) {
  const int64_t steps = pk.T, B = pk.B, H4 = 4 * H;
  const Tensor weight_t = weight.t();
  const T* xp_p = xp.data_ptr<T>();
  const int64_t xs0 = xp.stride(0), xs1 = xp.stride(1);
  const T* mask_p = ptr_or_null<T>(h_mask);
  T* out_p = out.data_ptr<T>();
  T* hf = h_final.data_ptr<T>();
  T* cf = c_final.data_ptr<T>();
  T* h_in_p = rec.h_in.data_ptr<T>();
  const T* h = h0.data_ptr<T>();  // the state entering step t, ≥ n_t rows
  const T* c = c0.data_ptr<T>();
  int64_t rows_in = B;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t n = pk.rows[t], off = pk.offset[t];
    team.enter_step(n);
    if (team.leader()) {  // rows ending before step t
      keep_final_rows(hf, h, n, rows_in, H);
      keep_final_rows(cf, c, n, rows_in, H);
    }
    rows_in = n;
    const auto [lo, hi] = team.range(n);
    const int64_t nr = hi - lo;  // this thread's rows lo..hi−1 of the step's n
    masked_copy(h_in_p + (off + lo) * H, h + lo * H, mask_p != nullptr ? mask_p + lo * H : nullptr, nr * H);
    if (nr > 0) recurrent_product(r.narrow(0, lo, nr), rec.h_in.narrow(0, off + lo, nr), weight_t, packed, Tensor(),
                                  Tensor());
    T* act = rec.act.data_ptr<T>() + off * H4;  // the step's first row
    normalise_forward<T>(team, n, r.data_ptr<T>(), H4, act, H4,
                         norm_of<T>(rec, true, gamma_h, nullptr, renorm_h, t, off, steps), eps);
    T* c_prev = rec.c_prev.data_ptr<T>() + off * H;
    std::memcpy(c_prev + lo * H, c + lo * H, nr * H * sizeof(T));
    T* c_new = c_buf.data_ptr<T>();
    lstm_gates_rows_forward<T>(nr, H, act + lo * H4, c_prev + lo * H, c_new + lo * H, xp_p + t * xs0 + lo * xs1, xs1);
    T* ch = c_hat.data_ptr<T>();
    normalise_forward<T>(team, n, c_new, H, ch, H,
                         norm_of<T>(rec, false, gamma_c, beta_c.data_ptr<T>(), renorm_c, t, off, steps), eps);
    T* h_out = out_p + t * B * H;
    lstm_output_rows_forward<T>(nr, H, act + lo * H4, ch + lo * H, h_out + lo * H,
                                rec.tanh_c.data_ptr<T>() + (off + lo) * H);
    h = h_out;
    c = carry_normed ? ch : c_new;
  }
}

template <typename T>
void add_rows(T* dst, const T* src, int64_t count) {
  for (int64_t e = 0; e < count; ++e) dst[e] += src[e];
}

// The backward of this thread's rows of every step (the batch norms' sums are the team's; its leader adds dγ
// and dβ); the caller finishes dh0 and dc0. dc_other and dc_hat: scratch [B, H]
template <typename T>
void backward_loop(Team& team, const Packing& pk, int64_t H, const Tensor& grad_out, const Tensor& grad_h,
                   const Tensor& grad_c, const c10::optional<Tensor>& h_mask, const Tensor& weight,
                   const Tensor& gamma_h, const Tensor& gamma_c, bool carry_normed, const Records& rec,
                   const Tensor& dxp, const Tensor& drs, const Tensor& dh, const Tensor& dc, const Tensor& dc_other_buf,
                   const Tensor& dc_hat, const Tensor& dgamma_h, const Tensor& dgamma_c, const Tensor& dbeta_c,
                   const Tensor& packed_t) {
  const int64_t steps = pk.T, B = pk.B, H4 = 4 * H;
  const T* go = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  const T* gh = grad_h.defined() ? grad_h.data_ptr<T>() : nullptr;
  const T* gc = grad_c.defined() ? grad_c.data_ptr<T>() : nullptr;
  const T* mask_p = ptr_or_null<T>(h_mask);
  Tensor dc_cur = dc, dc_other = dc_other_buf;  // ∂L/∂c_t; the step writes ∂L/∂c_{t−1} into the other buffer
  T* dh_p = dh.data_ptr<T>();
  T* dch = dc_hat.data_ptr<T>();
  T* dxp_p = dxp.defined() ? dxp.data_ptr<T>() : nullptr;
  const c10::optional<Tensor> no_bounds;
  int64_t m = 0;  // rows of dh and dc in use
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t n = pk.rows[t], off = pk.offset[t];
    team.enter_step(n);
    const auto [lo, hi] = team.range(n);
    const int64_t nr = hi - lo;  // this thread's rows lo..hi−1 of the step's n
    final_rows(dc_cur.data_ptr<T>(), gc, std::max(lo, m), hi, H);  // rows whose last step is t (c: no output gradient)
    state_gradient_rows(dh_p, m, lo, hi, t, B, H, gh, go);
    m = std::max(m, n);
    const T* act = rec.act.data_ptr<T>() + (off + lo) * H4;
    const T* tc = rec.tanh_c.data_ptr<T>() + (off + lo) * H;
    const T* dcv = dc_cur.data_ptr<T>() + lo * H;
    lstm_output_rows_backward<T>(nr, H, dh_p + lo * H, act, tc, dch + lo * H);
    if (carry_normed) add_rows(dch + lo * H, dcv, nr * H);
    normalise_backward<T>(team, n, dch, H, norm_of<T>(rec, false, gamma_c, nullptr, no_bounds, t, off, steps),
                          dgamma_c.data_ptr<T>(), dbeta_c.data_ptr<T>());
    if (!carry_normed) add_rows(dch + lo * H, dcv, nr * H);
    T* dgates = drs.data_ptr<T>() + off * H4;  // the step's first row
    lstm_gates_rows_backward<T>(nr, H, dch + lo * H, dh_p + lo * H, act, rec.c_prev.data_ptr<T>() + (off + lo) * H,
                                tc, dgates + lo * H4, dc_other.data_ptr<T>() + lo * H);
    if (dxp_p != nullptr) {  // dxp is stored batch-major, [B, T, 4H]: row b of step t at (b T + t) 4H
      for (int64_t b = lo; b < hi; ++b) std::memcpy(dxp_p + (b * steps + t) * H4, dgates + b * H4, H4 * sizeof(T));
    }
    normalise_backward<T>(team, n, dgates, H4, norm_of<T>(rec, true, gamma_h, nullptr, no_bounds, t, off, steps),
                          dgamma_h.data_ptr<T>(), nullptr);
    if (nr > 0) {
      gradient_product(dh.narrow(0, lo, nr), drs.narrow(0, off + lo, nr), weight, packed_t);  // dh_{t−1} = dr W_h
      if (mask_p != nullptr) {                                                              // (⊙ m)
        const T* mp = mask_p + lo * H;
        for (int64_t e = lo * H; e < hi * H; ++e) dh_p[e] *= mp[e - lo * H];
      }
    }
    std::swap(dc_cur, dc_other);
  }
}

// → [out [T, B, H], h_T, c_T [B, H], then the records: h_in, act, xhat_h, c_prev, xhat_c, tanh_c [N, ·],
//    mean_h, var_h, invstd_h [T, 4H], mean_c, var_c, invstd_c [T, H], r_h, d_h, r_c, d_c (empty without renorm)]
std::vector<Tensor> bn_lstm_sequence_forward(const Tensor& xp, const Tensor& h0, const Tensor& c0,
                                             const c10::optional<Tensor>& h_mask, const Tensor& weight,
                                             const Tensor& gamma_h, const Tensor& gamma_c, const Tensor& beta_c,
                                             bool carry_normed, double eps, at::IntArrayRef active,
                                             const c10::optional<Tensor>& renorm_h,
                                             const c10::optional<Tensor>& renorm_c,
                                             const c10::optional<at::TensorList>& packed, int64_t parts) {
  check_step_input(kOp, xp, h0, 4);
  const int64_t T = xp.size(0), B = xp.size(1), H = h0.size(1);
  check_tensor(kOp, "h0", h0, xp);
  check_tensor(kOp, "c0", c0, xp);
  check_tensor(kOp, "weight", weight, xp);
  check_tensor(kOp, "gamma_h", gamma_h, xp);
  check_tensor(kOp, "gamma_c", gamma_c, xp);
  check_tensor(kOp, "beta_c", beta_c, xp);
  TORCH_CHECK(c0.sizes() == h0.sizes() && weight.sizes() == at::IntArrayRef({4 * H, H}) && gamma_h.numel() == 4 * H &&
                  gamma_c.numel() == H && beta_c.numel() == H,
              kOp, ": expected c0 [B, H], weight [4H, H], γ_h [4H], γ_c and β_c [H]");
  check_mask(kOp, h_mask, h0, "h0", xp);
  TORCH_CHECK(renorm_h.has_value() == renorm_c.has_value(), kOp, ": both norms renormalise or neither");
  if (renorm_h.has_value()) {
    check_tensor(kOp, "renorm_h", *renorm_h, xp);
    check_tensor(kOp, "renorm_c", *renorm_c, xp);
    TORCH_CHECK(renorm_h->sizes() == at::IntArrayRef({5, T, 4 * H}) && renorm_c->sizes() == at::IntArrayRef({5, T, H}),
                kOp, ": renorm_h must be [5, T, 4H] and renorm_c [5, T, H]");
  }
  const Packing pk = packing(kOp, T, B, active, 2);
  const auto opts = xp.options();
  Tensor out = pk.rows.back() < B ? at::zeros({T, B, H}, opts) : at::empty({T, B, H}, opts);
  Tensor h_final = at::empty({B, H}, opts), c_final = at::empty({B, H}, opts);
  Records rec;
  rec.h_in = at::empty({pk.N, H}, opts);
  rec.act = at::empty({pk.N, 4 * H}, opts);
  rec.xhat_h = at::empty({pk.N, 4 * H}, opts);
  rec.c_prev = at::empty({pk.N, H}, opts);
  rec.xhat_c = at::empty({pk.N, H}, opts);
  rec.tanh_c = at::empty({pk.N, H}, opts);
  for (Tensor* x : {&rec.mean_h, &rec.var_h, &rec.invstd_h}) *x = at::empty({T, 4 * H}, opts);
  for (Tensor* x : {&rec.mean_c, &rec.var_c, &rec.invstd_c}) *x = at::empty({T, H}, opts);
  if (renorm_h.has_value()) {
    rec.r_h = at::empty({T, 4 * H}, opts);
    rec.d_h = at::empty({T, 4 * H}, opts);
    rec.r_c = at::empty({T, H}, opts);
    rec.d_c = at::empty({T, H}, opts);
  }
  const Tensor packed_w = packed_weights(kOp, packed, {weight})[0];
  const Tensor r = at::empty({B, 4 * H}, opts);                       // the step's product
  const Tensor c_buf = at::empty({B, H}, opts), c_hat = at::empty({B, H}, opts);  // c and ĉ
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "bn_lstm_sequence_forward", [&] {
    run_loop(parts, team_scratch_size<scalar_t>(parts, 4 * H), [&](Team& team) {  // the 4H-wide norm's sums
      forward_loop<scalar_t>(team, pk, H, xp, h0, c0, h_mask, weight, gamma_h, gamma_c, beta_c, carry_normed, eps,
                             renorm_h, renorm_c, packed_w, out, h_final, c_final, r, c_buf, c_hat, rec);
    });
    const int64_t last = pk.rows.back();  // rows still running at the last step: its state is their final one
    keep_final_rows(h_final.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + (T - 1) * B * H, 0, last, H);
    keep_final_rows(c_final.data_ptr<scalar_t>(), (carry_normed ? c_hat : c_buf).data_ptr<scalar_t>(), 0, last, H);
  });
  std::vector<Tensor> results = {out, h_final, c_final, rec.h_in, rec.act, rec.xhat_h, rec.c_prev, rec.xhat_c,
                                 rec.tanh_c, rec.mean_h, rec.var_h, rec.invstd_h, rec.mean_c, rec.var_c,
                                 rec.invstd_c, rec.r_h, rec.d_h, rec.r_c, rec.d_c};
  for (Tensor& x : results) {
    if (!x.defined()) x = at::empty({0}, opts);  // a Tensor[] holds no None: empty stands for "not computed"
  }
  return results;
}

// records = [h_in, act, xhat_h, c_prev, xhat_c, tanh_c, invstd_h, invstd_c, r_h, d_h, r_c, d_c] (the last four
// empty without renorm) → (dxp [T, B, 4H] or None, dh0, dc0 [B, H], dW_h [4H, H], dγ_h [4H], dγ_c, dβ_c [H]);
// dxp is a view of a batch-major [B, T, 4H] buffer, the layout of the input norm's forward (SequenceBatchNorm's
// full-batch path normalises the projection as a [B, T·4H] view), so that its backward reads it without a copy
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_lstm_sequence_backward(
    const c10::optional<Tensor>& grad_out, const c10::optional<Tensor>& grad_h, const c10::optional<Tensor>& grad_c,
    int64_t T, int64_t B, const c10::optional<Tensor>& h_mask, const Tensor& weight, const Tensor& gamma_h, const Tensor& gamma_c,
    at::TensorList records, bool carry_normed, at::IntArrayRef active, bool need_xp,
    const c10::optional<at::TensorList>& packed_t, int64_t parts) {
  TORCH_CHECK(records.size() == 12, kOp, ": expected 12 records");
  const Tensor packed_w_t = packed_transposed_weights(kOp, packed_t, {weight})[0];
  Records rec;
  rec.h_in = records[0];
  rec.act = records[1];
  rec.xhat_h = records[2];
  rec.c_prev = records[3];
  rec.xhat_c = records[4];
  rec.tanh_c = records[5];
  rec.invstd_h = records[6];
  rec.invstd_c = records[7];
  if (records[8].numel() > 0) {
    rec.r_h = records[8];
    rec.d_h = records[9];
    rec.r_c = records[10];
    rec.d_c = records[11];
  }
  const int64_t H = weight.size(1);
  const Packing pk = packing(kOp, T, B, active, 2);
  TORCH_CHECK(rec.h_in.size(0) == pk.N, kOp, ": the records do not match the packing");
  const auto opts = rec.act.options();
  const Tensor go = dense_or_undefined(grad_out), gh = dense_or_undefined(grad_h), gc = dense_or_undefined(grad_c);
  const Tensor dxp = need_xp ? (pk.rows.back() < B ? at::zeros({B, T, 4 * H}, opts) : at::empty({B, T, 4 * H}, opts))
                             : Tensor();
  Tensor drs = at::empty({pk.N, 4 * H}, opts);
  Tensor dh = at::empty({B, H}, opts), dc = at::empty({B, H}, opts);
  Tensor dgamma_h = at::zeros({4 * H}, opts), dgamma_c = at::zeros({H}, opts), dbeta_c = at::zeros({H}, opts);
  Tensor dc_other = at::empty({B, H}, opts), dc_hat = at::empty({B, H}, opts);  // scratch
  AT_DISPATCH_FLOATING_TYPES(rec.act.scalar_type(), "bn_lstm_sequence_backward", [&] {
    run_loop(parts, team_scratch_size<scalar_t>(parts, 8 * H), [&](Team& team) {  // its Σ dy and Σ dy x̂
      backward_loop<scalar_t>(team, pk, H, go, gh, gc, h_mask, weight, gamma_h, gamma_c, carry_normed, rec, dxp, drs,
                              dh, dc, dc_other, dc_hat, dgamma_h, dgamma_c, dbeta_c, packed_w_t);
    });
    // rows that never ran (no step): the initial state is their final state (dh is one buffer; dc swaps per step)
    final_rows(dh.data_ptr<scalar_t>(), gh.defined() ? gh.data_ptr<scalar_t>() : nullptr, pk.rows.front(), B, H);
    finish_state_gradient<scalar_t>(pk, H, gc, dc, dc_other, pk.T);
  });
  Tensor dweight = at::mm(drs.t(), rec.h_in);
  return {dxp.defined() ? dxp.transpose(0, 1) : dxp, dh, dc, dweight, dgamma_h, dgamma_c, dbeta_c};
}

}  // namespace
}  // namespace bnrhn_kernels

TORCH_LIBRARY_FRAGMENT(bnrhn_gates, m) {
  m.def("bn_lstm_sequence_forward(Tensor xp, Tensor h0, Tensor c0, Tensor? h_mask, Tensor weight, Tensor gamma_h, "
        "Tensor gamma_c, Tensor beta_c, bool carry_normed, float eps, int[] active, Tensor? renorm_h, "
        "Tensor? renorm_c, Tensor[]? packed=None, int parts=1) -> Tensor[]");
  m.def("bn_lstm_sequence_backward(Tensor? grad_out, Tensor? grad_h, Tensor? grad_c, int T, int B, Tensor? h_mask, "
        "Tensor weight, Tensor gamma_h, Tensor gamma_c, Tensor[] records, bool carry_normed, int[] active, "
        "bool need_xp, Tensor[]? packed_t=None, int parts=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnrhn_gates, CPU, m) {
  m.impl("bn_lstm_sequence_forward", bnrhn_kernels::bn_lstm_sequence_forward);
  m.impl("bn_lstm_sequence_backward", bnrhn_kernels::bn_lstm_sequence_backward);
}
