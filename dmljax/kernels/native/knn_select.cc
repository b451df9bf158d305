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

// Re-scores the references of groups[0..kg) (sorted, increasing) against query row `row` and
// writes its best k (score desc, index asc), the query itself left out in same-set mode.
void RescoreRow(const Problem& p, int64_t row, Scratch& s) {
  const int64_t kg = p.kg, group = p.group, dim = p.dim;
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

void SelectRow(const Problem& p, int64_t row, Scratch& s) {
  const int64_t kg = p.kg;
  BestOf(p.gmax + row * p.num_groups, p.num_groups, kg, s.best, s.seg, s.scratch);
  s.groups.resize(kg);
  for (int64_t i = 0; i < kg; ++i) s.groups[i] = s.best[i].index;
  std::sort(s.groups.begin(), s.groups.end());
  RescoreRow(p, row, s);
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

// ----------------------------------------------------------------------------- same-set symmetry
//
// In same-set mode the dot products are symmetric: the block P = X_I X_J^T (rows of block I,
// columns of block J) holds every pair of the two blocks once. knn.py computes each block pair
// once (J >= I) and hands P to DmljaxSymMerge, which turns it into scores for both sides:
//
//   S[i, j] = P[i, j] - (h_i + h_j),   h = |x|^2 / 2 (+inf on padding rows),
//
// i.e. -|x_i - x_j|^2 / 2, the same number for the query i against the reference j as for the
// query j against the reference i: h_i + h_j is commutative in floating point, and P[i, j] is the
// same sum of the same products in the same order whichever of the two is the row (so identical
// references also get identical scores, and ties stay real ties). Rows of P feed the queries of
// block I (references j), columns the queries of block J (references i); the diagonal block
// (I == J) holds every pair twice and feeds its rows only, the query itself left out.
//
// Each query keeps a running list of its best references (score, index) in the state buffers
// (aliased in place): up to `cap` entries, compacted to the best k by Before (score desc, index
// asc) when full; the k-th of those becomes a threshold that a new reference must beat. Every
// reference reaches every query exactly once over the scan, so the best k of the final list are
// the query's k nearest neighbours by S, ties by index. No re-scoring: S is the score.
// DmljaxSymSelect takes the union of the lists (one per device of the scan) and sorts it.

namespace {

// Runs body(a, b) over [0, n) in chunks on the pool (the calling thread takes chunks too). As in
// KnnSelectImpl, a task that starts after all chunks are taken touches nothing but `sh`.
template <typename Body>
void ParallelChunks(ffi::ThreadPool& pool, int64_t n, int64_t chunk, int64_t max_threads,
                    Body body) {
  if (n <= 0) return;
  int64_t threads = pool.num_threads();
  if (max_threads > 0) threads = std::min(threads, max_threads);
  threads = std::min(threads, (n + chunk - 1) / chunk);
  if (threads <= 1) {
    body(int64_t{0}, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto sh = std::make_shared<Shared>();
  auto run = [sh, n, chunk, body] {
    int64_t mine = 0;
    for (;;) {
      const int64_t a = sh->next.fetch_add(chunk, std::memory_order_relaxed);
      if (a >= n) break;
      const int64_t b = std::min(n, a + chunk);
      body(a, b);
      mine += b - a;
    }
    if (mine > 0 && sh->done.fetch_add(mine, std::memory_order_acq_rel) + mine == n) {
      std::lock_guard<std::mutex> lock(sh->mu);
      sh->cv.notify_all();
    }
  };
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done.load(std::memory_order_acquire) == n; });
}

// One query's running list of best references.
struct RunningBest {
  float* v;      // [cap]
  int32_t* id;   // [cap]
  int32_t* cnt;  // entries in use
  float* tv;     // threshold score (-inf until the first compaction)
  int32_t* ti;   // threshold index, -1 until the first compaction
};

void Compact(const RunningBest& rb, int64_t k, std::vector<Item>& tmp) {
  const int64_t n = *rb.cnt;
  tmp.resize(n);
  for (int64_t i = 0; i < n; ++i) tmp[i] = Item{rb.v[i], rb.id[i]};
  std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), Before);
  for (int64_t i = 0; i < k; ++i) {
    rb.v[i] = tmp[i].value;
    rb.id[i] = tmp[i].index;
  }
  *rb.cnt = static_cast<int32_t>(k);
  *rb.tv = tmp[k - 1].value;
  *rb.ti = tmp[k - 1].index;
}

// Offers reference `index` with score `val` (already ranked: never NaN).
inline void Offer(const RunningBest& rb, float val, int32_t index, int64_t cap, int64_t k,
                  std::vector<Item>& tmp) {
  if (*rb.ti >= 0 && !(val > *rb.tv || (val == *rb.tv && index < *rb.ti))) return;
  const int32_t c = *rb.cnt;
  rb.v[c] = val;
  rb.id[c] = index;
  *rb.cnt = c + 1;
  if (c + 1 == cap) Compact(rb, k, tmp);
}

ffi::Error SymMergeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vals_in,
                        ffi::Buffer<ffi::S32> ids_in, ffi::Buffer<ffi::S32> cnt_in,
                        ffi::Buffer<ffi::F32> tv_in, ffi::Buffer<ffi::S32> ti_in,
                        ffi::Buffer<ffi::F32> prod, ffi::Buffer<ffi::F32> half_norms,
                        ffi::Buffer<ffi::S32> offsets, ffi::ResultBuffer<ffi::F32> vals,
                        ffi::ResultBuffer<ffi::S32> ids, ffi::ResultBuffer<ffi::S32> cnt,
                        ffi::ResultBuffer<ffi::F32> tv, ffi::ResultBuffer<ffi::S32> ti,
                        int64_t k, int64_t max_threads) {
  const auto sdims = vals_in.dimensions();
  const auto pdims = prod.dimensions();
  const auto hdims = half_norms.dimensions();
  if (sdims.size() != 2 || pdims.size() != 2 || hdims.size() != 1 ||
      ids_in.dimensions().size() != 2 || cnt_in.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("sym_merge: wrong ranks of the operands");
  }
  const int64_t n = sdims[0], cap = sdims[1], b = pdims[0];
  if (pdims[1] != b || hdims[0] != n || k < 1 || cap <= k || ids_in.dimensions()[0] != n ||
      ids_in.dimensions()[1] != cap || cnt_in.dimensions()[0] != n ||
      tv_in.dimensions()[0] != n || ti_in.dimensions()[0] != n) {
    return ffi::Error::InvalidArgument("sym_merge: inconsistent shapes");
  }
  // The state is updated in place (XLA passes the same buffers when the aliasing holds).
  auto same_or_copy = [](auto& in, auto& out) {
    const auto* src = in.typed_data();
    auto* dst = out->typed_data();
    if (dst != src) std::copy(src, src + in.element_count(), dst);
  };
  same_or_copy(vals_in, vals);
  same_or_copy(ids_in, ids);
  same_or_copy(cnt_in, cnt);
  same_or_copy(tv_in, tv);
  same_or_copy(ti_in, ti);
  const int64_t row0 = offsets.typed_data()[0], col0 = offsets.typed_data()[1];
  if (row0 < 0 || col0 < 0 || row0 + b > n || col0 + b > n) {
    return ffi::Error::InvalidArgument("sym_merge: block offsets out of range");
  }
  const bool diagonal = row0 == col0;
  const float* p = prod.typed_data();
  const float* h = half_norms.typed_data();
  float* sv = vals->typed_data();
  int32_t* si = ids->typed_data();
  int32_t* sc = cnt->typed_data();
  float* stv = tv->typed_data();
  int32_t* sti = ti->typed_data();
  auto state = [=](int64_t q) {
    return RunningBest{sv + q * cap, si + q * cap, sc + q, stv + q, sti + q};
  };
  // Rows: the queries of block I against the references of block J. Eight scores at a time are
  // compared with the row's threshold (vectorised); only those that reach it are offered.
  ParallelChunks(pool, b, 16, max_threads, [=](int64_t ra, int64_t rb_) {
    std::vector<Item> tmp;
    const float* hj = h + col0;
    for (int64_t i = ra; i < rb_; ++i) {
      const int64_t q = row0 + i;
      const RunningBest st = state(q);
      const float hi = h[q];
      const float* prow = p + i * b;
      for (int64_t j0 = 0; j0 < b; j0 += 8) {
        const int64_t w = std::min<int64_t>(8, b - j0);
        float s[8];
        bool any = false;
        const float t = *st.tv;
        for (int64_t l = 0; l < w; ++l) {
          s[l] = prow[j0 + l] - (hi + hj[j0 + l]);
          any |= !(s[l] < t);  // NaN passes here; Rank makes it -inf below
        }
        if (!any) continue;
        for (int64_t l = 0; l < w; ++l) {
          const int64_t r = col0 + j0 + l;
          if (r == q) continue;  // never a neighbour of itself
          Offer(st, Rank(s[l]), static_cast<int32_t>(r), cap, k, tmp);
        }
      }
    }
  });
  if (diagonal) return ffi::Error::Success();
  // Columns: the queries of block J against the references of block I, in strips of 64 columns
  // (each thread owns its columns' lists), compared with the columns' thresholds.
  constexpr int64_t kStrip = 64;
  ParallelChunks(pool, (b + kStrip - 1) / kStrip, 1, max_threads, [=](int64_t sa, int64_t sb) {
    std::vector<Item> tmp;
    float hj[kStrip], t[kStrip], s[kStrip];
    for (int64_t strip = sa; strip < sb; ++strip) {
      const int64_t j0 = strip * kStrip, w = std::min(kStrip, b - j0);
      for (int64_t l = 0; l < w; ++l) hj[l] = h[col0 + j0 + l];
      for (int64_t l = 0; l < w; ++l) t[l] = stv[col0 + j0 + l];
      for (int64_t i = 0; i < b; ++i) {
        const float hi = h[row0 + i];
        const float* prow = p + i * b + j0;
        bool any = false;
        for (int64_t l = 0; l < w; ++l) {
          s[l] = prow[l] - (hi + hj[l]);
          any |= !(s[l] < t[l]);
        }
        if (!any) continue;
        for (int64_t l = 0; l < w; ++l) {
          if (s[l] < t[l]) continue;
          const int64_t q = col0 + j0 + l;
          Offer(state(q), Rank(s[l]), static_cast<int32_t>(row0 + i), cap, k, tmp);
          t[l] = stv[q];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// The best k of the union of `slices` running lists per query (one per device of the scan),
// sorted by Before.
ffi::Error SymSelectImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vals,
                         ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> cnt,
                         ffi::ResultBuffer<ffi::F32> top_scores,
                         ffi::ResultBuffer<ffi::S32> top_indices, int64_t max_threads) {
  const auto vdims = vals.dimensions();
  const auto odims = top_scores->dimensions();
  if (vdims.size() != 3 || ids.dimensions().size() != 3 || cnt.dimensions().size() != 2 ||
      odims.size() != 2 || top_indices->dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("sym_select: wrong ranks of the operands");
  }
  const int64_t slices = vdims[0], qb = vdims[1], cap = vdims[2], k = odims[1];
  if (odims[0] != qb || k < 1 || cnt.dimensions()[0] != slices || cnt.dimensions()[1] != qb ||
      top_indices->dimensions()[0] != qb || top_indices->dimensions()[1] != k) {
    return ffi::Error::InvalidArgument("sym_select: inconsistent shapes");
  }
  const float* v = vals.typed_data();
  const int32_t* id = ids.typed_data();
  const int32_t* c = cnt.typed_data();
  float* out_s = top_scores->typed_data();
  int32_t* out_i = top_indices->typed_data();
  ParallelChunks(pool, qb, 16, max_threads, [=](int64_t a, int64_t b) {
    std::vector<Item> items;
    for (int64_t row = a; row < b; ++row) {
      items.clear();
      for (int64_t sl = 0; sl < slices; ++sl) {
        const int64_t base = (sl * qb + row) * cap;
        const int64_t n = std::min<int64_t>(std::max(c[sl * qb + row], 0), cap);
        for (int64_t e = 0; e < n; ++e) items.push_back(Item{Rank(v[base + e]), id[base + e]});
      }
      // Every reference but the query reaches exactly one list, so there are at least k (and a
      // padding row's list is never read); stay in bounds should a list be short anyway.
      while (static_cast<int64_t>(items.size()) < k) items.push_back(Item{kNegInf, 0});
      std::nth_element(items.begin(), items.begin() + (k - 1), items.end(), Before);
      std::sort(items.begin(), items.begin() + k, Before);
      for (int64_t i = 0; i < k; ++i) {
        out_s[row * k + i] = items[i].value;
        out_i[row * k + i] = items[i].index;
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmljaxSymMerge, SymMergeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmljaxSymSelect, SymSelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("max_threads"));
