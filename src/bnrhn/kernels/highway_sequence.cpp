// A whole sequence of highway layers, forward and backward, as one C++ loop: what
// bnrhn/cells/highway_sequence.py's HighwaySequence does in Python, for every configuration in which no step
// reads population statistics that an earlier step of the same sequence updates (batch renormalization with
// steps sharing a slot stays in Python). Same equations:
//
//   forward, t = 0..T−1, l = 1..L:  a = base_{t,l} + (s_{l−1} ⊙ m) R_lᵀ         (PyTorch's addmm, or oneDNN: sequence.h)
//     normalised gates g:            â_g = (a_g − μ_B) / √(σ²_B + ε)   (μ_B, σ²_B: this step's batch mean and
//                                    biased variance),  p_g = γ_g (â_g r + d) + b_g,  with batch renormalization
//                                    (Ioffe 2017) r = clip(√(σ²_B + ε) / σ_pop, 1/rmax, rmax),
//                                    d = clip((μ_B − μ_pop) / σ_pop, −dmax, dmax); r = 1, d = 0 without it
//                                    or p_g = γ_g LN(a_g) + b_g, a layer norm of each row (norm="layer": the
//                                    public TensorFlow code's variant; row_kernels.h has its equations)
//     the other gates:               p_g = a_g + b_g
//                                    s_l = tanh(p_h) σ(p_t) + s_{l−1} c,  c = σ(p_c) or 1 − σ(p_t)
//   backward, in reverse:            dp, ds_{l−1} from ds_l (row_kernels.h's highway_rows_backward)
//     normalised gates:              da_g = γ_g r / √(σ²_B + ε) · (dp_g − mean(dp_g) − â_g mean(dp_g â_g))
//                                    dγ_g += r Σ dp_g â_g + d Σ dp_g,   db_g += Σ dp_g      (r, d constants)
//                                    ds_{l−1} += (da R_l) ⊙ m            (PyTorch's addmm, or oneDNN: sequence.h)
//   per layer, once:                 dR_l = [da_{0,l}; …; da_{T−1,l}]ᵀ [s_{0,l−1} ⊙ m; …],  db_l = Σ da on the others
//
// Why in C++, with the batch norm written out rather than PyTorch's kernel: at hidden size 128 a highway
// layer's product takes ~60 µs, and each further tensor operation around it (a view, a copy, batch norm's
// three passes and its bookkeeping) costs 1–20 µs through the dispatcher. Measured on the training step of a
// 3-layer BN-RHN (B 64, T 20, H 128, AVX-512 EPYC): the Python loop spent ~2× the products' time around them,
// a C++ loop calling ATen for everything still ~1.3×. Here a layer step is one product and one pass of this
// file's kernels over the step's rows; the products stay PyTorch's.
//
// Packed rows (sorted by length, n_t rows at step t, non-increasing): every per-step record of layer l is stored
// in one buffer [N, ·] with N = Σ n_t, step t's rows at offset Σ_{u<t} n_u, so the weight gradient is one product
// over the buffer. A row that drops out keeps its state as its final state.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "row_kernels.h"
#include "sequence.h"

namespace bnrhn_kernels {
namespace {

using at::Tensor;

constexpr const char* kOp = "highway_sequence";

struct Shape : Packing {
  int64_t H, G, L, K;
};

Shape shape_of(int64_t T, int64_t B, const Tensor& s0, at::TensorList weights, at::IntArrayRef normed,
               at::IntArrayRef active, bool layer_norm) {
  Shape sh;
  sh.H = s0.size(1);
  sh.L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(sh.L >= 1 && weights[0].size(1) == sh.H, "highway_sequence: expected L ≥ 1 weights [G·H, H]");
  sh.G = weights[0].size(0) / sh.H;
  TORCH_CHECK(sh.G == 2 || sh.G == 3, "highway_sequence: G must be 2 or 3, got ", sh.G);
  sh.K = static_cast<int64_t>(normed.size());
  for (int64_t g : normed) TORCH_CHECK(g >= 0 && g < sh.G, "highway_sequence: normed gate index out of range");
  static_cast<Packing&>(sh) = packing(kOp, T, B, active, sh.K > 0 && !layer_norm ? 2 : 0);
  return sh;
}

// ---------------------------------------------------------------------------------------------------------------
// The time loops.

struct Records {  // what the forward keeps for the backward
  Tensor acts, s_prev, s_in, xhat, mean, var, invstd, r, d;
};

// The batch norm of normalised gate k of layer l at step t (its columns start at normed[k]·H of the layer's rows)
template <typename T>
ColumnNorm<T> gate_norm(const Records& rec, const Shape& sh, at::TensorList gammas, at::TensorList biases,
                        const c10::optional<Tensor>& renorm, at::IntArrayRef normed, int64_t l, int64_t k, int64_t t) {
  const int64_t H = sh.H, K = sh.K, off = sh.offset[t];
  const int64_t lk = l * K + k, stat = (lk * sh.T + t) * H;
  ColumnNorm<T> g;
  g.width = H;
  g.gamma = gammas[lk].data_ptr<T>();
  g.beta = biases.empty() ? nullptr : biases[l].data_ptr<T>() + normed[k] * H;
  g.xhat = rec.xhat.data_ptr<T>() + (lk * sh.N + off) * H;
  g.mean = rec.mean.defined() ? rec.mean.data_ptr<T>() + stat : nullptr;
  g.var = rec.var.defined() ? rec.var.data_ptr<T>() + stat : nullptr;
  g.invstd = rec.invstd.data_ptr<T>() + stat;
  g.stride = sh.T * H;
  g.bounds = renorm.has_value() ? renorm->data_ptr<T>() + lk * 5 * g.stride + t * H : nullptr;
  const bool renormalised = rec.r.defined();
  g.r = renormalised ? rec.r.data_ptr<T>() + stat : nullptr;
  g.d = renormalised ? rec.d.data_ptr<T>() + stat : nullptr;
  return g;
}

// The forward of this thread's rows of every step (team.range: all of them when it works alone)
template <typename T>
void forward_loop(Team& team, const Shape& sh, const Tensor& xp, const Tensor& s0, const c10::optional<Tensor>& h_mask,
                  at::TensorList weights, at::TensorList biases, at::TensorList gammas, at::IntArrayRef reads_input,
                  at::IntArrayRef bias_in_product, at::IntArrayRef normed, double eps, bool layer_norm,
                  const c10::optional<Tensor>& renorm, const std::vector<Tensor>& packed, const Tensor& out,
                  const Tensor& final_state, Records& rec) {
  const int64_t steps = sh.T, B = sh.B, H = sh.H, G = sh.G, L = sh.L, K = sh.K, GH = G * H, P = xp.size(2);
  const Tensor xp2 = xp.view({steps * B, P});
  std::vector<Tensor> weights_t, acts, inputs;  // per layer: R_lᵀ, acts [N, G·H], the product's input [N, H]
  for (int64_t l = 0; l < L; ++l) {
    weights_t.push_back(weights[l].t());
    acts.push_back(rec.acts[l]);
    inputs.push_back(h_mask.has_value() ? rec.s_in[l] : rec.s_prev[l]);
  }
  T* out_p = out.data_ptr<T>();
  T* final_p = final_state.data_ptr<T>();
  const T* mask_p = ptr_or_null<T>(h_mask);
  T* s_prev_p = rec.s_prev.data_ptr<T>();
  T* s_in_p = h_mask.has_value() ? rec.s_in.data_ptr<T>() : nullptr;
  T* acts_p = rec.acts.data_ptr<T>();
  const T* s = s0.data_ptr<T>();  // the state entering step t, ≥ n_t rows
  int64_t s_rows = B;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t n = sh.rows[t], off = sh.offset[t];
    team.enter_step(n);
    if (team.leader()) keep_final_rows(final_p, s, n, s_rows, H);  // rows ending before step t
    s_rows = n;
    const auto [lo, hi] = team.range(n);
    const int64_t c = hi - lo;  // this thread's rows lo..hi−1 of the step's n
    const T* mask = mask_p != nullptr ? mask_p + lo * H : nullptr;
    T* sp0 = s_prev_p + off * H;
    std::memcpy(sp0 + lo * H, s + lo * H, c * H * sizeof(T));
    if (mask != nullptr) masked_copy(s_in_p + (off + lo) * H, sp0 + lo * H, mask, c * H);  // layer 1's masked input
                                                                                        // (the others' below)
    int64_t chunk = 0;
    for (int64_t l = 0; l < L; ++l) {
      const Tensor base = reads_input[l] ? xp2.narrow(0, t * B + lo, c).narrow(1, (chunk++) * GH, GH) : Tensor();
      if (c > 0) {
        recurrent_product(acts[l].narrow(0, off + lo, c), inputs[l].narrow(0, off + lo, c), weights_t[l], packed[l],
                          base, bias_in_product[l] ? biases[l] : Tensor());
      }
      T* act_p = acts_p + (l * sh.N + off) * GH;  // the step's first row
      bool add_bias[3] = {false, false, false};
      const T* bias_p = nullptr;
      if (K > 0) {  // b is added after the normaliser, here or in normalise_forward
        bias_p = biases[l].data_ptr<T>();
        for (int64_t g = 0; g < G; ++g) add_bias[g] = true;
        for (int64_t k = 0; k < K; ++k) {
          add_bias[normed[k]] = false;
          T* cols = act_p + normed[k] * H;  // p = BN(a) + b or LN(a) + b, in place
          if (layer_norm) {
            const int64_t lk = l * K + k;
            layer_norm_rows_forward<T>(c, H, cols + lo * GH, GH, cols + lo * GH, GH, gammas[lk].data_ptr<T>(),
                                       bias_p + normed[k] * H, eps, rec.xhat.data_ptr<T>() + (lk * sh.N + off + lo) * H,
                                       rec.invstd.data_ptr<T>() + lk * sh.N + off + lo);
          } else {
            normalise_forward<T>(team, n, cols, GH, cols, GH,
                                 gate_norm<T>(rec, sh, gammas, biases, renorm, normed, l, k, t), eps);
          }
        }
      }
      const bool last = l + 1 == L;
      T* next = last ? out_p + t * B * H : s_prev_p + ((l + 1) * sh.N + off) * H;
      T* next_in = (!last && mask != nullptr) ? s_in_p + ((l + 1) * sh.N + off + lo) * H : nullptr;
      highway_rows_forward<T>(c, H, G, act_p + lo * GH, bias_p, add_bias, s_prev_p + (l * sh.N + off + lo) * H,
                              next + lo * H, mask, next_in);
    }
    s = out_p + t * B * H;
  }
}

// layer_norm: the normalised gates take a layer norm of each row (norm="layer") instead of batch norm.
// renorm [L, K, 5, T, H]: per normalised gate and step, the population's (μ_pop, σ_pop, 1/rmax, rmax, dmax), or
// None (plain batch statistics).
// → [out [T, B, H], final [B, H], acts [L, N, G·H], s_prev [L, N, H], s_in [L, N, H] (no mask: empty),
//    xhat [L, K, N, H], mean, var, invstd [L, K, T, H] (empty when K = 0; layer norm: no mean and var, invstd
//    [L, K, N] per row), r, d [L, K, T, H] (empty without renorm)]
std::vector<Tensor> highway_sequence_forward(
    const Tensor& xp, const Tensor& s0, const c10::optional<Tensor>& h_mask, at::TensorList weights,
    at::TensorList biases, at::TensorList gammas, at::IntArrayRef reads_input, at::IntArrayRef bias_in_product,
    at::IntArrayRef normed, double eps, at::IntArrayRef active, const c10::optional<Tensor>& renorm,
    bool layer_norm, const c10::optional<at::TensorList>& packed, int64_t parts) {
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble, "highway_sequence: float32 or float64 only");
  TORCH_CHECK(xp.dim() == 3 && s0.dim() == 2 && s0.size(0) == xp.size(1), "highway_sequence: xp [T, B, P], s0 [B, H]");
  check_tensor(kOp, "xp", xp, xp);
  check_tensor(kOp, "s0", s0, xp);
  check_mask(kOp, h_mask, s0, "s0", xp);
  const Shape sh = shape_of(xp.size(0), xp.size(1), s0, weights, normed, active, layer_norm);
  const int64_t T = sh.T, B = sh.B, H = sh.H, G = sh.G, L = sh.L, K = sh.K;
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(gammas.size()) == L * K &&
                  static_cast<int64_t>(reads_input.size()) == L && static_cast<int64_t>(bias_in_product.size()) == L,
              "highway_sequence: expected L biases, L·K gammas, L flags each");
  int64_t n_chunks = 0;
  for (int64_t l = 0; l < L; ++l) n_chunks += reads_input[l] ? 1 : 0;
  TORCH_CHECK(xp.size(2) == n_chunks * G * H, "highway_sequence: xp's last dimension must be ", n_chunks, "·G·H");
  for (int64_t l = 0; l < L; ++l) {
    check_tensor(kOp, "weights", weights[l], xp);
    TORCH_CHECK(weights[l].sizes() == at::IntArrayRef({G * H, H}), "highway_sequence: every weight must be [G·H, H]");
    check_tensor(kOp, "biases", biases[l], xp);
    TORCH_CHECK(biases[l].numel() == G * H, "highway_sequence: every bias must have G·H entries");
  }
  for (const Tensor& g : gammas) {
    check_tensor(kOp, "gammas", g, xp);
    TORCH_CHECK(g.numel() == H, "highway_sequence: every γ must have H entries");
  }
  const auto opts = xp.options();
  Tensor out = sh.rows.back() < B ? at::zeros({T, B, H}, opts) : at::empty({T, B, H}, opts);
  Tensor final_state = at::empty({B, H}, opts);
  Records rec;
  rec.acts = at::empty({L, sh.N, G * H}, opts);
  rec.s_prev = at::empty({L, sh.N, H}, opts);
  if (h_mask.has_value()) rec.s_in = at::empty({L, sh.N, H}, opts);
  if (K > 0) {
    rec.xhat = at::empty({L, K, sh.N, H}, opts);
    if (layer_norm) {
      rec.invstd = at::empty({L, K, sh.N}, opts);
    } else {
      rec.mean = at::empty({L, K, T, H}, opts);
      rec.var = at::empty({L, K, T, H}, opts);
      rec.invstd = at::empty({L, K, T, H}, opts);
    }
  }
  TORCH_CHECK(!(layer_norm && renorm.has_value()), "highway_sequence: renorm applies to batch norm only");
  if (renorm.has_value()) {
    TORCH_CHECK(K > 0 && renorm->sizes() == at::IntArrayRef({L, K, 5, T, H}), "highway_sequence: renorm must be [L, K, 5, T, H]");
    check_tensor(kOp, "renorm", *renorm, xp);
    rec.r = at::empty({L, K, T, H}, opts);
    rec.d = at::empty({L, K, T, H}, opts);
  }
  const std::vector<Tensor> packed_l = packed_weights(kOp, packed, weights);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "highway_sequence_forward", [&] {
    run_loop(parts, team_scratch_size<scalar_t>(parts, 2 * H), [&](Team& team) {
      forward_loop<scalar_t>(team, sh, xp, s0, h_mask, weights, biases, gammas, reads_input, bias_in_product, normed,
                             eps, layer_norm, renorm, packed_l, out, final_state, rec);
    });
    keep_final_rows(final_state.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + (T - 1) * B * H, 0, sh.rows.back(), H);
  });
  std::vector<Tensor> results = {out, final_state, rec.acts, rec.s_prev, rec.s_in, rec.xhat, rec.mean, rec.var,
                                 rec.invstd, rec.r, rec.d};
  for (Tensor& x : results) {
    if (!x.defined()) x = at::empty({0}, opts);  // a Tensor[] holds no None: empty stands for "not computed"
  }
  return results;
}

// The backward of this thread's rows of every step (team.range: all of them when it works alone). dgammas and
// dbetas are this thread's: batch norm's are the team's (its leader adds them), layer norm's this thread's share
// (the caller sums the threads').
template <typename T>
void backward_loop(Team& team, const Shape& sh, const Tensor& grad_out, const Tensor& grad_final,
                   const c10::optional<Tensor>& h_mask, const Records& rec, at::TensorList weights,
                   at::TensorList gammas, at::IntArrayRef reads_input, at::IntArrayRef normed, bool layer_norm,
                   const Tensor& dxp, const Tensor& das, const Tensor& dgammas, const Tensor& dbetas,
                   const Tensor& ds_a, const Tensor& ds_b, const Tensor& product, const std::vector<Tensor>& packed_t) {
  const int64_t steps = sh.T, B = sh.B, H = sh.H, G = sh.G, L = sh.L, K = sh.K, GH = G * H;
  int64_t n_chunks = 0;
  for (int64_t l = 0; l < L; ++l) n_chunks += reads_input[l] ? 1 : 0;
  const int64_t P = n_chunks * GH;
  const T* go = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  const T* gf = grad_final.defined() ? grad_final.data_ptr<T>() : nullptr;
  const T* mask_p = ptr_or_null<T>(h_mask);
  const T* acts_p = rec.acts.data_ptr<T>();
  const T* s_prev_p = rec.s_prev.data_ptr<T>();
  T* das_p = das.data_ptr<T>();
  T* dxp_p = dxp.defined() ? dxp.data_ptr<T>() : nullptr;
  std::vector<Tensor> das_l;
  for (int64_t l = 0; l < L; ++l) das_l.push_back(das[l]);
  Tensor ds = ds_a, ds_other = ds_b;  // [B, H] each: ∂L/∂s of the current layer input, and the next
  int64_t m = 0;  // rows of ds in use
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t n = sh.rows[t], off = sh.offset[t];
    team.enter_step(n);
    const auto [lo, hi] = team.range(n);
    const int64_t c = hi - lo;  // this thread's rows lo..hi−1 of the step's n
    const T* mask = mask_p != nullptr ? mask_p + lo * H : nullptr;
    state_gradient_rows(ds.data_ptr<T>(), m, lo, hi, t, B, H, gf, go);
    m = std::max(m, n);
    int64_t chunk = n_chunks;
    for (int64_t l = L - 1; l >= 0; --l) {
      T* da = das_p + (l * sh.N + off) * GH;  // the step's first row
      highway_rows_backward<T>(c, H, G, ds.data_ptr<T>() + lo * H, acts_p + (l * sh.N + off + lo) * GH,
                               s_prev_p + (l * sh.N + off + lo) * H, da + lo * GH, ds_other.data_ptr<T>() + lo * H);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t lk = l * K + k;
        T* dgamma = dgammas.data_ptr<T>() + lk * H;
        T* dbeta = dbetas.data_ptr<T>() + lk * H;
        if (layer_norm) {
          layer_norm_rows_backward<T>(c, H, da + lo * GH + normed[k] * H, GH, gammas[lk].data_ptr<T>(),
                                      rec.xhat.data_ptr<T>() + (lk * sh.N + off + lo) * H,
                                      rec.invstd.data_ptr<T>() + lk * sh.N + off + lo, dgamma, dbeta);
        } else {
          const ColumnNorm<T> g = gate_norm<T>(rec, sh, gammas, {}, c10::nullopt, normed, l, k, t);
          normalise_backward<T>(team, n, da + normed[k] * H, GH, g, dgamma, dbeta);
        }
      }
      if (reads_input[l]) {
        --chunk;
        if (dxp_p != nullptr) {
          for (int64_t i = lo; i < hi; ++i) {
            std::memcpy(dxp_p + (t * B + i) * P + chunk * GH, da + i * GH, GH * sizeof(T));
          }
        }
      }
      // ds_{l−1} = highway′ + (da R_l) ⊙ m
      if (c > 0) {
        add_masked_product<T>(ds_other.narrow(0, lo, c), das_l[l].narrow(0, off + lo, c), weights[l], mask,
                              product.defined() ? product.narrow(0, lo, c) : product, packed_t[l]);
      }
      std::swap(ds, ds_other);
    }
  }
}

// → (dxp [T, B, P] or None, ds0 [B, H], dR_l per layer, db_l per layer (empty where the bias is not an input of this
//    loop: in xp), dγ per normalised gate and layer)
std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> highway_sequence_backward(
    const c10::optional<Tensor>& grad_out, const c10::optional<Tensor>& grad_final, at::IntArrayRef xp_size,
    const Tensor& s0, const c10::optional<Tensor>& h_mask, const Tensor& acts, const Tensor& s_prev,
    const c10::optional<Tensor>& s_in, const c10::optional<Tensor>& xhat, const c10::optional<Tensor>& invstd,
    const c10::optional<Tensor>& r, const c10::optional<Tensor>& d, at::TensorList weights, at::TensorList gammas,
    at::IntArrayRef reads_input, at::IntArrayRef bias_in_product, at::IntArrayRef normed, at::IntArrayRef active,
    bool layer_norm, bool need_xp, const c10::optional<at::TensorList>& packed_t, int64_t parts) {
  TORCH_CHECK(xp_size.size() == 3, "highway_sequence_backward: xp_size must be [T, B, P]");
  const Shape sh = shape_of(xp_size[0], xp_size[1], s0, weights, normed, active, layer_norm);
  const int64_t B = sh.B, H = sh.H, G = sh.G, L = sh.L, K = sh.K;
  const auto opts = acts.options();
  Records rec;
  rec.acts = acts;
  rec.s_prev = s_prev;
  if (s_in.has_value()) rec.s_in = *s_in;
  if (K > 0) {
    TORCH_CHECK(xhat.has_value() && invstd.has_value(), "highway_sequence_backward: xhat and invstd are needed");
    rec.xhat = *xhat;
    rec.invstd = *invstd;
  }
  if (r.has_value()) {
    rec.r = *r;
    rec.d = *d;
  }
  const Tensor go = dense_or_undefined(grad_out), gf = dense_or_undefined(grad_final);
  const Tensor dxp = need_xp ? input_gradient(sh, xp_size[2], opts) : Tensor();
  Tensor das = at::empty({L, sh.N, G * H}, opts);
  // layer norm's dγ and dβ: one share per thread, summed below (batch norm's: the team's leader adds them)
  const int64_t shares = layer_norm && parts > 1 ? parts : 1;
  Tensor dgammas = at::zeros({shares, L * K, H}, opts), dbetas = at::zeros({shares, L * K, H}, opts);
  Tensor ds_a = at::empty({B, H}, opts), ds_b = at::empty({B, H}, opts);
  const Tensor product = h_mask.has_value() ? at::empty({B, H}, opts) : Tensor();
  const std::vector<Tensor> packed_t_l = packed_transposed_weights(kOp, packed_t, weights);
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "highway_sequence_backward", [&] {
    run_loop(parts, team_scratch_size<scalar_t>(parts, 2 * H), [&](Team& team) {
      const int64_t share = shares > 1 ? team.id() : 0;
      backward_loop<scalar_t>(team, sh, go, gf, h_mask, rec, weights, gammas, reads_input, normed, layer_norm, dxp,
                              das, dgammas[share], dbetas[share], ds_a, ds_b, product, packed_t_l);
    });
    finish_state_gradient<scalar_t>(sh, H, gf, ds_a, ds_b, sh.T * L);  // one swap per step and layer
  });
  if (shares > 1) {  // the threads' shares, in thread order
    dgammas = dgammas.sum(0, /*keepdim=*/true);
    dbetas = dbetas.sum(0, /*keepdim=*/true);
  }
  dgammas = dgammas[0];
  dbetas = dbetas[0];
  std::vector<Tensor> dweights, dbiases, dgamma_list;
  for (int64_t l = 0; l < L; ++l) {
    dweights.push_back(at::mm(das[l].t(), h_mask.has_value() ? rec.s_in[l] : rec.s_prev[l]));
    if (K > 0 || bias_in_product[l]) {
      Tensor db = das[l].sum(at::IntArrayRef{0});  // Σ da = Σ dp on the gates without a normaliser
      for (int64_t k = 0; k < K; ++k) db.narrow(0, normed[k] * H, H).copy_(dbetas[l * K + k]);  // Σ dp on the others
      dbiases.push_back(db);
    } else {
      dbiases.push_back(at::empty({0}, opts));
    }
    for (int64_t k = 0; k < K; ++k) dgamma_list.push_back(dgammas[l * K + k]);
  }
  return {dxp, ds_a, dweights, dbiases, dgamma_list};
}

}  // namespace
}  // namespace bnrhn_kernels

TORCH_LIBRARY_FRAGMENT(bnrhn_gates, m) {
  m.def("highway_sequence_forward(Tensor xp, Tensor s0, Tensor? h_mask, Tensor[] weights, Tensor[] biases, "
        "Tensor[] gammas, int[] reads_input, int[] bias_in_product, int[] normed, float eps, int[] active, "
        "Tensor? renorm, bool layer_norm, Tensor[]? packed=None, int parts=1) -> Tensor[]");
  m.def("highway_sequence_backward(Tensor? grad_out, Tensor? grad_final, int[] xp_size, Tensor s0, Tensor? h_mask, "
        "Tensor acts, Tensor s_prev, Tensor? s_in, Tensor? xhat, Tensor? invstd, Tensor? r, Tensor? d, "
        "Tensor[] weights, Tensor[] gammas, int[] reads_input, int[] bias_in_product, int[] normed, int[] active, "
        "bool layer_norm, bool need_xp, Tensor[]? packed_t=None, int parts=1) -> (Tensor, Tensor, Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(bnrhn_gates, CPU, m) {
  m.impl("highway_sequence_forward", bnrhn_kernels::highway_sequence_forward);
  m.impl("highway_sequence_backward", bnrhn_kernels::highway_sequence_backward);
}
