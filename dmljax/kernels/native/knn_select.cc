// CPU selection step of dmljax's blocked kNN (dmljax/kernels/knn.py), as an XLA FFI handler.
//
// XLA's CPU top_k and gather run at a few nanoseconds per element, which on a CPU host made the
// selection after the matrix product cost almost half as much as the product itself. This handler
// does the same arithmetic in one pass per query row:
//
//   1. the best `kg` groups of the group-max buffer, by (max desc, group index asc): a lower
//      bound from segment maxima, then a scan of only the segments that reach it (BestOf);
//   2. the group ids in increasing order, their `kg * group` references re-scored exactly as
//      <q_aug, r_aug> (one fixed summation order, so identical references get identical scores
//      and ties are real ties); the query's own row gets -inf when `exclude_self` is set;
//   3. the best `k` candidates by (score desc, reference index asc), sorted.
//
// Same order and the same guarantees as the XLA path in knn.py; only the rounding of the
// re-scored dot products may differ from XLA's batched dot in the last bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Item {
  float value;
  int32_t index;
};

// True when a ranks before b: larger value, or equal value and smaller index.
inline bool Before(const Item& a, const Item& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Maxima of consecutive segments of `len` values of v[0..n) (the last segment may be shorter),
// in eight lanes so that the compiler vectorises it without reassociating anything.
void SegmentMax(const float* v, int64_t n, int64_t len, float* out) {
  const int64_t segments = (n + len - 1) / len;
  for (int64_t j = 0; j < segments; ++j) {
    const int64_t a = j * len, b = std::min(n, a + len);
    float acc[8];
    for (int l = 0; l < 8; ++l) acc[l] = -std::numeric_limits<float>::infinity();
    int64_t i = a;
    for (; i + 8 <= b; i += 8) {
      for (int l = 0; l < 8; ++l) acc[l] = v[i + l] > acc[l] ? v[i + l] : acc[l];
    }
    for (int l = 0; i < b; ++i, ++l) acc[l] = v[i] > acc[l] ? v[i] : acc[l];
    float m = acc[0];
    for (int l = 1; l < 8; ++l) m = acc[l] > m ? acc[l] : m;
    out[j] = m;
  }
}

// The best `keep` of values[0..n) by Before (index = position), unordered, into `best`.
// Requires 1 <= keep <= n. A lower bound t on the keep-th best value comes from segment maxima:
// the keep-th largest maximum of disjoint segments is at most the keep-th best value (keep
// segments each hold a value at least that large). Only segments whose maximum reaches t are
// scanned, for values >= t; the best `keep` of those are the answer.
void BestOf(const float* values, int64_t n, int64_t keep, std::vector<Item>& best,
            std::vector<float>& seg, std::vector<float>& scratch) {
  int64_t len = std::max<int64_t>(8, n / (4 * keep) / 8 * 8);
  while (len > 1 && (n + len - 1) / len < keep) len /= 2;
  const int64_t segments = (n + len - 1) / len;
  seg.resize(segments);
  SegmentMax(values, n, len, seg.data());
  scratch.assign(seg.begin(), seg.end());
  std::nth_element(scratch.begin(), scratch.begin() + (keep - 1), scratch.end(),
                   [](float a, float b) { return a > b; });
  const float t = scratch[keep - 1];
  best.clear();
  for (int64_t j = 0; j < segments; ++j) {
    if (!(seg[j] >= t)) continue;
    const int64_t b = std::min(n, (j + 1) * len);
    for (int64_t i = j * len; i < b; ++i) {
      if (values[i] >= t) best.push_back(Item{values[i], static_cast<int32_t>(i)});
    }
  }
  std::nth_element(best.begin(), best.begin() + (keep - 1), best.end(), Before);
  best.resize(keep);
}

// <a, b> over d floats with eight interleaved partial sums (a fixed order: deterministic, and
// vectorisable by the compiler without reassociation).
inline float Dot(const float* a, const float* b, int64_t d) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i < d; ++i, ++j) acc[j] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

ffi::Error KnnSelectImpl(ffi::Buffer<ffi::F32> queries, ffi::Buffer<ffi::S32> query_ids,
                         ffi::Buffer<ffi::F32> group_max, ffi::Buffer<ffi::F32> refs,
                         ffi::ResultBuffer<ffi::F32> top_scores,
                         ffi::ResultBuffer<ffi::S32> top_indices, int64_t k, int64_t group,
                         int64_t exclude_self) {
  const auto qdims = queries.dimensions();
  const auto gdims = group_max.dimensions();
  const auto rdims = refs.dimensions();
  if (qdims.size() != 2 || gdims.size() != 2 || rdims.size() != 2) {
    return ffi::Error::InvalidArgument("knn_select: queries, group_max and refs must be 2-D");
  }
  const int64_t qb = qdims[0], dim = qdims[1], num_groups = gdims[1], num_refs = rdims[0];
  const int64_t kg = k + (exclude_self ? 1 : 0);
  if (gdims[0] != qb || rdims[1] != dim || num_groups * group != num_refs || kg > num_groups ||
      k < 1 || group < 1) {
    return ffi::Error::InvalidArgument("knn_select: inconsistent shapes or k/group");
  }
  const float* q = queries.typed_data();
  const int32_t* qid = query_ids.typed_data();
  const float* gmax = group_max.typed_data();
  const float* r = refs.typed_data();
  float* out_s = top_scores->typed_data();
  int32_t* out_i = top_indices->typed_data();
  const float neg_inf = -std::numeric_limits<float>::infinity();

  std::vector<Item> best, cand;
  std::vector<float> seg, scratch, scores;
  std::vector<int32_t> groups(kg);
  cand.reserve(kg * group);
  for (int64_t row = 0; row < qb; ++row) {
    BestOf(gmax + row * num_groups, num_groups, kg, best, seg, scratch);
    for (int64_t i = 0; i < kg; ++i) groups[i] = best[i].index;
    std::sort(groups.begin(), groups.end());
    const float* qrow = q + row * dim;
    cand.clear();
    for (int64_t gi = 0; gi < kg; ++gi) {
      if (gi + 1 < kg) {  // the next group's rows, while this one is scored
        const char* next = reinterpret_cast<const char*>(r + groups[gi + 1] * group * dim);
        for (int64_t off = 0; off < group * dim * 4; off += 64) __builtin_prefetch(next + off);
      }
      for (int64_t t = 0; t < group; ++t) {
        const int64_t c = groups[gi] * group + t;
        const float s = (exclude_self && c == qid[row]) ? neg_inf : Dot(qrow, r + c * dim, dim);
        cand.push_back(Item{s, static_cast<int32_t>(c)});
      }
    }
    // Best k candidates; they are in increasing reference index, as BestOf's positions are.
    scores.resize(cand.size());
    for (size_t i = 0; i < cand.size(); ++i) scores[i] = cand[i].value;
    BestOf(scores.data(), static_cast<int64_t>(scores.size()), k, best, seg, scratch);
    std::sort(best.begin(), best.end(), Before);
    for (int64_t i = 0; i < k; ++i) {
      out_s[row * k + i] = best[i].value;
      out_i[row * k + i] = cand[best[i].index].index;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmljaxKnnSelect, KnnSelectImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("exclude_self"));
