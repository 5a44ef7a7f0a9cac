// Vector helpers of the paged decode kernel (paged_decode.cpp): dot products of a key with the
// query heads that share it, y += w x, and exp of non-positive scores; AVX2 + FMA where the
// compiler targets it (-march=native), plain loops otherwise.
#pragma once

#include <cmath>
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__) && defined(__FMA__)
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  float total = _mm_cvtss_f32(lo);
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

inline void axpy(float* y, float w, const float* x, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    _mm256_storeu_ps(y + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
  for (; d < n; ++d) y[d] += w * x[d];
}

// scores[j * stride] = scale * q_j . key for the G query heads q [G, D] of one KV head: the key
// is loaded once and G independent FMA chains run over it. D a multiple of 8.
template <int G>
inline void group_scores(const float* q, const float* key, int64_t D, float scale,
                         float* scores, int64_t stride) {
  __m256 acc[G];
  for (int j = 0; j < G; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 k = _mm256_loadu_ps(key + d);
    for (int j = 0; j < G; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + d), k, acc[j]);
  }
  for (int j = 0; j < G; ++j) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    scores[j * stride] = _mm_cvtss_f32(lo) * scale;
  }
}

// The same for any G and D (no template instance, or D not a multiple of 8).
inline void any_group_scores(const float* q, const float* key, int64_t g, int64_t D,
                             float scale, float* scores, int64_t stride);

// One KV head's G scores, dispatched to a compiled group size where there is one.
inline void head_scores(const float* q, const float* key, int64_t g, int64_t D, float scale,
                        float* scores, int64_t stride) {
  if (D % 8 == 0) {
    switch (g) {
      case 1: return group_scores<1>(q, key, D, scale, scores, stride);
      case 2: return group_scores<2>(q, key, D, scale, scores, stride);
      case 3: return group_scores<3>(q, key, D, scale, scores, stride);
      case 4: return group_scores<4>(q, key, D, scale, scores, stride);
      case 6: return group_scores<6>(q, key, D, scale, scores, stride);
      case 8: return group_scores<8>(q, key, D, scale, scores, stride);
      default: break;
    }
  }
  any_group_scores(q, key, g, D, scale, scores, stride);
}

// exp(x) for x <= 0 (scores minus their max), 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by
// its degree-6 Taylor polynomial (relative error below 2e-7), 2^n through the exponent bits.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // exp(-87) ~ 1.6e-38: below it, a zero weight
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147181f), x);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// s[t] = exp(s[t] - mx) for t < n; returns their sum.
inline float exp_shifted(float* s, float mx, int64_t n) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  float total = 0;
  for (int l = 0; l < 8; ++l) total += lanes[l];
  for (; t < n; ++t) total += (s[t] = std::exp(s[t] - mx));
  return total;
}
#else
inline float dot(const float* a, const float* b, int64_t n) {
  float total = 0;
  for (int64_t d = 0; d < n; ++d) total += a[d] * b[d];
  return total;
}

inline void axpy(float* y, float w, const float* x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += w * x[d];
}

inline void any_group_scores(const float* q, const float* key, int64_t g, int64_t D,
                             float scale, float* scores, int64_t stride);

inline void head_scores(const float* q, const float* key, int64_t g, int64_t D, float scale,
                        float* scores, int64_t stride) {
  any_group_scores(q, key, g, D, scale, scores, stride);
}

inline float exp_shifted(float* s, float mx, int64_t n) {
  float total = 0;
  for (int64_t t = 0; t < n; ++t) total += (s[t] = std::exp(s[t] - mx));
  return total;
}
#endif

inline void any_group_scores(const float* q, const float* key, int64_t g, int64_t D,
                             float scale, float* scores, int64_t stride) {
  for (int64_t j = 0; j < g; ++j) scores[j * stride] = dot(q + j * D, key, D) * scale;
}

}  // namespace
