// A whole sequence of MUT1/MUT2/MUT3 steps (Jozefowicz et al. 2015; bnrhn/cells/mut.py has the equations),
// forward and backward, as one C++ loop for training on the CPU. With xp_t = [x_z | x_r | x_h] (the cell's
// projection of x_t, everything that does not need h) and h_in = h_{t−1} ⊙ m:
//
//   MUT1: z = σ(x_z),                        r = σ(x_r + h_in W_hrᵀ)
//   MUT2: z = σ(x_z + h_in W_hzᵀ),           r = x_r (σ(x + b_r), already in the projection)
//   MUT3: z = σ(x_z + tanh(h_in) W_hzᵀ),     r = σ(x_r + h_in W_hrᵀ)
//   all:  c = tanh(x_h + (r ⊙ h_in) W_hhᵀ),  h_t = h_{t−1} + z ⊙ (c − h_{t−1})
//
// backward, in reverse (g = ∂L/∂h_t):  dz = g (c − h),  da = g z (1 − c²),  dx_h = da,  d(r ⊙ h_in) = da W_hh,
//   dr = d(r ⊙ h_in) ⊙ h_in,  dh_in = d(r ⊙ h_in) ⊙ r,  dp_z = dz z (1 − z),  dp_r = dr r (1 − r) (MUT2: dx_r = dr),
//   dh_in += dp_r W_hr (MUT1, 3) + dp_z W_hz (MUT2) or (dp_z W_hz) ⊙ (1 − tanh² h_in) (MUT3),
//   ∂L/∂h_{t−1} = g (1 − z) + dh_in ⊙ m;  the weight gradients once over the sequence.
// Why: as the other loops (the step's products are small at hidden sizes of a few hundred, and the Python step
// loop costs as much around them). Packed rows as sequence.h describes. The products are PyTorch's mm, or
// oneDNN's on the weights (and, backward, their transposes) reordered once (`packed`, `packed_t`: sequence.h),
// where bnrhn/kernels/onednn.py says so.

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

constexpr const char* kOp = "mut_sequence";

// Per step t (rows at offset Σ n_u): h_{t−1}, h_in, tanh(h_in) (MUT3), z, r, r ⊙ h_in, c.
struct Records {
  Tensor h_prev, h_in, tanh_h, z, r, rh, c;
};

// The forward of this thread's rows of every step (team.range: all of them when it works alone); the caller
// keeps the last step's final rows
template <typename T>
void forward_loop(Team& team, int64_t variant, const Packing& pk, int64_t H, const Tensor& xp, const Tensor& h0,
                  const c10::optional<Tensor>& h_mask, const c10::optional<Tensor>& w_hz,
                  const c10::optional<Tensor>& w_hr, const Tensor& w_hh, const std::vector<Tensor>& packed,
                  const Tensor& out, const Tensor& h_final, Records& rec) {
  using V = Vectorized<T>;
  using A = Act<T>;
  const int64_t steps = pk.T, B = pk.B;
  const Tensor w_hh_t = w_hh.t();
  const Tensor w_hz_t = w_hz.has_value() ? w_hz->t() : Tensor();
  const Tensor w_hr_t = w_hr.has_value() ? w_hr->t() : Tensor();
  const T* xp_p = xp.data_ptr<T>();
  const int64_t xs0 = xp.stride(0), xs1 = xp.stride(1);
  const T* mask_p = ptr_or_null<T>(h_mask);
  T* out_p = out.data_ptr<T>();
  T* hf = h_final.data_ptr<T>();
  const T* h = h0.data_ptr<T>();
  int64_t rows_in = B;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t n = pk.rows[t];
    team.enter_step(n);
    if (team.leader()) keep_final_rows(hf, h, n, rows_in, H);  // rows ending before step t
    rows_in = n;
    const auto [lo, end] = team.range(n);
    const int64_t nr = end - lo, off = pk.offset[t] + lo;  // this thread's rows, and where they are recorded
    const T* entering = h;
    h = out_p + t * B * H;  // the state entering step t + 1
    T* ho = out_p + t * B * H + lo * H;
    if (nr == 0) continue;
    T* hp = rec.h_prev.data_ptr<T>() + off * H;
    T* hi = rec.h_in.data_ptr<T>() + off * H;
    std::memcpy(hp, entering + lo * H, nr * H * sizeof(T));
    masked_copy(hi, hp, mask_p != nullptr ? mask_p + lo * H : nullptr, nr * H);
    const Tensor xt = xp.select(0, t).narrow(0, lo, nr);  // [nr, 3H], row stride xs1
    Tensor z = rec.z.narrow(0, off, nr), r = rec.r.narrow(0, off, nr);
    const Tensor h_in = rec.h_in.narrow(0, off, nr);
    if (variant == 2) {
      recurrent_product(z, h_in, w_hz_t, packed[0], xt.narrow(1, 0, H), Tensor());
    } else if (variant == 3) {
      Tensor th = rec.tanh_h.narrow(0, off, nr);
      T* thp = th.data_ptr<T>();
      pieces<T>(nr * H, [&](int64_t j, int64_t w) { A::tanh(V::loadu(hi + j, w)).store(thp + j, w); });
      recurrent_product(z, th, w_hz_t, packed[0], xt.narrow(1, 0, H), Tensor());
    }
    if (variant != 2) recurrent_product(r, h_in, w_hr_t, packed[1], xt.narrow(1, H, H), Tensor());
    // gates: z = σ(·) (MUT1 from x_z), r = σ(·) (MUT2: x_r as it is); r ⊙ h_in
    T* zp = z.data_ptr<T>();
    T* rp = r.data_ptr<T>();
    T* rhp = rec.rh.data_ptr<T>() + off * H;
    rows(nr, [&](int64_t b) {
      const T* xb = xp_p + t * xs0 + (lo + b) * xs1;
      pieces<T>(H, [&](int64_t j, int64_t w) {
        const int64_t e = b * H + j;
        const V pz = variant == 1 ? V::loadu(xb + j, w) : V::loadu(zp + e, w);
        const V rv = variant == 2 ? V::loadu(xb + H + j, w) : A::sigmoid(V::loadu(rp + e, w));
        A::sigmoid(pz).store(zp + e, w);
        rv.store(rp + e, w);
        (rv * V::loadu(hi + e, w)).store(rhp + e, w);
      });
    });
    Tensor c = rec.c.narrow(0, off, nr);
    recurrent_product(c, rec.rh.narrow(0, off, nr), w_hh_t, packed[2], xt.narrow(1, 2 * H, H), Tensor());
    T* cp = c.data_ptr<T>();
    rows(nr, [&](int64_t b) {
      pieces<T>(H, [&](int64_t j, int64_t w) {
        const int64_t e = b * H + j;
        const V cv = A::tanh(V::loadu(cp + e, w)), hv = V::loadu(hp + e, w);
        cv.store(cp + e, w);
        at::vec::fmadd(V::loadu(zp + e, w), cv - hv, hv).store(ho + e, w);
      });
    });
  }
}

// The backward of this thread's rows of every step; the caller finishes dh0
template <typename T>
void backward_loop(Team& team, int64_t variant, const Packing& pk, int64_t H, const Tensor& grad_out,
                   const Tensor& grad_final, const c10::optional<Tensor>& h_mask, const c10::optional<Tensor>& w_hz,
                   const c10::optional<Tensor>& w_hr, const Tensor& w_hh, const Records& rec, const Tensor& dxp,
                   const Tensor& da_all, const Tensor& dpz_all, const Tensor& dpr_all, const Tensor& dh_a,
                   const Tensor& dh_b, const Tensor& drh, const Tensor& dh_in, const Tensor& tmp,
                   const std::vector<Tensor>& packed_t) {
  using V = Vectorized<T>;
  const int64_t steps = pk.T, B = pk.B, H3 = 3 * H;
  const T* go = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  const T* gf = grad_final.defined() ? grad_final.data_ptr<T>() : nullptr;
  const T* mask_p = ptr_or_null<T>(h_mask);
  T* dxp_p = dxp.defined() ? dxp.data_ptr<T>() : nullptr;
  Tensor g = dh_a, g_next = dh_b;  // ∂L/∂h_t and ∂L/∂h_{t−1}
  const V one(1);
  int64_t m = 0;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t n = pk.rows[t];
    team.enter_step(n);
    const auto [lo, end] = team.range(n);
    const int64_t nr = end - lo, off = pk.offset[t] + lo;  // this thread's rows, and where they are recorded
    state_gradient_rows(g.data_ptr<T>(), m, lo, end, t, B, H, gf, go);
    m = std::max(m, n);
    if (nr == 0) {
      std::swap(g, g_next);
      continue;
    }
    T* gp = g.data_ptr<T>() + lo * H;
    const T* zp = rec.z.data_ptr<T>() + off * H;
    const T* rp = rec.r.data_ptr<T>() + off * H;
    const T* cp = rec.c.data_ptr<T>() + off * H;
    const T* hp = rec.h_prev.data_ptr<T>() + off * H;
    const T* hi = rec.h_in.data_ptr<T>() + off * H;
    T* da = da_all.data_ptr<T>() + off * H;
    T* dpz = dpz_all.defined() ? dpz_all.data_ptr<T>() + off * H : nullptr;
    T* gn = g_next.data_ptr<T>() + lo * H;
    T* dx = dxp_p != nullptr ? dxp_p + (t * B + lo) * H3 : nullptr;
    rows(nr, [&](int64_t b) {
      pieces<T>(H, [&](int64_t j, int64_t w) {
        const int64_t e = b * H + j;
        const V gv = V::loadu(gp + e, w), z = V::loadu(zp + e, w), cv = V::loadu(cp + e, w);
        const V dz = gv * (cv - V::loadu(hp + e, w)) * z * (one - z);  // ∂L/∂(z's pre-activation)
        const V dav = gv * z * (one - cv * cv);
        dav.store(da + e, w);
        (gv * (one - z)).store(gn + e, w);
        if (dpz != nullptr) dz.store(dpz + e, w);
        if (dx != nullptr) {
          dz.store(dx + b * H3 + j, w);
          dav.store(dx + b * H3 + 2 * H + j, w);
        }
      });
    });
    Tensor drh_t = drh.narrow(0, lo, nr);
    gradient_product(drh_t, da_all.narrow(0, off, nr), w_hh, packed_t[2]);  // ∂L/∂(r ⊙ h_in)
    const T* drhp = drh_t.data_ptr<T>();
    T* dhi = dh_in.data_ptr<T>() + lo * H;
    T* dpr = dpr_all.defined() ? dpr_all.data_ptr<T>() + off * H : nullptr;
    rows(nr, [&](int64_t b) {
      pieces<T>(H, [&](int64_t j, int64_t w) {
        const int64_t e = b * H + j;
        const V d = V::loadu(drhp + e, w), rv = V::loadu(rp + e, w);
        const V dr = d * V::loadu(hi + e, w);
        (d * rv).store(dhi + e, w);
        const V dpre = variant == 2 ? dr : dr * rv * (one - rv);
        if (dpr != nullptr) dpre.store(dpr + e, w);
        if (dx != nullptr) dpre.store(dx + b * H3 + H + j, w);
      });
    });
    Tensor dh_in_t = dh_in.narrow(0, lo, nr), tmp_t = tmp.narrow(0, lo, nr);
    if (variant != 2) add_masked_product<T>(dh_in_t, dpr_all.narrow(0, off, nr), *w_hr, nullptr, tmp_t, packed_t[1]);
    if (variant == 2) add_masked_product<T>(dh_in_t, dpz_all.narrow(0, off, nr), *w_hz, nullptr, tmp_t, packed_t[0]);
    if (variant == 3) {  // through tanh(h_in)
      gradient_product(tmp_t, dpz_all.narrow(0, off, nr), *w_hz, packed_t[0]);
      const T* tp = tmp_t.data_ptr<T>();
      const T* th = rec.tanh_h.data_ptr<T>() + off * H;
      for (int64_t e = 0; e < nr * H; ++e) dhi[e] += tp[e] * (T(1) - th[e] * th[e]);
    }
    const T* mp = mask_p != nullptr ? mask_p + lo * H : nullptr;
    for (int64_t e = 0; e < nr * H; ++e) gn[e] += mp != nullptr ? dhi[e] * mp[e] : dhi[e];
    std::swap(g, g_next);
  }
}

void check_variant(int64_t variant, const c10::optional<Tensor>& w_hz, const c10::optional<Tensor>& w_hr) {
  TORCH_CHECK(variant >= 1 && variant <= 3, kOp, ": variant must be 1, 2 or 3");
  TORCH_CHECK(w_hz.has_value() == (variant != 1) && w_hr.has_value() == (variant != 2),
              kOp, ": MUT1 takes W_hr, MUT2 W_hz, MUT3 both");
}

// The variant's recurrent weights in their order (W_hz, W_hr, W_hh, those it has), as packed weights come
std::vector<Tensor> present(int64_t variant, const c10::optional<Tensor>& w_hz, const c10::optional<Tensor>& w_hr,
                            const Tensor& w_hh) {
  std::vector<Tensor> out;
  if (variant != 1) out.push_back(*w_hz);
  if (variant != 2) out.push_back(*w_hr);
  out.push_back(w_hh);
  return out;
}

// Packed weights in that order (or none) → a slot each for W_hz, W_hr, W_hh (undefined: PyTorch's mm)
std::vector<Tensor> slots(int64_t variant, const std::vector<Tensor>& packed) {
  std::vector<Tensor> out(3);
  size_t k = 0;
  if (variant != 1) out[0] = packed[k++];
  if (variant != 2) out[1] = packed[k++];
  out[2] = packed[k];
  return out;
}

// → [out [T, B, H], h_T [B, H], then the records h_prev, h_in, tanh_h (empty unless MUT3), z, r, rh, c [N, H]]
std::vector<Tensor> mut_sequence_forward(int64_t variant, const Tensor& xp, const Tensor& h0,
                                         const c10::optional<Tensor>& h_mask, const c10::optional<Tensor>& w_hz,
                                         const c10::optional<Tensor>& w_hr, const Tensor& w_hh,
                                         at::IntArrayRef active, const c10::optional<at::TensorList>& packed,
                                         int64_t parts) {
  check_variant(variant, w_hz, w_hr);
  check_step_input(kOp, xp, h0, 3);
  const int64_t T = xp.size(0), B = xp.size(1), H = h0.size(1);
  check_tensor(kOp, "h0", h0, xp);
  for (const Tensor* w : {&w_hh, w_hz.has_value() ? &*w_hz : nullptr, w_hr.has_value() ? &*w_hr : nullptr}) {
    if (w == nullptr) continue;
    check_tensor(kOp, "a recurrent weight", *w, xp);
    TORCH_CHECK(w->sizes() == at::IntArrayRef({H, H}), kOp, ": every recurrent weight must be [H, H]");
  }
  check_mask(kOp, h_mask, h0, "h0", xp);
  const Packing pk = packing(kOp, T, B, active, 0);
  const auto opts = xp.options();
  Tensor out = pk.rows.back() < B ? at::zeros({T, B, H}, opts) : at::empty({T, B, H}, opts);
  Tensor h_final = at::empty({B, H}, opts);
  Records rec;
  for (Tensor* x : {&rec.h_prev, &rec.h_in, &rec.z, &rec.r, &rec.rh, &rec.c}) *x = at::empty({pk.N, H}, opts);
  rec.tanh_h = variant == 3 ? at::empty({pk.N, H}, opts) : at::empty({0}, opts);
  const std::vector<Tensor> packed_w = slots(variant, packed_weights(kOp, packed, present(variant, w_hz, w_hr, w_hh)));
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "mut_sequence_forward", [&] {
    run_loop(parts, 0, [&](Team& team) {
      forward_loop<scalar_t>(team, variant, pk, H, xp, h0, h_mask, w_hz, w_hr, w_hh, packed_w, out, h_final, rec);
    });
    keep_final_rows(h_final.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + (T - 1) * B * H, 0, pk.rows.back(), H);
  });
  return {out, h_final, rec.h_prev, rec.h_in, rec.tanh_h, rec.z, rec.r, rec.rh, rec.c};
}

// records as the forward returns them → (dxp [T, B, 3H] or None, dh0 [B, H], dW_hz or empty, dW_hr or empty, dW_hh)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mut_sequence_backward(
    int64_t variant, const c10::optional<Tensor>& grad_out, const c10::optional<Tensor>& grad_final, int64_t T,
    int64_t B, const c10::optional<Tensor>& h_mask, const c10::optional<Tensor>& w_hz,
    const c10::optional<Tensor>& w_hr, const Tensor& w_hh, at::TensorList records, at::IntArrayRef active,
    bool need_xp, const c10::optional<at::TensorList>& packed_t, int64_t parts) {
  check_variant(variant, w_hz, w_hr);
  const std::vector<Tensor> packed_w_t =
      slots(variant, packed_transposed_weights(kOp, packed_t, present(variant, w_hz, w_hr, w_hh)));
  TORCH_CHECK(records.size() == 7, kOp, ": expected 7 records");
  Records rec;
  rec.h_prev = records[0];
  rec.h_in = records[1];
  rec.tanh_h = records[2];
  rec.z = records[3];
  rec.r = records[4];
  rec.rh = records[5];
  rec.c = records[6];
  const int64_t H = w_hh.size(1);
  const Packing pk = packing(kOp, T, B, active, 0);
  TORCH_CHECK(rec.h_in.size(0) == pk.N, kOp, ": the records do not match the packing");
  const auto opts = rec.c.options();
  const Tensor go = dense_or_undefined(grad_out), gf = dense_or_undefined(grad_final);
  const Tensor dxp = need_xp ? input_gradient(pk, 3 * H, opts) : Tensor();
  Tensor da = at::empty({pk.N, H}, opts);
  Tensor dpz = variant != 1 ? at::empty({pk.N, H}, opts) : Tensor();
  Tensor dpr = at::empty({pk.N, H}, opts);
  Tensor dh_a = at::empty({B, H}, opts), dh_b = at::empty({B, H}, opts);
  Tensor drh = at::empty({B, H}, opts), dh_in = at::empty({B, H}, opts), tmp = at::empty({B, H}, opts);  // scratch
  AT_DISPATCH_FLOATING_TYPES(rec.c.scalar_type(), "mut_sequence_backward", [&] {
    run_loop(parts, 0, [&](Team& team) {
      backward_loop<scalar_t>(team, variant, pk, H, go, gf, h_mask, w_hz, w_hr, w_hh, rec, dxp, da, dpz, dpr, dh_a,
                              dh_b, drh, dh_in, tmp, packed_w_t);
    });
    finish_state_gradient<scalar_t>(pk, H, gf, dh_a, dh_b, pk.T);  // one swap per step
  });
  Tensor dw_hz = variant == 1 ? at::empty({0}, opts) : at::mm(dpz.t(), variant == 3 ? rec.tanh_h : rec.h_in);
  Tensor dw_hr = variant == 2 ? at::empty({0}, opts) : at::mm(dpr.t(), rec.h_in);
  return {dxp, dh_a, dw_hz, dw_hr, at::mm(da.t(), rec.rh)};
}

}  // namespace
}  // namespace bnrhn_kernels

TORCH_LIBRARY_FRAGMENT(bnrhn_gates, m) {
  m.def("mut_sequence_forward(int variant, Tensor xp, Tensor h0, Tensor? h_mask, Tensor? w_hz, Tensor? w_hr, "
        "Tensor w_hh, int[] active, Tensor[]? packed=None, int parts=1) -> Tensor[]");
  m.def("mut_sequence_backward(int variant, Tensor? grad_out, Tensor? grad_final, int T, int B, Tensor? h_mask, "
        "Tensor? w_hz, Tensor? w_hr, Tensor w_hh, Tensor[] records, int[] active, bool need_xp, "
        "Tensor[]? packed_t=None, int parts=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnrhn_gates, CPU, m) {
  m.impl("mut_sequence_forward", bnrhn_kernels::mut_sequence_forward);
  m.impl("mut_sequence_backward", bnrhn_kernels::mut_sequence_backward);
}
