// The elementwise phases of a recurrent step on raw row-major rows, shared by the per-step ops (gates.cpp) and
// the whole-sequence loops (highway_sequence.cpp, bn_lstm_sequence.cpp). Gate layouts are the cells': highway
// rows [h | t | c] (c only with a free carry gate), LSTM rows [i | f | g | o]; n rows of H units per gate.
// Callers check shapes, dtypes and contiguity; every pointer here addresses contiguous rows.
#pragma once

#include "team.h"
#include "vec_math.h"

#include <cmath>

namespace bnrhn_kernels {

// Highway layer, forward: act [n, G·H] holds the pre-activations (the bias b still to add on the gates whose
// add_bias is set, when bias is given) and is overwritten with [tanh p_h | σ p_t | σ p_c]; s_out ← s_l =
// h ⊙ t + s ⊙ c (c = 1 − t when G = 2); and s_in_next ← s_l ⊙ mask when s_in_next is given (the next
// layer's input under a recurrent-dropout mask).
template <typename T>
void highway_rows_forward(int64_t n, int64_t H, int64_t G, T* act, const T* bias, const bool* add_bias, const T* s,
                          T* s_out, const T* mask = nullptr, T* s_in_next = nullptr) {
  using V = Vectorized<T>;
  using A = Act<T>;
  const bool biased[3] = {bias && add_bias[0], bias && add_bias[1], bias && G == 3 && add_bias[2]};
  rows(n, [&](int64_t i) {
    T* a = act + i * G * H;
    const T* sp = s + i * H;
    T* op = s_out + i * H;
    pieces<T>(H, [&](int64_t j, int64_t w) {
      V ph = V::loadu(a + j, w), pt = V::loadu(a + H + j, w);
      if (biased[0]) ph = ph + V::loadu(bias + j, w);
      if (biased[1]) pt = pt + V::loadu(bias + H + j, w);
      const V h = A::tanh(ph), t = A::sigmoid(pt), sv = V::loadu(sp + j, w);
      h.store(a + j, w);
      t.store(a + H + j, w);
      V r;
      if (G == 2) {
        r = at::vec::fmadd(t, h - sv, sv);
      } else {
        V pc = V::loadu(a + 2 * H + j, w);
        if (biased[2]) pc = pc + V::loadu(bias + 2 * H + j, w);
        const V c = A::sigmoid(pc);
        c.store(a + 2 * H + j, w);
        r = at::vec::fmadd(h, t, sv * c);
      }
      r.store(op + j, w);
      if (s_in_next != nullptr) (r * V::loadu(mask + i * H + j, w)).store(s_in_next + i * H + j, w);
    });
  });
}

// Highway layer, backward: from ds = ∂L/∂s_l and the activations left by the forward, dp [n, G·H] ← ∂L/∂p and
// ds_prev [n, H] ← ∂L/∂s_{l−1}:
//   dp_h = ds t (1 − h²);  coupled: dp_t = ds (h − s) t (1 − t), ds_{l−1} = ds (1 − t);
//   free: dp_t = ds h t (1 − t), dp_c = ds s c (1 − c), ds_{l−1} = ds c.
template <typename T>
void highway_rows_backward(int64_t n, int64_t H, int64_t G, const T* ds, const T* act, const T* s, T* dp, T* ds_prev) {
  using V = Vectorized<T>;
  const V one(1);
  rows(n, [&](int64_t i) {
    const T* a = act + i * G * H;
    const T* sp = s + i * H;
    const T* gp = ds + i * H;
    T* d = dp + i * G * H;
    T* dsp = ds_prev + i * H;
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V h = V::loadu(a + j, w), t = V::loadu(a + H + j, w);
      const V gv = V::loadu(gp + j, w), sv = V::loadu(sp + j, w);
      const V gt = gv * t;
      (gt * (one - h * h)).store(d + j, w);
      const V dsig_t = t * (one - t);
      if (G == 2) {
        (gv * (h - sv) * dsig_t).store(d + H + j, w);
        (gv - gt).store(dsp + j, w);
      } else {
        const V c = V::loadu(a + 2 * H + j, w);
        (gv * h * dsig_t).store(d + H + j, w);
        (gv * sv * c * (one - c)).store(d + 2 * H + j, w);
        (gv * c).store(dsp + j, w);
      }
    });
  });
}

// LSTM gates, forward: act [n, 4H] holds the pre-activations (plus add [n, 4H] with row stride ld_add, when
// given) and is overwritten with [σ i | σ f | tanh g | σ o]; c ← σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g).
template <typename T>
void lstm_gates_rows_forward(int64_t n, int64_t H, T* act, const T* c_prev, T* c, const T* add = nullptr,
                             int64_t ld_add = 0) {
  using V = Vectorized<T>;
  using A = Act<T>;
  rows(n, [&](int64_t b) {
    T* a = act + b * 4 * H;
    const T* x = add != nullptr ? add + b * ld_add : nullptr;
    const T* cp = c_prev + b * H;
    T* co = c + b * H;
    auto pre = [&](int64_t col, int64_t w) {
      V p = V::loadu(a + col, w);
      return x != nullptr ? p + V::loadu(x + col, w) : p;
    };
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V i = A::sigmoid(pre(j, w));
      const V f = A::sigmoid(pre(H + j, w));
      const V gg = A::tanh(pre(2 * H + j, w));
      const V o = A::sigmoid(pre(3 * H + j, w));
      i.store(a + j, w);
      f.store(a + H + j, w);
      gg.store(a + 2 * H + j, w);
      o.store(a + 3 * H + j, w);
      at::vec::fmadd(f, V::loadu(cp + j, w), i * gg).store(co + j, w);
    });
  });
}

// LSTM output, forward: tc ← tanh ĉ, h ← σ(o) ⊙ tanh ĉ (act as left by lstm_gates_rows_forward).
template <typename T>
void lstm_output_rows_forward(int64_t n, int64_t H, const T* act, const T* c_hat, T* h, T* tc) {
  using V = Vectorized<T>;
  using A = Act<T>;
  rows(n, [&](int64_t b) {
    const T* o = act + b * 4 * H + 3 * H;
    const T* cp = c_hat + b * H;
    T* hp = h + b * H;
    T* tp = tc + b * H;
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V t = A::tanh(V::loadu(cp + j, w));
      t.store(tp + j, w);
      (V::loadu(o + j, w) * t).store(hp + j, w);
    });
  });
}

// LSTM output, backward: dc_hat ← ∂L/∂ĉ = dh ⊙ σ(o) ⊙ (1 − tanh² ĉ).
template <typename T>
void lstm_output_rows_backward(int64_t n, int64_t H, const T* dh, const T* act, const T* tc, T* dc_hat) {
  using V = Vectorized<T>;
  const V one(1);
  rows(n, [&](int64_t b) {
    const T* o = act + b * 4 * H + 3 * H;
    const T* g = dh + b * H;
    const T* tp = tc + b * H;
    T* d = dc_hat + b * H;
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V t = V::loadu(tp + j, w);
      (V::loadu(g + j, w) * V::loadu(o + j, w) * (one - t * t)).store(d + j, w);
    });
  });
}

// LSTM gates, backward: from dc = ∂L/∂c and dh = ∂L/∂h (for the o gate), dgates [n, 4H] ← ∂L/∂[i, f, g, o]
// pre-activations and dc_prev [n, H] ← ∂L/∂c_{t−1} = dc ⊙ σ(f):
//   di = dc g i(1 − i),  df = dc c_{t−1} f(1 − f),  dg = dc i (1 − g²),  do = dh tanh(ĉ) o(1 − o).
template <typename T>
void lstm_gates_rows_backward(int64_t n, int64_t H, const T* dc, const T* dh, const T* act, const T* c_prev,
                              const T* tc, T* dgates, T* dc_prev) {
  using V = Vectorized<T>;
  const V one(1);
  rows(n, [&](int64_t b) {
    const T* a = act + b * 4 * H;
    const T* dcp = dc + b * H;
    const T* dhp = dh + b * H;
    const T* cp = c_prev + b * H;
    const T* tp = tc + b * H;
    T* d = dgates + b * 4 * H;
    T* dprev = dc_prev + b * H;
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V i = V::loadu(a + j, w), f = V::loadu(a + H + j, w);
      const V gg = V::loadu(a + 2 * H + j, w), o = V::loadu(a + 3 * H + j, w);
      const V dcv = V::loadu(dcp + j, w);
      (dcv * gg * i * (one - i)).store(d + j, w);
      (dcv * V::loadu(cp + j, w) * f * (one - f)).store(d + H + j, w);
      (dcv * i * (one - gg * gg)).store(d + 2 * H + j, w);
      (V::loadu(dhp + j, w) * V::loadu(tp + j, w) * o * (one - o)).store(d + 3 * H + j, w);
      (dcv * f).store(dprev + j, w);
    });
  });
}

// GRU step (PyTorch's form), forward: act [n, 3H] holds the recurrent product hp = h_in W_hhᵀ + b_hh and is
// overwritten with [r | z | n]; hpn [n, H] ← hp_n (kept for the backward); h_out ← (1 − z) ⊙ n + z ⊙ h, with
//   r = σ(x_r + hp_r),  z = σ(x_z + hp_z),  n = tanh(x_n + r ⊙ hp_n)      (x: xp_t [n, 3H], row stride ld_x)
template <typename T>
void gru_rows_forward(int64_t n, int64_t H, T* act, const T* x, int64_t ld_x, const T* h, T* h_out, T* hpn) {
  using V = Vectorized<T>;
  using A = Act<T>;
  rows(n, [&](int64_t b) {
    T* a = act + b * 3 * H;
    const T* xb = x + b * ld_x;
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V hp_n = V::loadu(a + 2 * H + j, w);
      const V r = A::sigmoid(V::loadu(xb + j, w) + V::loadu(a + j, w));
      const V z = A::sigmoid(V::loadu(xb + H + j, w) + V::loadu(a + H + j, w));
      const V nn = A::tanh(at::vec::fmadd(r, hp_n, V::loadu(xb + 2 * H + j, w)));
      const V hv = V::loadu(h + b * H + j, w);
      hp_n.store(hpn + b * H + j, w);
      r.store(a + j, w);
      z.store(a + H + j, w);
      nn.store(a + 2 * H + j, w);
      at::vec::fmadd(z, hv - nn, nn).store(h_out + b * H + j, w);
    });
  });
}

// GRU step, backward: from dh = ∂L/∂h_t, dhp [n, 3H] ← ∂L/∂hp, dx [n, 3H] (row stride ld_dx) ← ∂L/∂xp_t when
// given, dh_prev [n, H] ← the direct part dh ⊙ z (the caller adds (dhp W_hh) ⊙ m):
//   dz = dh (h − n) z (1 − z),  dn = dh (1 − z)(1 − n²),  dr = dn hp_n r (1 − r),
//   dhp = [dr, dz, dn ⊙ r],  dx = [dr, dz, dn]
template <typename T>
void gru_rows_backward(int64_t n, int64_t H, const T* dh, const T* act, const T* hpn, const T* h, T* dhp, T* dx,
                       int64_t ld_dx, T* dh_prev) {
  using V = Vectorized<T>;
  const V one(1);
  rows(n, [&](int64_t b) {
    const T* a = act + b * 3 * H;
    T* d = dhp + b * 3 * H;
    T* e = dx != nullptr ? dx + b * ld_dx : nullptr;
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V r = V::loadu(a + j, w), z = V::loadu(a + H + j, w), nn = V::loadu(a + 2 * H + j, w);
      const V g = V::loadu(dh + b * H + j, w), hv = V::loadu(h + b * H + j, w);
      const V dz = g * (hv - nn) * z * (one - z);
      const V dn = g * (one - z) * (one - nn * nn);
      const V dr = dn * V::loadu(hpn + b * H + j, w) * r * (one - r);
      dr.store(d + j, w);
      dz.store(d + H + j, w);
      (dn * r).store(d + 2 * H + j, w);
      if (e != nullptr) {
        dr.store(e + j, w);
        dz.store(e + H + j, w);
        dn.store(e + 2 * H + j, w);
      }
      (g * z).store(dh_prev + b * H + j, w);
    });
  });
}

// Elman (tanh) RNN step, forward: h_out [n, H] ← tanh(x + hp), also into act [n, H] (kept for the backward);
// hp [n, H] = (h ⊙ m) W_hhᵀ, x: xp_t [n, H] (row stride ld_x, the biases folded in)
template <typename T>
void rnn_rows_forward(int64_t n, int64_t H, const T* hp, const T* x, int64_t ld_x, T* h_out, T* act) {
  using V = Vectorized<T>;
  rows(n, [&](int64_t b) {
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V h = Act<T>::tanh(V::loadu(x + b * ld_x + j, w) + V::loadu(hp + b * H + j, w));
      h.store(h_out + b * H + j, w);
      h.store(act + b * H + j, w);
    });
  });
}

// Elman RNN step, backward: da [n, H] ← ∂L/∂(x + hp) = dh ⊙ (1 − h²), also into dx (row stride ld_dx) when given
template <typename T>
void rnn_rows_backward(int64_t n, int64_t H, const T* dh, const T* act, T* da, T* dx, int64_t ld_dx) {
  using V = Vectorized<T>;
  const V one(1);
  rows(n, [&](int64_t b) {
    pieces<T>(H, [&](int64_t j, int64_t w) {
      const V h = V::loadu(act + b * H + j, w);
      const V d = V::loadu(dh + b * H + j, w) * (one - h * h);
      d.store(da + b * H + j, w);
      if (dx != nullptr) d.store(dx + b * ld_dx + j, w);
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Training-mode batch norm of W columns over n rows (one step's batch statistics), written out so that a layer
// step needs no tensor operation around its kernels:
//   forward    x̂ = (x − μ_B) / √(σ²_B + ε)  (μ_B, σ²_B the batch mean and biased variance of each column),
//              y = x̂ (γ r) + (γ d + β), with batch renormalization (Ioffe 2017)
//              r = clip(√(σ²_B + ε) / σ_pop, 1/rmax, rmax), d = clip((μ_B − μ_pop) / σ_pop, −dmax, dmax),
//              r = 1, d = 0 without it; β = 0 where there is none
//   backward   dx = γ r / √(σ²_B + ε) · (dy − mean(dy) − x̂ mean(dy x̂)),  dγ += r Σ dy x̂ + d Σ dy,  dβ += Σ dy
//              (r and d constants of the backward pass, as in the paper)
// Column pieces of one vector each; the row passes read strided rows of the caller's buffers.
template <typename T>
struct ColumnNorm {
  int64_t width;    // W
  const T* gamma;   // [W]
  const T* beta;    // [W] or nullptr
  T* xhat;          // [n, W]: written by the forward, read by the backward
  T* mean;          // [W] μ_B (forward)
  T* var;           // [W] σ²_B (forward)
  T* invstd;        // [W] 1 / √(σ²_B + ε)
  const T* bounds;  // renormalization: μ_pop, σ_pop, 1/rmax, rmax, dmax at bounds + k·stride, k = 0..4; or nullptr
  int64_t stride;
  T* r;             // [W] (renormalization only)
  T* d;             // [W]
};

// The team's total of column sums j..j+w−1 (at `offset` in each thread's sums of scratch slot `slot`), added in
// thread order: every thread computes the same
template <typename T>
Vectorized<T> team_total(const Team& team, int64_t slot, int64_t offset, int64_t j, int64_t w) {
  Vectorized<T> sum = Vectorized<T>::loadu(team.sums<T>(slot, 0) + offset + j, w);
  for (int p = 1; p < team.size(); ++p) sum = sum + Vectorized<T>::loadu(team.sums<T>(slot, p) + offset + j, w);
  return sum;
}

// y [n, W] (row stride ld_y; may be x itself) ← the normalised x [n, W] (row stride ld_x). With a team, each
// thread normalises its own rows (team.range(n)) and the column sums of all of them meet in the team's scratch;
// alone, the three passes run column piece by column piece (the piece's rows stay in cache between them).
template <typename T>
void normalise_forward(Team& team, int64_t n, const T* x, int64_t ld_x, T* y, int64_t ld_y, const ColumnNorm<T>& g,
                       double eps) {
  using V = Vectorized<T>;
  const int64_t W = g.width;
  const auto [lo, hi] = team.range(n);
  const V count(static_cast<T>(n)), veps(static_cast<T>(eps)), one(1), zero(0);
  auto column_sum = [&](int64_t j, int64_t w) {
    V sum(0);
    for (int64_t i = lo; i < hi; ++i) sum = sum + V::loadu(x + i * ld_x + j, w);
    return sum;
  };
  auto centred_squares = [&](int64_t j, int64_t w, const V& mean) {
    V sq(0);
    for (int64_t i = lo; i < hi; ++i) {
      const V c = V::loadu(x + i * ld_x + j, w) - mean;
      sq = at::vec::fmadd(c, c, sq);
    }
    return sq;
  };
  auto apply = [&](int64_t j, int64_t w, const V& mean, const V& var) {
    const V std = (var + veps).sqrt();
    const V invstd = one / std;
    const V gamma = V::loadu(g.gamma + j, w);
    const V beta = g.beta != nullptr ? V::loadu(g.beta + j, w) : zero;
    V scale = gamma, shift = beta, r, d;
    if (g.bounds != nullptr) {
      const T* b = g.bounds + j;
      const V pop_mean = V::loadu(b, w), pop_std = V::loadu(b + g.stride, w);
      const V rmin = V::loadu(b + 2 * g.stride, w), rmax = V::loadu(b + 3 * g.stride, w);
      const V dmax = V::loadu(b + 4 * g.stride, w);
      r = at::vec::minimum(at::vec::maximum(std / pop_std, rmin), rmax);
      d = at::vec::minimum(at::vec::maximum((mean - pop_mean) / pop_std, zero - dmax), dmax);
      scale = gamma * r;
      shift = at::vec::fmadd(gamma, d, beta);
    }
    if (team.leader()) {  // the statistics, once
      mean.store(g.mean + j, w);
      var.store(g.var + j, w);
      invstd.store(g.invstd + j, w);
      if (g.bounds != nullptr) {
        r.store(g.r + j, w);
        d.store(g.d + j, w);
      }
    }
    for (int64_t i = lo; i < hi; ++i) {
      const V xh = (V::loadu(x + i * ld_x + j, w) - mean) * invstd;
      xh.store(g.xhat + i * W + j, w);
      at::vec::fmadd(xh, scale, shift).store(y + i * ld_y + j, w);
    }
  };
  if (team.size() == 1) {
    pieces<T>(W, [&](int64_t j, int64_t w) {
      const V mean = column_sum(j, w) / count;
      apply(j, w, mean, centred_squares(j, w, mean) / count);
    });
    return;
  }
  auto total = [&](int64_t slot, int64_t j, int64_t w) { return team_total<T>(team, slot, 0, j, w); };
  team.check_room<T>(W);
  const int64_t sums = team.next_slot(), squares = team.next_slot();
  pieces<T>(W, [&](int64_t j, int64_t w) { column_sum(j, w).store(team.sums<T>(sums, team.id()) + j, w); });
  team.sync();
  pieces<T>(W, [&](int64_t j, int64_t w) {
    centred_squares(j, w, total(sums, j, w) / count).store(team.sums<T>(squares, team.id()) + j, w);
  });
  team.sync();
  pieces<T>(W, [&](int64_t j, int64_t w) { apply(j, w, total(sums, j, w) / count, total(squares, j, w) / count); });
}

// dy [n, W] (row stride ld) → dx in place; dγ and dβ (when given) accumulate. With a team as in normalise_forward
// (its leader accumulates dγ and dβ).
template <typename T>
void normalise_backward(Team& team, int64_t n, T* dy, int64_t ld, const ColumnNorm<T>& g, T* dgamma, T* dbeta) {
  using V = Vectorized<T>;
  const int64_t W = g.width;
  const auto [lo, hi] = team.range(n);
  const V count(static_cast<T>(n));
  auto column_sums = [&](int64_t j, int64_t w, V& sdy, V& sdyx) {
    sdy = V(0);
    sdyx = V(0);
    for (int64_t i = lo; i < hi; ++i) {
      const V v = V::loadu(dy + i * ld + j, w);
      sdy = sdy + v;
      sdyx = at::vec::fmadd(v, V::loadu(g.xhat + i * W + j, w), sdyx);
    }
  };
  auto apply = [&](int64_t j, int64_t w, const V& sdy, const V& sdyx) {
    V scale = V::loadu(g.gamma + j, w);
    V dg = sdyx;
    if (g.r != nullptr) {
      const V r = V::loadu(g.r + j, w);
      scale = scale * r;
      dg = at::vec::fmadd(V::loadu(g.d + j, w), sdy, r * sdyx);
    }
    if (team.leader()) {
      (V::loadu(dgamma + j, w) + dg).store(dgamma + j, w);
      if (dbeta != nullptr) (V::loadu(dbeta + j, w) + sdy).store(dbeta + j, w);
    }
    const V k = scale * V::loadu(g.invstd + j, w);
    const V mean_dy = sdy / count, mean_dyx = sdyx / count;
    for (int64_t i = lo; i < hi; ++i) {
      const V v = V::loadu(dy + i * ld + j, w), xh = V::loadu(g.xhat + i * W + j, w);
      (k * (v - mean_dy - xh * mean_dyx)).store(dy + i * ld + j, w);
    }
  };
  if (team.size() == 1) {
    pieces<T>(W, [&](int64_t j, int64_t w) {
      V sdy, sdyx;
      column_sums(j, w, sdy, sdyx);
      apply(j, w, sdy, sdyx);
    });
    return;
  }
  team.check_room<T>(2 * W);
  const int64_t slot = team.next_slot();  // [Σ dy | Σ dy x̂] of each thread
  pieces<T>(W, [&](int64_t j, int64_t w) {
    V sdy, sdyx;
    column_sums(j, w, sdy, sdyx);
    T* mine = team.sums<T>(slot, team.id());
    sdy.store(mine + j, w);
    sdyx.store(mine + W + j, w);
  });
  team.sync();
  pieces<T>(W, [&](int64_t j, int64_t w) {
    apply(j, w, team_total<T>(team, slot, 0, j, w), team_total<T>(team, slot, W, j, w));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Layer norm of W columns within each of n rows (Ba et al. 2016), for the highway cells' norm="layer":
//   forward    x̂_i = (x_i − μ_i) / √(σ²_i + ε)  (μ_i, σ²_i: row i's mean and biased variance),  y_i = γ ⊙ x̂_i + β
//   backward   g = dy ⊙ γ,  dx_i = (g_i − mean(g_i) − x̂_i mean(g_i ⊙ x̂_i)) / √(σ²_i + ε),
//              dγ += Σ_i dy_i ⊙ x̂_i,  dβ += Σ_i dy_i

// the sum of the lanes of v
template <typename T>
inline T lane_sum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T sum = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) sum += buf[k];
  return sum;
}

// y [n, W] (row stride ld_y; may be x itself) ← the layer-normalised x (row stride ld_x); xhat [n, W], invstd [n]
template <typename T>
void layer_norm_rows_forward(int64_t n, int64_t W, const T* x, int64_t ld_x, T* y, int64_t ld_y, const T* gamma,
                             const T* beta, double eps, T* xhat, T* invstd) {
  using V = Vectorized<T>;
  rows(n, [&](int64_t i) {
    const T* xi = x + i * ld_x;
    V acc(0);
    pieces<T>(W, [&](int64_t j, int64_t w) { acc = acc + V::loadu(xi + j, w); });  // partial loads fill zeros
    const V mean(lane_sum(acc) / static_cast<T>(W));
    V sq(0);
    pieces<T>(W, [&](int64_t j, int64_t w) {
      const V c = V::set(V(0), V::loadu(xi + j, w) - mean, w);  // only the w loaded lanes
      sq = at::vec::fmadd(c, c, sq);
    });
    const T inv = static_cast<T>(1) / std::sqrt(lane_sum(sq) / static_cast<T>(W) + static_cast<T>(eps));
    invstd[i] = inv;
    const V vinv(inv);
    pieces<T>(W, [&](int64_t j, int64_t w) {
      const V xh = (V::loadu(xi + j, w) - mean) * vinv;
      xh.store(xhat + i * W + j, w);
      const V b = beta != nullptr ? V::loadu(beta + j, w) : V(0);
      at::vec::fmadd(xh, V::loadu(gamma + j, w), b).store(y + i * ld_y + j, w);
    });
  });
}

// dy [n, W] (row stride ld) → dx in place; dγ and dβ (when given) accumulate
template <typename T>
void layer_norm_rows_backward(int64_t n, int64_t W, T* dy, int64_t ld, const T* gamma, const T* xhat,
                              const T* invstd, T* dgamma, T* dbeta) {
  using V = Vectorized<T>;
  pieces<T>(W, [&](int64_t j, int64_t w) {  // the parameters' sums over the rows, before dy is replaced
    V sdy = V::loadu(dgamma + j, w), sb = dbeta != nullptr ? V::loadu(dbeta + j, w) : V(0);
    for (int64_t i = 0; i < n; ++i) {
      const V v = V::loadu(dy + i * ld + j, w);
      sdy = at::vec::fmadd(v, V::loadu(xhat + i * W + j, w), sdy);
      sb = sb + v;
    }
    sdy.store(dgamma + j, w);
    if (dbeta != nullptr) sb.store(dbeta + j, w);
  });
  rows(n, [&](int64_t i) {
    T* di = dy + i * ld;
    const T* xi = xhat + i * W;
    V s1(0), s2(0);
    pieces<T>(W, [&](int64_t j, int64_t w) {
      const V g = V::loadu(di + j, w) * V::loadu(gamma + j, w);  // zero in the lanes not loaded
      s1 = s1 + g;
      s2 = at::vec::fmadd(g, V::loadu(xi + j, w), s2);
    });
    const V m1(lane_sum(s1) / static_cast<T>(W)), m2(lane_sum(s2) / static_cast<T>(W)), inv(invstd[i]);
    pieces<T>(W, [&](int64_t j, int64_t w) {
      const V g = V::loadu(di + j, w) * V::loadu(gamma + j, w);
      (inv * (g - m1 - V::loadu(xi + j, w) * m2)).store(di + j, w);
    });
  });
}

}  // namespace bnrhn_kernels
