// Vectorised activations and loop helpers shared by the CPU kernels (gates.cpp and the sequence loops, via
// row_kernels.h).
// Activations in float32 (why they are not Vectorized<float>::tanh()/exp()): on processors where the
// vendor vector math is slow (measured on an AVX2 AMD EPYC: torch.tanh 4.4 ns and Sleef's tanh 3.6 ns per
// element, exp_u20 0.6 ns), both are built on ATen's exp_u20 instead, with their known identities:
//     σ(x)    = 1 / (1 + e^{−x})
//     tanh(x) = sign(x) · (1 − 2 / (e^{2|x|} + 1))                            for |x| ≥ 1/4
//     tanh(x) = x − x³/3 + 2x⁵/15 − 17x⁷/315 + 62x⁹/2835 − 1382x¹¹/155925     for |x| < 1/4
// (the Taylor series, where the first form would lose relative precision to cancellation; its next term,
// 21844x¹³/6081075, is below 6·10⁻¹¹ there). NaN inputs give NaN. float64 uses ATen's own tanh and exp.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace bnrhn_kernels {

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

// f(j, n) for the vector-sized pieces of a row of length `cols` (the last one may be shorter)
template <typename T, typename F>
inline void pieces(int64_t cols, const F& f) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + W <= cols; j += W) f(j, W);
  if (j < cols) f(j, cols - j);
}

// f(b) for rows b = 0..B−1, on the calling thread. The passes were once written as at::parallel_for (~16k elements
// per task), which ran serially while the extension was built without -fopenmp; built with it (tried 2026-12-07,
// docs/performance.md) the training steps at hidden size 128 and 512 were no faster. The extension is now built
// with -fopenmp for the loops' batch split (team.h), which shares a step's rows among threads instead; a pass
// here stays on its thread.
template <typename F>
inline void rows(int64_t B, const F& f) {
  for (int64_t b = 0; b < B; ++b) f(b);
}

}  // namespace bnrhn_kernels
