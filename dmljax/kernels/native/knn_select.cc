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
//      and ties are real ties); the query's own row is left out when `exclude_self` is set;
//   3. the best `k` candidates by (score desc, reference index asc), sorted.
//
// Same order and the same guarantees as the XLA path in knn.py; only the rounding of the
// re-scored dot products may differ from XLA's batched dot in the last bit.
//
// DmljaxPutColumns (at the end) is the scan's in-place update of the group-max buffer.
//
// Rows are independent, so they are spread over XLA's intra-op thread pool (the calling thread
// takes rows too, so the call never waits for a busy pool); each row's result does not depend on
// which thread computes it.
//
// NaN: knn.py rejects inputs whose scores could overflow, so a NaN should never arrive here. If
// one does, it ranks as -inf (worst) everywhere, so that every selection below still finds the
// number of items it asks for: no read past a buffer, never the query itself (it is not a
// candidate at all), and padding references (-inf, larger indices) only after every real one.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Item {
  float value;
  int32_t index;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The ranking value of a score: NaN counts as -inf, so that comparisons stay a strict weak order.
inline float Rank(float v) { return v != v ? kNegInf : v; }

// True when a ranks before b: larger value, or equal value and smaller index.
inline bool Before(const Item& a, const Item& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Maxima of consecutive segments of `len` values of v[0..n) (the last segment may be shorter),
// in eight lanes so that the compiler vectorises it without reassociating anything. A NaN never
// wins a comparison, so it is skipped: the maximum is that of Rank(v) (-inf if all are NaN).
void SegmentMax(const float* v, int64_t n, int64_t len, float* out) {
  const int64_t segments = (n + len - 1) / len;
  for (int64_t j = 0; j < segments; ++j) {
    const int64_t a = j * len, b = std::min(n, a + len);
    float acc[8];
    for (int l = 0; l < 8; ++l) acc[l] = kNegInf;
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

// The best `keep` of values[0..n) by Before on Rank (index = position), unordered, into `best`.
// Requires 1 <= keep <= n. A lower bound t on the keep-th best value comes from segment maxima:
// the keep-th largest maximum of disjoint segments is at most the keep-th best value (keep
// segments each hold a value at least that large). Only segments whose maximum reaches t are
// scanned, for values >= t; the best `keep` of those are the answer. Since segment maxima are
// maxima of Rank(v) and the scan compares Rank(v), at least `keep` values pass (t is never NaN).
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
      const float v = Rank(values[i]);
      if (v >= t) best.push_back(Item{v, static_cast<int32_t>(i)});
    }
  }
  if (static_cast<int64_t>(best.size()) < keep) {  // cannot happen (see above); stay in bounds
    best.clear();
    for (int64_t i = 0; i < n; ++i) best.push_back(Item{Rank(values[i]), static_cast<int32_t>(i)});
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

struct Problem {
  const float* q;        // [qb, dim] augmented queries
  const int32_t* qid;    // [qb] each query's own reference index (same-set mode)
  const float* gmax;     // [qb, num_groups] group maxima
  const float* r;        // [num_groups * group, dim] augmented references
  float* out_s;          // [qb, k]
  int32_t* out_i;        // [qb, k]
  int64_t dim, num_groups, group, k, kg;
  bool exclude_self;
};

struct Scratch {
  std::vector<Item> best, cand;
  std::vector<float> seg, scratch, scores;
  std::vector<int32_t> groups;
};

void SelectRow(const Problem& p, int64_t row, Scratch& s) {
  const int64_t kg = p.kg, group = p.group, dim = p.dim;
  BestOf(p.gmax + row * p.num_groups, p.num_groups, kg, s.best, s.seg, s.scratch);
  s.groups.resize(kg);
  for (int64_t i = 0; i < kg; ++i) s.groups[i] = s.best[i].index;
  std::sort(s.groups.begin(), s.groups.end());
  const float* qrow = p.q + row * dim;
  const int64_t self = p.exclude_self ? p.qid[row] : -1;
  s.cand.clear();
  for (int64_t gi = 0; gi < kg; ++gi) {
    if (gi + 1 < kg) {  // the next group's rows, while this one is scored
      const char* next = reinterpret_cast<const char*>(p.r + s.groups[gi + 1] * group * dim);
      for (int64_t off = 0; off < group * dim * 4; off += 64) __builtin_prefetch(next + off);
    }
    for (int64_t t = 0; t < group; ++t) {
      const int64_t c = s.groups[gi] * group + t;
      if (c == self) continue;  // never a neighbour of itself
      s.cand.push_back(Item{Rank(Dot(qrow, p.r + c * dim, dim)), static_cast<int32_t>(c)});
    }
  }
  // Best k candidates; they are in increasing reference index, as BestOf's positions are. There
  // are at least kg * group - 1 >= k of them (kg distinct groups; at most one is the query).
  s.scores.resize(s.cand.size());
  for (size_t i = 0; i < s.cand.size(); ++i) s.scores[i] = s.cand[i].value;
  BestOf(s.scores.data(), static_cast<int64_t>(s.scores.size()), p.k, s.best, s.seg, s.scratch);
  std::sort(s.best.begin(), s.best.end(), Before);
  for (int64_t i = 0; i < p.k; ++i) {
    p.out_s[row * p.k + i] = s.best[i].value;
    p.out_i[row * p.k + i] = s.cand[s.best[i].index].index;
  }
}

// Rows handed out in chunks to whichever thread asks next. Shared by pointer with the pool's
// tasks: a task that starts after every row is done touches only this object, never a buffer.
struct Work {
  Problem p;
  int64_t rows = 0, chunk = 1;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Run() {
    Scratch s;
    int64_t mine = 0;
    for (;;) {
      const int64_t a = next.fetch_add(chunk, std::memory_order_relaxed);
      if (a >= rows) break;
      const int64_t b = std::min(rows, a + chunk);
      for (int64_t row = a; row < b; ++row) SelectRow(p, row, s);
      mine += b - a;
    }
    if (mine > 0 && done.fetch_add(mine, std::memory_order_acq_rel) + mine == rows) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }

  void Wait() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return done.load(std::memory_order_acquire) == rows; });
  }
};

ffi::Error KnnSelectImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> queries,
                         ffi::Buffer<ffi::S32> query_ids, ffi::Buffer<ffi::F32> group_max,
                         ffi::Buffer<ffi::F32> refs, ffi::ResultBuffer<ffi::F32> top_scores,
                         ffi::ResultBuffer<ffi::S32> top_indices, int64_t k, int64_t group,
                         int64_t exclude_self, int64_t max_threads) {
  const auto qdims = queries.dimensions();
  const auto idims = query_ids.dimensions();
  const auto gdims = group_max.dimensions();
  const auto rdims = refs.dimensions();
  const auto sdims = top_scores->dimensions();
  const auto odims = top_indices->dimensions();
  if (qdims.size() != 2 || idims.size() != 1 || gdims.size() != 2 || rdims.size() != 2 ||
      sdims.size() != 2 || odims.size() != 2) {
    return ffi::Error::InvalidArgument("knn_select: wrong ranks of the operands");
  }
  const int64_t qb = qdims[0], dim = qdims[1], num_groups = gdims[1], num_refs = rdims[0];
  const int64_t kg = k + (exclude_self ? 1 : 0);
  if (k < 1 || group < 1 || idims[0] != qb || gdims[0] != qb || rdims[1] != dim ||
      num_groups * group != num_refs || kg > num_groups || sdims[0] != qb || sdims[1] != k ||
      odims[0] != qb || odims[1] != k) {
    return ffi::Error::InvalidArgument("knn_select: inconsistent shapes or k/group");
  }
  Problem p{queries.typed_data(), query_ids.typed_data(), group_max.typed_data(),
            refs.typed_data(), top_scores->typed_data(), top_indices->typed_data(),
            dim, num_groups, group, k, kg, exclude_self != 0};
  if (qb == 0) return ffi::Error::Success();
  // A chunk of rows costs tens of microseconds or more; a few chunks per thread even out rows of
  // different cost without much contention on the counter.
  const int64_t chunk = 4;
  int64_t threads = pool.num_threads();
  if (max_threads > 0) threads = std::min(threads, max_threads);
  threads = std::min(threads, (qb + chunk - 1) / chunk);
  if (threads <= 1) {
    Scratch s;
    for (int64_t row = 0; row < qb; ++row) SelectRow(p, row, s);
    return ffi::Error::Success();
  }
  auto work = std::make_shared<Work>();
  work->p = p;
  work->rows = qb;
  work->chunk = chunk;
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  work->Wait();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmljaxKnnSelect, KnnSelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("exclude_self")
                                  .Attr<int64_t>("max_threads"));

namespace {

// out[:, offset : offset + w] = cols, out aliasing buf (XLA passes the same buffer when the
// aliasing holds; otherwise buf is copied first). Rows go to the thread pool in chunks, as in
// KnnSelectImpl: a task that starts late finds no rows left and touches no buffer.
ffi::Error PutColumnsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> buf,
                          ffi::Buffer<ffi::F32> cols, ffi::Buffer<ffi::S32> offset,
                          ffi::ResultBuffer<ffi::F32> out, int64_t max_threads) {
  const auto bdims = buf.dimensions();
  const auto cdims = cols.dimensions();
  if (bdims.size() != 2 || cdims.size() != 2 || cdims[0] != bdims[0] || cdims[1] > bdims[1]) {
    return ffi::Error::InvalidArgument("put_columns: inconsistent shapes");
  }
  const int64_t rows = bdims[0], width = bdims[1], w = cdims[1];
  const int64_t off = std::min<int64_t>(std::max<int64_t>(offset.typed_data()[0], 0), width - w);
  const float* src = cols.typed_data();
  float* dst = out->typed_data();
  if (dst != buf.typed_data()) std::copy(buf.typed_data(), buf.typed_data() + rows * width, dst);
  auto copy_rows = [=](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      std::copy(src + r * w, src + (r + 1) * w, dst + r * width + off);
    }
  };
  int64_t threads = pool.num_threads();
  if (max_threads > 0) threads = std::min(threads, max_threads);
  const int64_t chunk = 64;
  threads = std::min(threads, (rows + chunk - 1) / chunk);
  if (threads <= 1) {
    copy_rows(0, rows);
    return ffi::Error::Success();
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto sh = std::make_shared<Shared>();
  auto run = [sh, rows, chunk, copy_rows] {
    int64_t mine = 0;
    for (;;) {
      const int64_t a = sh->next.fetch_add(chunk, std::memory_order_relaxed);
      if (a >= rows) break;
      const int64_t b = std::min(rows, a + chunk);
      copy_rows(a, b);
      mine += b - a;
    }
    if (mine > 0 && sh->done.fetch_add(mine, std::memory_order_acq_rel) + mine == rows) {
      std::lock_guard<std::mutex> lock(sh->mu);
      sh->cv.notify_all();
    }
  };
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done.load(std::memory_order_acquire) == rows; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmljaxPutColumns, PutColumnsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));
