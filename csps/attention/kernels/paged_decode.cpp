// Paged decode attention on CPU, reading K/V from the block cache in place (issue 16).
//
// One query token per request; each request's keys are the first seq_lens[b] slots of its
// block table. Work is split over (request, stretch of SPLIT tokens) so that even a batch of
// one keeps every thread busy (split-K, "flash-decoding"); a piece reads each slot's keys and
// values once for all heads and keeps, per query head, its max, sum and weighted values; a
// second pass merges the pieces by log-sum-exp. fp32 only.
// Slow twin: csps/attention/reference.py (tests/test_paged_kernel.py, within 1e-5).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "simd_ops.h"

namespace {

constexpr int64_t SPLIT = 512;   // tokens per piece of work
constexpr int64_t MAX_GROUP = 16;  // query heads per KV head
constexpr int64_t MAX_DIM = 256;

}  // namespace

// q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, M]
// int64; seq_lens [B] int64 (each >= 1). Returns (out [B, Hq, D], lse [B, Hq]).
std::vector<torch::Tensor> paged_decode(torch::Tensor q, torch::Tensor k_cache,
                                        torch::Tensor v_cache, torch::Tensor block_tables,
                                        torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32 &&
              v_cache.dtype() == torch::kFloat32, "paged_decode: fp32 only");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode: contiguous tensors only");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0 && Hq / Hkv <= MAX_GROUP && D <= MAX_DIM, "paged_decode: shape");
  const int64_t g = Hq / Hkv;
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && seq_lens.dtype() == torch::kInt64 &&
              block_tables.size(0) == B && seq_lens.size(0) == B, "paged_decode: tables");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  const int64_t M = tables.size(1);
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  int64_t max_pieces = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= M * block_size, "paged_decode: bad seq_len");
    for (int64_t i = 0; i < (len[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tab[b * M + i] >= 0 && tab[b * M + i] < k_cache.size(0),
                  "paged_decode: block id out of range");
    max_pieces = std::max(max_pieces, (len[b] + SPLIT - 1) / SPLIT);
  }
  // per request, piece and query head: [max, sum, D weighted values]
  auto partial = torch::empty({B, max_pieces, Hq, D + 2}, q.options());
  float* part = partial.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t row = Hkv * D;  // floats per slot
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * max_pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(Hkv * g * SPLIT);  // [Hkv, g, SPLIT] of this piece
    std::vector<int64_t> offsets(SPLIT);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / max_pieces, piece = item % max_pieces;
      const int64_t first = piece * SPLIT, last = std::min(len[b], first + SPLIT);
      const int64_t n = last - first;
      float* out = part + (b * max_pieces + piece) * Hq * (D + 2);  // [Hq, D + 2]
      if (n <= 0) {  // this request is shorter than the longest: an empty piece
        for (int64_t j = 0; j < Hq; ++j) {
          out[j * (D + 2)] = -std::numeric_limits<float>::infinity();
          out[j * (D + 2) + 1] = 0;
        }
        continue;
      }
      const float* qb = qp + b * Hq * D;
      for (int64_t t = 0; t < n; ++t) {  // where each token's slot starts, in floats
        const int64_t pos = first + t;
        offsets[t] = (tab[b * M + pos / block_size] * block_size + pos % block_size) * row;
      }
      for (int64_t t = 0; t < n; ++t)  // scores: each slot's keys (all heads) read once
        for (int64_t h = 0; h < Hkv; ++h)
          head_scores(qb + h * g * D, kp + offsets[t] + h * D, g, D, sc,
                      scores.data() + h * g * SPLIT + t, SPLIT);
      for (int64_t j = 0; j < Hq; ++j) {  // softmax numerators, per query head
        float* s = scores.data() + j * SPLIT;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
        out[j * (D + 2)] = mx;
        out[j * (D + 2) + 1] = exp_shifted(s, mx, n);
        for (int64_t d = 0; d < D; ++d) out[j * (D + 2) + 2 + d] = 0;
      }
      for (int64_t t = 0; t < n; ++t)  // weighted values: each slot's values read once
        for (int64_t j = 0; j < Hq; ++j)
          axpy(out + j * (D + 2) + 2, scores[j * SPLIT + t], vp + offsets[t] + (j / g) * D, D);
    }
  });
  auto result = torch::empty({B, Hq, D}, q.options());
  auto lse = torch::empty({B, Hq}, q.options());
  float* res = result.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {  // one request's query head
      const int64_t b = item / Hq, j = item % Hq;
      const float* pieces = part + b * max_pieces * Hq * (D + 2) + j * (D + 2);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < max_pieces; ++p) m = std::max(m, pieces[p * Hq * (D + 2)]);
      float total = 0;
      float* o = res + item * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0;
      for (int64_t p = 0; p < max_pieces; ++p) {
        const float* pc = pieces + p * Hq * (D + 2);
        if (pc[1] == 0) continue;
        const float w = std::exp(pc[0] - m);
        total += w * pc[1];
        axpy(o, w, pc + 2, D);
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
      lsep[item] = m + std::log(total);
    }
  });
  return {result, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention over block tables (CPU, fp32)");
}
