// Fused elementwise work of the recurrent steps on the CPU: one pass over memory per phase of a step
// instead of one PyTorch kernel per operation. Built on ATen's vectorised math (at::vec::Vectorized);
// see bnrhn/kernels/__init__.py for how it is built, chosen at run time, and replaced where it cannot be.
//
// The activations (tanh and σ on ATen's exp_u20 in float32) and the loop helpers are in vec_math.h.
//
// Gate layouts are PyTorch's and the cells': highway rows [h | t | c] (c only with a free carry gate),
// LSTM rows [i | f | g | o]; every tensor must be row-major contiguous, on the CPU, of one dtype (checked).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "row_kernels.h"

#include <initializer_list>
#include <string>
#include <tuple>

using namespace bnrhn_kernels;
using at::vec::Vectorized;

namespace {

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

// Highway layer, forward. act [B, G·H] holds the pre-activations p (bias and normalisation applied) and
// is overwritten with [tanh p_h | σ p_t | σ p_c]; returns s_l = h ⊙ t + s ⊙ c with c = 1 − t when G = 2.
at::Tensor highway_forward(at::Tensor act, const at::Tensor& s, int64_t G) {
  TORCH_CHECK(G == 2 || G == 3, "highway_forward: G must be 2 or 3, got ", G);
  check_args("highway_forward", {act, s});
  check_rows("highway_forward", act, s, G);
  auto out = at::empty_like(s);
  const bool no_bias[3] = {false, false, false};
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "highway_forward", [&] {
    highway_rows_forward<scalar_t>(s.size(0), s.size(1), G, act.data_ptr<scalar_t>(), nullptr, no_bias,
                                   s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

// Highway layer, backward: from ds = ∂L/∂s_l and the activations saved by the forward, returns
// (∂L/∂p [B, G·H], ∂L/∂s_{l−1} [B, H]) (row_kernels.h gives the formulas).
std::tuple<at::Tensor, at::Tensor> highway_backward(const at::Tensor& ds, const at::Tensor& act,
                                                    const at::Tensor& s, int64_t G) {
  TORCH_CHECK(G == 2 || G == 3, "highway_backward: G must be 2 or 3, got ", G);
  check_args("highway_backward", {ds, act, s});
  check_rows("highway_backward", act, s, G);
  TORCH_CHECK(ds.sizes() == s.sizes(), "highway_backward: ds must have the shape of s");
  auto dp = at::empty_like(act);
  auto ds_prev = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "highway_backward", [&] {
    highway_rows_backward<scalar_t>(s.size(0), s.size(1), G, ds.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(),
                                    s.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), ds_prev.data_ptr<scalar_t>());
  });
  return {dp, ds_prev};
}

// LSTM gates, forward. act [B, 4H] holds the pre-activations and is overwritten with
// [σ i | σ f | tanh g | σ o]; returns c = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g).
at::Tensor lstm_gates_forward(at::Tensor act, const at::Tensor& c_prev) {
  check_args("lstm_gates_forward", {act, c_prev});
  check_rows("lstm_gates_forward", act, c_prev, 4);
  auto c = at::empty_like(c_prev);
  AT_DISPATCH_FLOATING_TYPES(c_prev.scalar_type(), "lstm_gates_forward", [&] {
    lstm_gates_rows_forward<scalar_t>(c_prev.size(0), c_prev.size(1), act.data_ptr<scalar_t>(),
                                      c_prev.data_ptr<scalar_t>(), c.data_ptr<scalar_t>());
  });
  return c;
}

// LSTM output, forward: (h, tanh ĉ) with h = σ(o) ⊙ tanh(ĉ); act as left by lstm_gates_forward.
std::tuple<at::Tensor, at::Tensor> lstm_output_forward(const at::Tensor& act, const at::Tensor& c_hat) {
  check_args("lstm_output_forward", {act, c_hat});
  check_rows("lstm_output_forward", act, c_hat, 4);
  auto h = at::empty_like(c_hat);
  auto tc = at::empty_like(c_hat);
  AT_DISPATCH_FLOATING_TYPES(c_hat.scalar_type(), "lstm_output_forward", [&] {
    lstm_output_rows_forward<scalar_t>(c_hat.size(0), c_hat.size(1), act.data_ptr<scalar_t>(),
                                       c_hat.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), tc.data_ptr<scalar_t>());
  });
  return {h, tc};
}

// LSTM output, backward: ∂L/∂ĉ = dh ⊙ σ(o) ⊙ (1 − tanh² ĉ).
at::Tensor lstm_output_backward(const at::Tensor& dh, const at::Tensor& act, const at::Tensor& tc) {
  check_args("lstm_output_backward", {dh, act, tc});
  check_rows("lstm_output_backward", act, tc, 4);
  TORCH_CHECK(dh.sizes() == tc.sizes(), "lstm_output_backward: dh must have the shape of tc");
  auto dc_hat = at::empty_like(tc);
  AT_DISPATCH_FLOATING_TYPES(tc.scalar_type(), "lstm_output_backward", [&] {
    lstm_output_rows_backward<scalar_t>(tc.size(0), tc.size(1), dh.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(),
                                        tc.data_ptr<scalar_t>(), dc_hat.data_ptr<scalar_t>());
  });
  return dc_hat;
}

// LSTM gates, backward: from dc = ∂L/∂c and dh = ∂L/∂h (for the o gate), returns
// (∂L/∂[i, f, g, o] pre-activations [B, 4H], ∂L/∂c_{t−1} = dc ⊙ σ(f)) (row_kernels.h gives the formulas).
std::tuple<at::Tensor, at::Tensor> lstm_gates_backward(const at::Tensor& dc, const at::Tensor& dh,
                                                       const at::Tensor& act, const at::Tensor& c_prev,
                                                       const at::Tensor& tc) {
  check_args("lstm_gates_backward", {dc, dh, act, c_prev, tc});
  check_rows("lstm_gates_backward", act, c_prev, 4);
  TORCH_CHECK(dc.sizes() == c_prev.sizes() && dh.sizes() == c_prev.sizes() && tc.sizes() == c_prev.sizes(),
              "lstm_gates_backward: dc, dh, c_prev and tc must have one shape [B, H]");
  auto dgates = at::empty_like(act);
  auto dc_prev = at::empty_like(c_prev);
  AT_DISPATCH_FLOATING_TYPES(c_prev.scalar_type(), "lstm_gates_backward", [&] {
    lstm_gates_rows_backward<scalar_t>(c_prev.size(0), c_prev.size(1), dc.data_ptr<scalar_t>(),
                                       dh.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
                                       tc.data_ptr<scalar_t>(), dgates.data_ptr<scalar_t>(),
                                       dc_prev.data_ptr<scalar_t>());
  });
  return {dgates, dc_prev};
}

// f applied to every element of a contiguous tensor, on the calling thread (as rows() in vec_math.h)
template <template <typename> class F>
at::Tensor elementwise(const char* op, const at::Tensor& x) {
  check_args(op, {x});
  auto y = at::empty_like(x);
  const int64_t N = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "elementwise", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    pieces<scalar_t>(N, [&](int64_t j, int64_t n) { F<scalar_t>::apply(V::loadu(xp + j, n)).store(yp + j, n); });
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
