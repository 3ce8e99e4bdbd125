// Fused elementwise work of the recurrent steps on the CPU: one pass over memory per phase of a step
// instead of one PyTorch kernel per operation. Built on ATen's vectorised math (at::vec::Vectorized);
// see bnrhn/kernels/__init__.py for how it is built, chosen at run time, and replaced where it cannot be.
//
// Activations in float32 (why they are not Vectorized<float>::tanh()/exp()): on processors where the
// vendor vector math is slow (measured on an AVX2 AMD EPYC: torch.tanh 4.4 ns and Sleef's tanh 3.6 ns per
// element, exp_u20 0.6 ns), both are built on ATen's exp_u20 instead, with their known identities:
//     σ(x)    = 1 / (1 + e^{−x})
//     tanh(x) = sign(x) · (1 − 2 / (e^{2|x|} + 1))                            for |x| ≥ 1/4
//     tanh(x) = x − x³/3 + 2x⁵/15 − 17x⁷/315 + 62x⁹/2835 − 1382x¹¹/155925     for |x| < 1/4
// (the Taylor series, where the first form would lose relative precision to cancellation; its next term,
// 21844x¹³/6081075, is below 6·10⁻¹¹ there). NaN inputs give NaN. float64 uses ATen's own tanh and exp.
//
// Gate layouts are PyTorch's and the cells': highway rows [h | t | c] (c only with a free carry gate),
// LSTM rows [i | f | g | o]; every tensor must be row-major contiguous, on the CPU, of one dtype (checked).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>

namespace {

using at::vec::Vectorized;

template <typename T>
struct Act;

template <>
struct Act<float> {
  using V = Vectorized<float>;
  static V sigmoid(V x) {
    V y = V(1.f) / (V(1.f) + x.neg().exp_u20());
    return V::blendv(y, x, x.isnan());
  }
  static V tanh(V x) {
    const V ax = x.abs();
    const V x2 = x * x;
    V p = V(-1382.f / 155925.f);
    p = at::vec::fmadd(p, x2, V(62.f / 2835.f));
    p = at::vec::fmadd(p, x2, V(-17.f / 315.f));
    p = at::vec::fmadd(p, x2, V(2.f / 15.f));
    p = at::vec::fmadd(p, x2, V(-1.f / 3.f));
    p = at::vec::fmadd(p * x2, x, x);                                         // |x| < 1/4
    V big = V(1.f) - V(2.f) / ((ax + ax).exp_u20() + V(1.f));                 // |x| ≥ 1/4, ≥ 0
    big = big | (x & V(-0.f));                                                // sign of x
    V y = V::blendv(p, big, ax >= V(0.25f));
    return V::blendv(y, x, x.isnan());
  }
};

template <>
struct Act<double> {
  using V = Vectorized<double>;
  static V sigmoid(V x) { return V(1.0) / (V(1.0) + x.neg().exp()); }
  static V tanh(V x) { return x.tanh(); }
};

void check_args(const char* op, std::initializer_list<at::Tensor> tensors) {
  const auto dtype = tensors.begin()->scalar_type();
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), op, ": every tensor must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), op, ": every tensor must be contiguous (row-major)");
    TORCH_CHECK(t.scalar_type() == dtype, op, ": every tensor must have the same dtype");
    TORCH_CHECK(t.dim() == 2 || std::string(op) == "tanh" || std::string(op) == "sigmoid", op, ": expected 2-d tensors");
  }
}

// state [B, H] and a gate tensor [B, gates·H] of it
void check_rows(const char* op, const at::Tensor& gates, const at::Tensor& state, int64_t n_gates) {
  TORCH_CHECK(gates.size(0) == state.size(0) && gates.size(1) == n_gates * state.size(1), op, ": expected [B, ",
              n_gates, "·H] beside [B, H], got ", gates.sizes(), " and ", state.sizes());
}

// f(j, n) for the vector-sized pieces of a row of length `cols` (the last one may be shorter)
template <typename T, typename F>
inline void pieces(int64_t cols, const F& f) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + W <= cols; j += W) f(j, W);
  if (j < cols) f(j, cols - j);
}

// rows split across threads, at least ~16k elements per task (small steps stay on one thread)
template <typename F>
inline void rows(int64_t B, int64_t cols, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// Highway layer, forward. act [B, G·H] holds the pre-activations p (bias and normalisation applied) and
// is overwritten with [tanh p_h | σ p_t | σ p_c]; returns s_l = h ⊙ t + s ⊙ c with c = 1 − t when G = 2.
at::Tensor highway_forward(at::Tensor act, const at::Tensor& s, int64_t G) {
  TORCH_CHECK(G == 2 || G == 3, "highway_forward: G must be 2 or 3, got ", G);
  check_args("highway_forward", {act, s});
  check_rows("highway_forward", act, s, G);
  const int64_t B = s.size(0), H = s.size(1);
  auto out = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "highway_forward", [&] {
    using V = Vectorized<scalar_t>;
    using A = Act<scalar_t>;
    rows(B, G * H, [&](int64_t b) {
      scalar_t* a = act.data_ptr<scalar_t>() + b * G * H;
      const scalar_t* sp = s.data_ptr<scalar_t>() + b * H;
      scalar_t* op = out.data_ptr<scalar_t>() + b * H;
      pieces<scalar_t>(H, [&](int64_t j, int64_t n) {
        V h = A::tanh(V::loadu(a + j, n));
        V t = A::sigmoid(V::loadu(a + H + j, n));
        V sv = V::loadu(sp + j, n);
        h.store(a + j, n);
        t.store(a + H + j, n);
        V r;
        if (G == 2) {
          r = at::vec::fmadd(t, h - sv, sv);
        } else {
          V c = A::sigmoid(V::loadu(a + 2 * H + j, n));
          c.store(a + 2 * H + j, n);
          r = at::vec::fmadd(h, t, sv * c);
        }
        r.store(op + j, n);
      });
    });
  });
  return out;
}

// Highway layer, backward: from ds = ∂L/∂s_l and the activations saved by the forward, returns
// (∂L/∂p [B, G·H], ∂L/∂s_{l−1} [B, H]):
//   dp_h = ds t (1 − h²);  coupled: dp_t = ds (h − s) t (1 − t), ds_{l−1} = ds (1 − t);
//   free: dp_t = ds h t (1 − t), dp_c = ds s c (1 − c), ds_{l−1} = ds c.
std::tuple<at::Tensor, at::Tensor> highway_backward(const at::Tensor& ds, const at::Tensor& act,
                                                    const at::Tensor& s, int64_t G) {
  TORCH_CHECK(G == 2 || G == 3, "highway_backward: G must be 2 or 3, got ", G);
  check_args("highway_backward", {ds, act, s});
  check_rows("highway_backward", act, s, G);
  TORCH_CHECK(ds.sizes() == s.sizes(), "highway_backward: ds must have the shape of s");
  const int64_t B = s.size(0), H = s.size(1);
  auto dp = at::empty_like(act);
  auto ds_prev = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "highway_backward", [&] {
    using V = Vectorized<scalar_t>;
    const V one(1);
    rows(B, G * H, [&](int64_t b) {
      const scalar_t* a = act.data_ptr<scalar_t>() + b * G * H;
      const scalar_t* sp = s.data_ptr<scalar_t>() + b * H;
      const scalar_t* g = ds.data_ptr<scalar_t>() + b * H;
      scalar_t* d = dp.data_ptr<scalar_t>() + b * G * H;
      scalar_t* dsp = ds_prev.data_ptr<scalar_t>() + b * H;
      pieces<scalar_t>(H, [&](int64_t j, int64_t n) {
        V h = V::loadu(a + j, n), t = V::loadu(a + H + j, n);
        V gv = V::loadu(g + j, n), sv = V::loadu(sp + j, n);
        V gt = gv * t;
        (gt * (one - h * h)).store(d + j, n);
        V dsig_t = t * (one - t);
        if (G == 2) {
          (gv * (h - sv) * dsig_t).store(d + H + j, n);
          (gv - gt).store(dsp + j, n);
        } else {
          V c = V::loadu(a + 2 * H + j, n);
          (gv * h * dsig_t).store(d + H + j, n);
          (gv * sv * c * (one - c)).store(d + 2 * H + j, n);
          (gv * c).store(dsp + j, n);
        }
      });
    });
  });
  return {dp, ds_prev};
}

// LSTM gates, forward. act [B, 4H] holds the pre-activations and is overwritten with
// [σ i | σ f | tanh g | σ o]; returns c = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g).
at::Tensor lstm_gates_forward(at::Tensor act, const at::Tensor& c_prev) {
  check_args("lstm_gates_forward", {act, c_prev});
  check_rows("lstm_gates_forward", act, c_prev, 4);
  const int64_t B = c_prev.size(0), H = c_prev.size(1);
  auto c = at::empty_like(c_prev);
  AT_DISPATCH_FLOATING_TYPES(c_prev.scalar_type(), "lstm_gates_forward", [&] {
    using V = Vectorized<scalar_t>;
    using A = Act<scalar_t>;
    rows(B, 4 * H, [&](int64_t b) {
      scalar_t* a = act.data_ptr<scalar_t>() + b * 4 * H;
      const scalar_t* cp = c_prev.data_ptr<scalar_t>() + b * H;
      scalar_t* co = c.data_ptr<scalar_t>() + b * H;
      pieces<scalar_t>(H, [&](int64_t j, int64_t n) {
        V i = A::sigmoid(V::loadu(a + j, n));
        V f = A::sigmoid(V::loadu(a + H + j, n));
        V gg = A::tanh(V::loadu(a + 2 * H + j, n));
        V o = A::sigmoid(V::loadu(a + 3 * H + j, n));
        i.store(a + j, n);
        f.store(a + H + j, n);
        gg.store(a + 2 * H + j, n);
        o.store(a + 3 * H + j, n);
        at::vec::fmadd(f, V::loadu(cp + j, n), i * gg).store(co + j, n);
      });
    });
  });
  return c;
}

// LSTM output, forward: (h, tanh ĉ) with h = σ(o) ⊙ tanh(ĉ); act as left by lstm_gates_forward.
std::tuple<at::Tensor, at::Tensor> lstm_output_forward(const at::Tensor& act, const at::Tensor& c_hat) {
  check_args("lstm_output_forward", {act, c_hat});
  check_rows("lstm_output_forward", act, c_hat, 4);
  const int64_t B = c_hat.size(0), H = c_hat.size(1);
  auto h = at::empty_like(c_hat);
  auto tc = at::empty_like(c_hat);
  AT_DISPATCH_FLOATING_TYPES(c_hat.scalar_type(), "lstm_output_forward", [&] {
    using V = Vectorized<scalar_t>;
    using A = Act<scalar_t>;
    rows(B, H, [&](int64_t b) {
      const scalar_t* o = act.data_ptr<scalar_t>() + b * 4 * H + 3 * H;
      const scalar_t* cp = c_hat.data_ptr<scalar_t>() + b * H;
      scalar_t* hp = h.data_ptr<scalar_t>() + b * H;
      scalar_t* tp = tc.data_ptr<scalar_t>() + b * H;
      pieces<scalar_t>(H, [&](int64_t j, int64_t n) {
        V t = A::tanh(V::loadu(cp + j, n));
        t.store(tp + j, n);
        (V::loadu(o + j, n) * t).store(hp + j, n);
      });
    });
  });
  return {h, tc};
}

// LSTM output, backward: ∂L/∂ĉ = dh ⊙ σ(o) ⊙ (1 − tanh² ĉ).
at::Tensor lstm_output_backward(const at::Tensor& dh, const at::Tensor& act, const at::Tensor& tc) {
  check_args("lstm_output_backward", {dh, act, tc});
  check_rows("lstm_output_backward", act, tc, 4);
  TORCH_CHECK(dh.sizes() == tc.sizes(), "lstm_output_backward: dh must have the shape of tc");
  const int64_t B = tc.size(0), H = tc.size(1);
  auto dc_hat = at::empty_like(tc);
  AT_DISPATCH_FLOATING_TYPES(tc.scalar_type(), "lstm_output_backward", [&] {
    using V = Vectorized<scalar_t>;
    const V one(1);
    rows(B, H, [&](int64_t b) {
      const scalar_t* o = act.data_ptr<scalar_t>() + b * 4 * H + 3 * H;
      const scalar_t* g = dh.data_ptr<scalar_t>() + b * H;
      const scalar_t* tp = tc.data_ptr<scalar_t>() + b * H;
      scalar_t* d = dc_hat.data_ptr<scalar_t>() + b * H;
      pieces<scalar_t>(H, [&](int64_t j, int64_t n) {
        V t = V::loadu(tp + j, n);
        (V::loadu(g + j, n) * V::loadu(o + j, n) * (one - t * t)).store(d + j, n);
      });
    });
  });
  return dc_hat;
}

// LSTM gates, backward: from dc = ∂L/∂c and dh = ∂L/∂h (for the o gate), returns
// (∂L/∂[i, f, g, o] pre-activations [B, 4H], ∂L/∂c_{t−1} = dc ⊙ σ(f)):
//   di = dc g i(1 − i),  df = dc c_{t−1} f(1 − f),  dg = dc i (1 − g²),  do = dh tanh(ĉ) o(1 − o).
std::tuple<at::Tensor, at::Tensor> lstm_gates_backward(const at::Tensor& dc, const at::Tensor& dh,
                                                       const at::Tensor& act, const at::Tensor& c_prev,
                                                       const at::Tensor& tc) {
  check_args("lstm_gates_backward", {dc, dh, act, c_prev, tc});
  check_rows("lstm_gates_backward", act, c_prev, 4);
  TORCH_CHECK(dc.sizes() == c_prev.sizes() && dh.sizes() == c_prev.sizes() && tc.sizes() == c_prev.sizes(),
              "lstm_gates_backward: dc, dh, c_prev and tc must have one shape [B, H]");
  const int64_t B = c_prev.size(0), H = c_prev.size(1);
  auto dgates = at::empty_like(act);
  auto dc_prev = at::empty_like(c_prev);
  AT_DISPATCH_FLOATING_TYPES(c_prev.scalar_type(), "lstm_gates_backward", [&] {
    using V = Vectorized<scalar_t>;
    const V one(1);
    rows(B, 4 * H, [&](int64_t b) {
      const scalar_t* a = act.data_ptr<scalar_t>() + b * 4 * H;
      const scalar_t* dcp = dc.data_ptr<scalar_t>() + b * H;
      const scalar_t* dhp = dh.data_ptr<scalar_t>() + b * H;
      const scalar_t* cp = c_prev.data_ptr<scalar_t>() + b * H;
      const scalar_t* tp = tc.data_ptr<scalar_t>() + b * H;
      scalar_t* d = dgates.data_ptr<scalar_t>() + b * 4 * H;
      scalar_t* dprev = dc_prev.data_ptr<scalar_t>() + b * H;
      pieces<scalar_t>(H, [&](int64_t j, int64_t n) {
        V i = V::loadu(a + j, n), f = V::loadu(a + H + j, n);
        V gg = V::loadu(a + 2 * H + j, n), o = V::loadu(a + 3 * H + j, n);
        V dcv = V::loadu(dcp + j, n);
        (dcv * gg * i * (one - i)).store(d + j, n);
        (dcv * V::loadu(cp + j, n) * f * (one - f)).store(d + H + j, n);
        (dcv * i * (one - gg * gg)).store(d + 2 * H + j, n);
        (V::loadu(dhp + j, n) * V::loadu(tp + j, n) * o * (one - o)).store(d + 3 * H + j, n);
        (dcv * f).store(dprev + j, n);
      });
    });
  });
  return {dgates, dc_prev};
}

// f applied to every element of a contiguous tensor
template <template <typename> class F>
at::Tensor elementwise(const char* op, const at::Tensor& x) {
  check_args(op, {x});
  auto y = at::empty_like(x);
  const int64_t N = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "elementwise", [&] {
    using V = Vectorized<scalar_t>;
    at::parallel_for(0, N, 16384, [&](int64_t i0, int64_t i1) {
      const scalar_t* xp = x.data_ptr<scalar_t>() + i0;
      scalar_t* yp = y.data_ptr<scalar_t>() + i0;
      pieces<scalar_t>(i1 - i0, [&](int64_t j, int64_t n) { F<scalar_t>::apply(V::loadu(xp + j, n)).store(yp + j, n); });
    });
  });
  return y;
}

template <typename T>
struct Tanh {
  static Vectorized<T> apply(Vectorized<T> x) { return Act<T>::tanh(x); }
};

template <typename T>
struct Sigmoid {
  static Vectorized<T> apply(Vectorized<T> x) { return Act<T>::sigmoid(x); }
};

// tanh of any contiguous tensor (the attention scores' tanh)
at::Tensor tanh_op(const at::Tensor& x) { return elementwise<Tanh>("tanh", x); }

// σ of any contiguous tensor
at::Tensor sigmoid_op(const at::Tensor& x) { return elementwise<Sigmoid>("sigmoid", x); }

}  // namespace

TORCH_LIBRARY(bnrhn_gates, m) {
  m.def("highway_forward(Tensor(a!) act, Tensor s, int G) -> Tensor");
  m.def("highway_backward(Tensor ds, Tensor act, Tensor s, int G) -> (Tensor, Tensor)");
  m.def("lstm_gates_forward(Tensor(a!) act, Tensor c_prev) -> Tensor");
  m.def("lstm_output_forward(Tensor act, Tensor c_hat) -> (Tensor, Tensor)");
  m.def("lstm_output_backward(Tensor dh, Tensor act, Tensor tc) -> Tensor");
  m.def("lstm_gates_backward(Tensor dc, Tensor dh, Tensor act, Tensor c_prev, Tensor tc) -> (Tensor, Tensor)");
  m.def("tanh(Tensor x) -> Tensor");
  m.def("sigmoid(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnrhn_gates, CPU, m) {
  m.impl("highway_forward", highway_forward);
  m.impl("highway_backward", highway_backward);
  m.impl("lstm_gates_forward", lstm_gates_forward);
  m.impl("lstm_output_forward", lstm_output_forward);
  m.impl("lstm_output_backward", lstm_output_backward);
  m.impl("lstm_gates_backward", lstm_gates_backward);
  m.impl("tanh", tanh_op);
  m.impl("sigmoid", sigmoid_op);
}
