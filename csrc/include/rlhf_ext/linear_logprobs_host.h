// linear_token_logprobs: token_logprobs(hidden @ weight.T + bias, target)
// without ever holding the whole [N, V] logits. A composite of GEMMs (at::mm:
// torch's CPU GEMM, cuBLAS on CUDA) and the row loops of token_logprobs, run
// chunk by chunk; shared by the CPU and CUDA entry points, which pass their
// row loops in (RowKernels).
//
// Only rows whose target is not ignore_index are computed: their indices are
// gathered once (one host sync on CUDA, for the count) and the chunks hold
// valid rows only.
//
// Logits tiles are float32 for bf16/fp16 inputs on CUDA (see
// LinearProblem::float32_logits), else in the inputs' dtype.
//
// Forward: chunks of `chunk_rows` valid rows; per chunk one GEMM into a
// [chunk_rows, V] tile, then the forward row loop, which keeps only per-row
// float32 statistics (logprob, entropy, log-sum-exp). Each chunk's row count
// is padded up to a multiple of kRowQuantum (repeating a row), so every GEMM
// a row goes through has at least that many rows: small-M GEMMs take other
// code paths (GEMV) whose sums round differently, and batch invariance needs
// the same path for a row alone or in a batch.
//
// Backward: tiles of [tile_rows, tile_vocab] over (vocabulary chunk, token
// chunk), vocabulary outermost. Each tile's logits are recomputed, turned
// into d loss / d logits in place by the backward row loop (from the saved
// log-sum-exp and entropy; a float32 tile's gradient is then converted to the
// inputs' dtype for the GEMMs), and then
//   grad_hidden[rows]  += dlogits @ weight[cols]       (float32 accumulator)
//   grad_weight[cols]  += dlogits^T @ hidden[rows]
//   grad_bias[cols]    += sum over rows of dlogits     (float32)
// When a vocabulary chunk spans all valid rows in one tile (the usual case),
// grad_weight[cols] is one GEMM written straight into the output (the GEMM's
// own float32 accumulation); otherwise a float32 [tile_vocab, H] accumulator
// collects it over the token chunks. See tile_geometry for the memory bound.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "rlhf_ext/checks.h"
#include "rlhf_ext/logprobs_host.h"

namespace rlhf_ext {

constexpr const char* kLinearLogprobsOp = "rlhf_ext.linear_token_logprobs";
constexpr int64_t kRowQuantum = 16;
// The narrowest vocabulary chunk of the backward: below it a GEMM is too thin
// to run near its peak, so the token chunk shrinks instead.
constexpr int64_t kMinTileVocab = 1024;
constexpr int64_t kVocabQuantum = 64;

struct LinearProblem {
  at::Tensor hidden;  // [N, H], rows with stride 1
  at::Tensor weight;  // [V, H], contiguous
  at::Tensor bias;    // [V] or undefined
  at::Tensor target;  // int64 [N]
  at::Tensor valid;   // int64 [Nv]: indices of the rows whose target is not ignore_index
  int64_t rows = 0, hidden_size = 0, vocab = 0;
  TransformSettings transform;  // temps: acc_dtype [N], or undefined
  int64_t ignore_index = -100;
  int64_t chunk_rows = 1;
  at::ScalarType acc_dtype = at::kFloat;
  // bf16/fp16 on CUDA: logits tiles in float32 (cuBLAS's float32 sums, never
  // rounded), in the forward and in the backward's recomputation alike. With
  // tiles rounded to bf16 the two GEMMs (of different shapes, so possibly
  // different cuBLAS kernels) can round a logit differently; for a confident
  // token the gradient 1 - p is then swamped by p times one rounding step.
  // torch's CPU GEMM has no float32 output for these dtypes: CPU tiles keep
  // the inputs' dtype.
  bool float32_logits = false;
  std::vector<int64_t> lead_shape;  // hidden.shape[:-1]
};

inline void check_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& target) {
  const char* op = kLinearLogprobsOp;
  check_floating(op, "hidden", hidden);
  check_floating(op, "weight", weight);
  TORCH_CHECK_VALUE(hidden.dim() >= 1, op, ": `hidden` must have shape [..., H], got ",
                    shape_str(hidden));
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) >= 1, op,
                    ": `weight` must have shape [V, H] with V >= 1, got ", shape_str(weight));
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(-1), op, ": `weight` must have shape [V, ",
                    hidden.size(-1), "] (H of `hidden`), got ", shape_str(weight));
  check_same_device(op, "weight", weight, hidden);
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), op,
                   ": `weight` must have the dtype of `hidden` (", hidden.scalar_type(),
                   "), got ", weight.scalar_type());
  if (bias.has_value() && bias->defined()) {
    check_same_device(op, "bias", *bias, hidden);
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), op,
                     ": `bias` must have the dtype of `hidden` (", hidden.scalar_type(),
                     "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": `bias` must have shape [", weight.size(0), "] (V of `weight`), got ",
                      shape_str(*bias));
  }
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
                   ": `target` must be int64 or int32, got ", target.scalar_type());
  check_same_device(op, "target", target, hidden);
  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  TORCH_CHECK_VALUE(target.sizes() == lead, op, ": `target` must have shape ", lead,
                    " (the shape of `hidden` without its last dimension), got ",
                    shape_str(target));
}

inline LinearProblem prepare_linear(const at::Tensor& hidden, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const at::Tensor& target, double temperature,
                                    const std::optional<at::Tensor>& temperatures,
                                    double logit_scale, double softcap, int64_t ignore_index,
                                    int64_t chunk_size) {
  const char* op = kLinearLogprobsOp;
  check_linear_inputs(hidden, weight, bias, target);
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": `chunk_size` must be an int >= 1, got ", chunk_size);
  LinearProblem p;
  p.hidden_size = hidden.size(-1);
  p.vocab = weight.size(0);
  p.rows = target.numel();
  p.ignore_index = ignore_index;
  p.chunk_rows = chunk_size;
  p.acc_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.transform = transform_settings(op, temperature, temperatures, logit_scale, softcap, hidden,
                                   hidden.sizes().slice(0, hidden.dim() - 1), p.acc_dtype);
  p.float32_logits = hidden.is_cuda() && (hidden.scalar_type() == at::kBFloat16 ||
                                          hidden.scalar_type() == at::kHalf);
  p.lead_shape = hidden.sizes().slice(0, hidden.dim() - 1).vec();
  p.hidden = hidden.reshape({p.rows, p.hidden_size});
  if (p.hidden_size > 1 && p.hidden.stride(1) != 1) p.hidden = p.hidden.contiguous();
  p.weight = weight.contiguous();
  if (bias.has_value() && bias->defined()) p.bias = bias->contiguous();
  p.target = target.to(at::kLong).contiguous().reshape({p.rows});
  p.valid = at::nonzero(p.target.ne(ignore_index)).reshape({-1});
  return p;
}

// logits = hidden_rows @ weight_rows^T (+ bias_cols): one GEMM into a fresh
// contiguous [rows, cols] tile, float32 when float32_logits (see LinearProblem).
inline at::Tensor logits_tile(const at::Tensor& hidden_rows, const at::Tensor& weight_rows,
                              const at::Tensor& bias_cols, bool float32_logits) {
  if (float32_logits) {
    at::Tensor tile = at::mm(hidden_rows, weight_rows.t(), at::kFloat);
    if (bias_cols.defined()) tile.add_(bias_cols);
    return tile;
  }
  if (bias_cols.defined()) return at::addmm(bias_cols, hidden_rows, weight_rows.t());
  return at::mm(hidden_rows, weight_rows.t());
}

// The rows' temperatures, for a tile of those rows (`rows`: int64 indices into the N
// rows); undefined without per-row temperatures.
inline at::Tensor temps_of(const LinearProblem& p, const at::Tensor& rows) {
  return p.transform.temps.defined() ? p.transform.temps.index_select(0, rows) : at::Tensor();
}

inline int64_t round_up_rows(int64_t n) {
  return (n + kRowQuantum - 1) / kRowQuantum * kRowQuantum;
}

// Rows [begin, end) of the valid rows, padded up to a multiple of kRowQuantum
// rows (see the file comment; the padding rows are computed and dropped):
// the indices into `hidden` and the rows themselves. With no ignored row the
// chunk is a slice of `hidden` (no copy), padded with the rows that follow it
// where there are such rows.
struct ChunkRows {
  at::Tensor indices;
  at::Tensor hidden;
};

inline ChunkRows gather_chunk(const LinearProblem& p, int64_t begin, int64_t end) {
  const int64_t padded = round_up_rows(end - begin);
  const bool all_valid = p.valid.size(0) == p.rows;
  if (all_valid && begin + padded <= p.rows) {
    return {p.valid.slice(0, begin, begin + padded), p.hidden.slice(0, begin, begin + padded)};
  }
  at::Tensor idx = p.valid.slice(0, begin, end);
  if (padded > end - begin) {
    idx = at::cat({idx, idx.slice(0, -1).expand({padded - (end - begin)})});
  }
  return {idx, p.hidden.index_select(0, idx)};
}

// The op's outputs over all N rows (ForwardOutputs: empty when not asked for), zero
// (False) at the ignored rows, which no chunk writes.
inline ForwardOutputs linear_outputs(const LinearProblem& p, bool return_entropy,
                                     int64_t extras) {
  const auto options = p.hidden.options().dtype(p.acc_dtype);
  auto maybe = [&](bool wanted, at::TensorOptions o) {
    return wanted ? at::zeros({p.rows}, o) : at::empty({0}, o);
  };
  return {at::zeros({p.rows}, options),
          maybe(return_entropy, options),
          at::zeros({p.rows}, options),
          maybe(extras & kExtraLogSumSq, options),
          maybe(extras & kExtraMeanLogits, options),
          maybe(extras & kExtraIsTop1, options.dtype(at::kBool))};
}

// out[rows] = the first rows.size(0) entries of a chunk's output, for an output asked for.
inline void scatter_rows(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& part) {
  if (out.numel() > 0) out.index_copy_(0, rows, part.slice(0, 0, rows.size(0)));
}

inline LogprobsOutputsTuple linear_forward(const LinearProblem& p, bool return_entropy,
                                           int64_t extras, const RowKernels& kernels) {
  check_extras(kLinearLogprobsOp, extras);
  const ForwardOutputs out = linear_outputs(p, return_entropy, extras);
  const int64_t valid_rows = p.valid.size(0);
  for (int64_t begin = 0; begin < valid_rows; begin += p.chunk_rows) {
    const int64_t end = std::min(valid_rows, begin + p.chunk_rows);
    const ChunkRows chunk = gather_chunk(p, begin, end);
    const at::Tensor tile = logits_tile(chunk.hidden, p.weight, p.bias, p.float32_logits);
    at::Tensor tile_target = p.target.index_select(0, chunk.indices);
    // The padding rows are ignored: the row loop skips them.
    tile_target.slice(0, end - begin).fill_(p.ignore_index);
    const TransformSettings transform = with_temps(p.transform, temps_of(p, chunk.indices));
    const LogprobsProblem tp = tile_problem(tile, tile_target, transform, p.ignore_index);
    const ForwardOutputs part = forward_outputs(tp, return_entropy, extras);
    kernels.forward(tp, part);
    const at::Tensor rows = p.valid.slice(0, begin, end);
    scatter_rows(out.logprobs, rows, part.logprobs);
    scatter_rows(out.entropy, rows, part.entropy);
    scatter_rows(out.lse, rows, part.lse);
    scatter_rows(out.log_sum_sq, rows, part.log_sum_sq);
    scatter_rows(out.mean_logits, rows, part.mean_logits);
    scatter_rows(out.is_top1, rows, part.is_top1);
  }
  const at::IntArrayRef shape(p.lead_shape);
  auto shaped = [&](const at::Tensor& t, bool wanted) { return wanted ? t.view(shape) : t; };
  return {shaped(out.logprobs, true),
          shaped(out.entropy, return_entropy),
          shaped(out.lse, true),
          shaped(out.log_sum_sq, extras & kExtraLogSumSq),
          shaped(out.mean_logits, extras & kExtraMeanLogits),
          shaped(out.is_top1, extras & kExtraIsTop1)};
}

// The backward's tile: [tile_rows, tile_vocab] logits at a time, at most
// chunk_rows * V elements (the forward's tile). The vocabulary is split so that
// all valid rows fit in one tile per vocabulary chunk; when that would make
// the chunk narrower than kMinTileVocab, the rows are split instead.
// Extra memory of the backward, besides the outputs: the tile, the float32
// grad_hidden accumulator of the valid rows (absent for float32 hidden with no
// ignored rows), the gathered valid hidden rows (only with ignored rows), a
// float32 [tile_vocab, H] grad_weight accumulator (only when rows are split),
// and O(N) per-row statistics.
struct TileGeometry {
  int64_t rows;
  int64_t vocab;
};

inline TileGeometry tile_geometry(int64_t valid_rows, int64_t vocab, int64_t chunk_rows) {
  const int64_t budget = chunk_rows * vocab;  // logits elements
  if (valid_rows <= chunk_rows) return {std::max<int64_t>(valid_rows, 1), vocab};
  // Whole multiples of kVocabQuantum columns keep every tile row 16-byte aligned for
  // the CUDA row kernels' vector loads.
  const int64_t cols = budget / valid_rows / kVocabQuantum * kVocabQuantum;
  if (cols >= std::min(vocab, kMinTileVocab)) return {valid_rows, std::min(vocab, cols)};
  const int64_t narrow = std::min(vocab, kMinTileVocab);
  return {std::max<int64_t>(1, budget / narrow), narrow};
}

// Rows of `a` per product in accumulate_mm: its float32 (CUDA) or input-dtype
// (CPU) temporary holds at most this many rows of the result, 16 MiB at
// H = 4096, instead of a whole tile's rows (256 MiB at 16k rows).
constexpr int64_t kAccumulateRows = 1024;

// acc += a @ b, with acc in float32 (or float64) and a, b in the inputs' dtype.
// The product is formed kAccumulateRows rows at a time: torch has no float32
// accumulate into a float32 output from bf16/fp16 operands (cuBLAS gives a
// float32 product, torch's CPU GEMM a product in the inputs' dtype).
inline void accumulate_mm(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a, b);
    return;
  }
  for (int64_t row = 0; row < a.size(0); row += kAccumulateRows) {
    const int64_t end = std::min(a.size(0), row + kAccumulateRows);
    const at::Tensor a_rows = a.slice(0, row, end);
    acc.slice(0, row, end)
        .add_(acc.is_cuda() ? at::mm(a_rows, b, acc.scalar_type()) : at::mm(a_rows, b));
  }
}

// The backward's per-row inputs (LogprobsGradInputs), over the valid rows: [Nv] each, or
// undefined.
struct LinearGradInputs {
  at::Tensor target;
  LogprobsGradInputs rows;
  at::Tensor temps;  // [Nv] acc_dtype, or undefined without per-row temperatures
};

// The backward's optional per-row tensors, as the op receives them.
struct LinearGradArgs {
  at::Tensor lse;
  std::optional<at::Tensor> entropy, grad_logprobs, grad_entropy;
  std::optional<at::Tensor> log_sum_sq, grad_lse, grad_log_sum_sq, grad_mean;
};

inline at::Tensor valid_per_row(const LinearProblem& p, const char* name,
                                const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_same_device(kLinearLogprobsOp, name, *t, p.hidden);
  check_floating(kLinearLogprobsOp, name, *t);
  TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(p.lead_shape), kLinearLogprobsOp, ": `", name,
                    "` must have shape ", at::IntArrayRef(p.lead_shape), ", got ", shape_str(*t));
  return t->reshape({p.rows}).index_select(0, p.valid).to(p.acc_dtype).contiguous();
}

inline LinearGradInputs prepare_linear_grad_inputs(const LinearProblem& p,
                                                   const LinearGradArgs& a) {
  LinearGradInputs in;
  in.target = p.target.index_select(0, p.valid);
  in.temps = temps_of(p, p.valid);
  LogprobsGradInputs& r = in.rows;
  r.lse = valid_per_row(p, "lse", a.lse);
  r.grad_logprobs = valid_per_row(p, "grad_logprobs", a.grad_logprobs);
  r.grad_entropy = valid_per_row(p, "grad_entropy", a.grad_entropy);
  if (r.grad_entropy.defined()) {
    r.entropy = valid_per_row(p, "entropy", a.entropy);
    TORCH_CHECK_VALUE(r.entropy.defined(), kLinearLogprobsOp,
                      ": `entropy` is needed with `grad_entropy`");
  }
  r.grad_lse = valid_per_row(p, "grad_lse", a.grad_lse);
  r.grad_mean = valid_per_row(p, "grad_mean_logits", a.grad_mean);
  r.grad_log_sum_sq = valid_per_row(p, "grad_log_sum_sq", a.grad_log_sum_sq);
  if (r.grad_log_sum_sq.defined()) {
    r.log_sum_sq = valid_per_row(p, "log_sum_sq", a.log_sum_sq);
    TORCH_CHECK_VALUE(r.log_sum_sq.defined(), kLinearLogprobsOp,
                      ": `log_sum_sq` is needed with `grad_log_sum_sq`");
  }
  return in;
}

// The backward's outputs and the float32 accumulators behind them.
struct LinearGrads {
  at::Tensor grad_hidden;      // [N, H] in hidden's dtype, or empty when not asked for
  at::Tensor grad_weight;      // [V, H] in weight's dtype, or empty
  at::Tensor grad_hidden_acc;  // [N_valid, H] acc_dtype; grad_hidden itself when that is
                               // float32 and every row is valid; undefined when not asked for
  at::Tensor grad_bias_acc;    // [V] acc_dtype, or undefined without a bias
  bool direct_hidden = false;
};

inline LinearGrads linear_grads(const LinearProblem& p, bool need_grad_hidden,
                                bool need_grad_weight) {
  const auto acc_options = p.hidden.options().dtype(p.acc_dtype);
  const int64_t valid_rows = p.valid.size(0);
  LinearGrads g;
  g.direct_hidden = valid_rows == p.rows && p.hidden.scalar_type() == p.acc_dtype;
  g.grad_hidden = need_grad_hidden ? at::zeros({p.rows, p.hidden_size}, p.hidden.options())
                                   : at::empty({0}, p.hidden.options());
  if (need_grad_hidden) {
    g.grad_hidden_acc = g.direct_hidden ? g.grad_hidden
                                        : at::zeros({valid_rows, p.hidden_size}, acc_options);
  }
  // Every column is written by the tile loop, unless no row is valid.
  g.grad_weight = !need_grad_weight ? at::empty({0}, p.weight.options())
                  : valid_rows == 0 ? at::zeros_like(p.weight)
                                    : at::empty_like(p.weight);
  if (p.bias.defined()) g.grad_bias_acc = at::zeros({p.vocab}, acc_options);
  return g;
}

// One backward tile: valid rows [row, row + rows) x vocabulary columns
// [col, col + cols). grad_weight_acc: the float32 accumulator of
// grad_weight[cols] when rows are split, else undefined (written directly).
struct BackwardTile {
  int64_t row, rows, col, cols;
};

inline void backward_tile(const LinearProblem& p, const at::Tensor& hidden,
                          const LinearGradInputs& in, const BackwardTile& t,
                          const RowKernels& kernels, LinearGrads& g,
                          const at::Tensor& grad_weight_acc) {
  const at::Tensor hidden_rows = hidden.slice(0, t.row, t.row + t.rows);
  const at::Tensor weight_cols = p.weight.slice(0, t.col, t.col + t.cols);
  const at::Tensor bias_cols = p.bias.defined() ? p.bias.slice(0, t.col, t.col + t.cols)
                                                : at::Tensor();
  // The logits recomputed, then overwritten by their gradient; the GEMMs take it in
  // the inputs' dtype. The block ends the life of a float32 tile (held by the
  // LogprobsProblem too) before the GEMMs' temporaries are allocated.
  at::Tensor dlogits;
  {
    at::Tensor grad_tile = logits_tile(hidden_rows, weight_cols, bias_cols, p.float32_logits);
    auto rows_of = [&](const at::Tensor& x) {
      return x.defined() ? x.slice(0, t.row, t.row + t.rows) : at::Tensor();
    };
    const LogprobsProblem tp = tile_problem(grad_tile, rows_of(in.target),
                                            with_temps(p.transform, rows_of(in.temps)),
                                            p.ignore_index);
    const LogprobsGradInputs& r = in.rows;
    const LogprobsGradInputs tile_in{rows_of(r.lse),          rows_of(r.entropy),
                                     rows_of(r.grad_logprobs), rows_of(r.grad_entropy),
                                     rows_of(r.log_sum_sq),    rows_of(r.grad_lse),
                                     rows_of(r.grad_log_sum_sq), rows_of(r.grad_mean)};
    kernels.backward(tp, logits_as_grad(tp), tile_in, VocabSlice{t.col, p.vocab});
    if (g.grad_bias_acc.defined()) {
      g.grad_bias_acc.slice(0, t.col, t.col + t.cols).add_(grad_tile.sum(0, false, p.acc_dtype));
    }
    dlogits = grad_tile.to(p.hidden.scalar_type());
  }
  if (g.grad_hidden_acc.defined()) {
    accumulate_mm(g.grad_hidden_acc.slice(0, t.row, t.row + t.rows), dlogits, weight_cols);
  }
  if (grad_weight_acc.defined()) {
    accumulate_mm(grad_weight_acc, dlogits.t(), hidden_rows);
  } else if (g.grad_weight.numel() > 0) {
    at::Tensor out = g.grad_weight.slice(0, t.col, t.col + t.cols);
    at::mm_out(out, dlogits.t(), hidden_rows);
  }
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const LinearProblem& p, const LinearGradArgs& args, bool need_grad_hidden,
    bool need_grad_weight, const RowKernels& kernels) {
  const LinearGradInputs in = prepare_linear_grad_inputs(p, args);
  const int64_t valid_rows = p.valid.size(0);
  const at::Tensor hidden =
      valid_rows == p.rows ? p.hidden : p.hidden.index_select(0, p.valid);
  LinearGrads g = linear_grads(p, need_grad_hidden, need_grad_weight);
  // A float32 tile and its gradient in the inputs' dtype are 6 bytes per logit against
  // the forward's 4: two thirds of its elements keep the backward within its bytes.
  const int64_t budget_rows =
      p.float32_logits ? std::max<int64_t>(1, p.chunk_rows * 2 / 3) : p.chunk_rows;
  const TileGeometry tile = tile_geometry(valid_rows, p.vocab, budget_rows);
  const bool split_rows = tile.rows < valid_rows;
  for (int64_t col = 0; col < p.vocab && valid_rows > 0; col += tile.vocab) {
    const int64_t cols = std::min(tile.vocab, p.vocab - col);
    at::Tensor grad_weight_acc;
    if (need_grad_weight && split_rows) {
      grad_weight_acc = at::zeros({cols, p.hidden_size}, p.hidden.options().dtype(p.acc_dtype));
    }
    for (int64_t row = 0; row < valid_rows; row += tile.rows) {
      const BackwardTile t{row, std::min(tile.rows, valid_rows - row), col, cols};
      backward_tile(p, hidden, in, t, kernels, g, grad_weight_acc);
    }
    if (grad_weight_acc.defined()) g.grad_weight.slice(0, col, col + cols).copy_(grad_weight_acc);
  }
  if (need_grad_hidden && !g.direct_hidden) {
    g.grad_hidden.index_copy_(0, p.valid, g.grad_hidden_acc.to(p.hidden.scalar_type()));
  }
  std::vector<int64_t> shape = p.lead_shape;
  shape.push_back(p.hidden_size);
  const at::Tensor grad_bias = p.bias.defined() ? g.grad_bias_acc.to(p.bias.scalar_type())
                                                : at::empty({0}, p.weight.options());
  return {need_grad_hidden ? g.grad_hidden.view(shape) : g.grad_hidden, g.grad_weight,
          grad_bias};
}

// The dispatcher ops, on the device whose row loops `kernels` are (csrc/cpu and csrc/cuda
// register an instance each). The device guard makes the inputs' device current (CUDA).
template <const RowKernels& kernels>
LogprobsOutputsTuple linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, double temperature,
    const std::optional<at::Tensor>& temperatures, double logit_scale, double softcap,
    int64_t ignore_index, bool return_entropy, int64_t chunk_size, int64_t extras) {
  const c10::DeviceGuard device_guard(hidden.device());
  const LinearProblem p = prepare_linear(hidden, weight, bias, target, temperature, temperatures,
                                         logit_scale, softcap, ignore_index, chunk_size);
  return linear_forward(p, return_entropy, extras, kernels);
}

template <const RowKernels& kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logprobs,
    const std::optional<at::Tensor>& grad_entropy, const std::optional<at::Tensor>& log_sum_sq,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_log_sum_sq,
    const std::optional<at::Tensor>& grad_mean_logits, double temperature,
    const std::optional<at::Tensor>& temperatures, double logit_scale, double softcap,
    int64_t ignore_index, int64_t chunk_size, bool need_grad_hidden, bool need_grad_weight) {
  const c10::DeviceGuard device_guard(hidden.device());
  const LinearProblem p = prepare_linear(hidden, weight, bias, target, temperature, temperatures,
                                         logit_scale, softcap, ignore_index, chunk_size);
  const LinearGradArgs args{lse,        entropy,  grad_logprobs,   grad_entropy,
                            log_sum_sq, grad_lse, grad_log_sum_sq, grad_mean_logits};
  return linear_backward(p, args, need_grad_hidden, need_grad_weight, kernels);
}

}  // namespace rlhf_ext
