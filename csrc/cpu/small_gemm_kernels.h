// Few-row float32 GEMMs on SIMD registers, compiled once per instruction set next to the
// pointwise kernels (included by pointwise_cpu*.cpp after pointwise_cpu_kernels.h, whose
// includes and namespaces it shares); small_gemm.h describes them.
//
// Three forms (small_gemm.h; the transposed form has its own section below). The dot form reads the
// weight as it is stored ([N, K] rows, as nn.LSTM keeps it), so nothing is packed per call (the
// LSTMCell step): a tile of kRows rows of x (4, then 2 and 1 for the rest) and kLanes / kRows
// weight rows (one SIMD register's width in all: 16 with AVX-512) is computed with one accumulator
// register per output, and the accumulators are then summed across lanes all at once by a tree of
// deinterleave-and-add steps, whose result holds the tile's outputs in order. The panel form reads
// the weight packed once per call into k-major panels (a layer's time loop reuses it T times), as
// outer products of broadcast x values and weight vectors: no sums across lanes, twice the FMAs per
// load (the reason to pack, from 4 rows up). Each thread gets the same blocks at every call of the
// same shape (at::parallel_for splits a range the same way every time), so in a time loop its share
// of the recurrent weight stays in its core's cache. Every output is summed by one thread in a
// fixed order: results do not depend on the thread count (nor on the tile an output falls in).
#pragma once

#include <algorithm>
#include <atomic>
#include <vector>

#include "../thread_team.h"
#include "small_gemm.h"

namespace lstm_fused::CPU_CAPABILITY {

namespace {

using FloatVec = at::vec::Vectorized<float>;
constexpr int kLanes = FloatVec::size();

// acc[j] holds partial sums of output j in its lanes; returns {sum(acc[0]), ..., sum(acc[L-1])}.
// Each level halves the vectors: deinterleave2(a, b) puts the even lanes of a then of b in one
// vector and the odd lanes in the other, so their sum keeps every output's partials together.
FloatVec sum_lanes(FloatVec (&acc)[kLanes]) {
  for (int width = kLanes; width > 1; width /= 2) {
    for (int i = 0; i < width / 2; ++i) {
      const auto [even, odd] = at::vec::deinterleave2(acc[2 * i], acc[2 * i + 1]);
      acc[i] = even + odd;
    }
  }
  return acc[0];
}

// A tile: out[r0 + i, j0 + j] (+)= dot(x[r0 + i, :], w[j0 + j, :]) for i < kRows and
// j < kWidth = kLanes / kRows (kFull: a full tile, fully unrolled) or j < count (the last, partial
// tile of a column range). Register blocking over rows and weight columns: each weight load
// feeds kRows FMAs, each x load kWidth, into kLanes accumulators, acc[i * kWidth + j] holding
// output (i, j)'s partial sums; sum_lanes then returns the tile's outputs row after row. An
// output's sum (its lanes over k in order, then the fixed tree) is the same whatever its position
// in the tile, so the result does not depend on the row blocking either.
template <int kRows, bool kFull>
void dot_tile(const DotGemm& p, int64_t r0, int64_t j0, int count) {
  constexpr int kWidth = kLanes / kRows;
  const int width = kFull ? kWidth : count;
  const float* w = p.w + j0 * p.w_stride;
  const float* x[kRows];
  for (int i = 0; i < kRows; ++i) x[i] = p.x + (r0 + i) * p.x_stride;
  FloatVec acc[kLanes];
  for (int a = 0; a < kLanes; ++a) acc[a] = FloatVec(0.f);
  int64_t k = 0;
  for (; k + kLanes <= p.k; k += kLanes) {
    FloatVec xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = FloatVec::loadu(x[i] + k);
    for (int j = 0; j < width; ++j) {
      const FloatVec wv = FloatVec::loadu(w + j * p.w_stride + k);
      for (int i = 0; i < kRows; ++i) {
        acc[i * kWidth + j] = at::vec::fmadd(xv[i], wv, acc[i * kWidth + j]);
      }
    }
  }
  if (k < p.k) {  // the last K % kLanes columns (loadu(ptr, n) fills the other lanes with 0)
    const int n = static_cast<int>(p.k - k);
    FloatVec xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = FloatVec::loadu(x[i] + k, n);
    for (int j = 0; j < width; ++j) {
      const FloatVec wv = FloatVec::loadu(w + j * p.w_stride + k, n);
      for (int i = 0; i < kRows; ++i) {
        acc[i * kWidth + j] = at::vec::fmadd(xv[i], wv, acc[i * kWidth + j]);
      }
    }
  }
  if constexpr (kRows == 1) {
    float* out = p.out + r0 * p.out_stride + j0;
    FloatVec sums = sum_lanes(acc);
    if (p.accumulate) sums = sums + FloatVec::loadu(out, width);
    sums.store(out, width);
  } else {
    alignas(64) float sums[kLanes];
    sum_lanes(acc).store(sums);
    for (int i = 0; i < kRows; ++i) {
      float* out = p.out + (r0 + i) * p.out_stride + j0;
      for (int j = 0; j < width; ++j) {
        out[j] = p.accumulate ? out[j] + sums[i * kWidth + j] : sums[i * kWidth + j];
      }
    }
  }
}

// Rows [r0, r0 + kRows) of output columns [j_begin, j_end), in tiles of kLanes / kRows columns.
template <int kRows>
void dot_rows(const DotGemm& p, int64_t r0, int64_t j_begin, int64_t j_end) {
  constexpr int kWidth = kLanes / kRows;
  int64_t j = j_begin;
  for (; j + kWidth <= j_end; j += kWidth) dot_tile<kRows, true>(p, r0, j, kWidth);
  if (j < j_end) dot_tile<kRows, false>(p, r0, j, static_cast<int>(j_end - j));
}

// The widest row block (4 rows where a register holds at least 4 lanes, else 2, else 1).
constexpr int kRowBlock = kLanes >= 4 ? 4 : kLanes >= 2 ? 2 : 1;

// Output columns [j_begin, j_end) of p, every row: per column slice of kLanes (whose weight rows
// then stay in L1 for every row block), rows in blocks of kRowBlock, the rest in 2 and 1.
void dot_columns(const DotGemm& p, int64_t r_begin, int64_t r_end, int64_t j_begin,
                 int64_t j_end) {
  for (int64_t j = j_begin; j < j_end; j += kLanes) {
    const int64_t j1 = std::min(j_end, j + kLanes);
    int64_t r = r_begin;
    for (; r + kRowBlock <= r_end; r += kRowBlock) dot_rows<kRowBlock>(p, r, j, j1);
    if constexpr (kRowBlock > 2) {
      for (; r + 2 <= r_end; r += 2) dot_rows<2>(p, r, j, j1);
    }
    for (; r < r_end; ++r) dot_rows<1>(p, r, j, j1);
  }
}

void dot_gemm(const DotGemm& p) {
  const int64_t blocks = (p.n + kLanes - 1) / kLanes;
  parallel_range(0, blocks, 1, [&](int64_t begin, int64_t end) {
    dot_columns(p, 0, p.rows, begin * kLanes, std::min(p.n, end * kLanes));
  });
}

// --- the panel form: the weight packed once per call (small_gemm.h, PanelGemm) ---------------
//
// An outer-product tile: kRows rows of x by kPanels panels (kPanels * kLanes output columns), one
// accumulator register per (row, panel); at each k, one load per panel and one broadcast per row
// feed kRows * kPanels FMAs. No sums across lanes and no stores but the tile's vectors at the end:
// with AVX-512, 8 rows by 3 panels keep 24 accumulators and 2 of every 3 instructions are FMAs;
// with AVX2 (16 registers), 6 rows by 2 panels keep 12, more chains of FMAs than the two pipes'
// latency needs in flight (4 by 2, whose 8 chains just cover it, took 1.05-1.13x the time of the
// B = 12-32 recurrent GEMM on a Zen 4 capped at AVX2, and its weight and input gradients were 3-9%
// slower against ATen's). Every output is one chain of FMAs over k in order, then added to `out`
// when accumulating (or the bias added to it): the result depends neither on the tile an output
// falls in nor on the thread count, and equals the sum and a separate bias add (x·wᵀ + b in
// training) bit for bit.
//
// A tile's panels are adjacent columns of one group (panel_columns), or, for a weight in gate
// groups, the same kLanes units of every group (group_columns): the step's GEMM and the chunked
// input projection then read the four gates of 16 units in one pass over k, 6 rows at a time (24
// accumulators; 8 rows of the 3 coupled gates), and a step of 1-4 rows has 4 to 16 chains of FMAs
// instead of 2 to 8. Against tiles of one gate, a Zen 4's inference forward (T = 100, I = H = 256,
// 2 threads; in one process, the order of the two forms shuffled every round) took 0.99x the time
// at B = 1, 0.97x at B = 4, 0.98x at B = 16 and 0.99-1.00x at B = 64-128. AVX2 has too few
// registers for it as the main tile: 4 gates by 3 rows (12 accumulators and 4 weight registers)
// was slower than 6 rows by 2 panels at B = 16 (1.06x), by 4 and 2 rows 1.2-1.3x; it takes only
// the 1-3 rows that one-gate tiles would leave to a last tile of fewer than 4 rows
// (group_columns): capped at AVX2, B = 1 0.79x, B = 2 0.89x, B = 3 0.75x, B = 5 0.89x the time
// (against 2- and 1-row tiles, before next_tile_rows).
constexpr int kPanelRows = kLanes >= 16 ? 8 : 6;
constexpr int kTilePanels = kLanes >= 16 ? 3 : 2;
constexpr bool kGroupTiles = kLanes >= 16;

const float* panel_at(const PanelGemm& p, int64_t group, int64_t column) {
  const int64_t group_panels = (p.group_columns + kLanes - 1) / kLanes;
  return p.panels + (group * group_panels + column / kLanes) * p.k * kLanes;
}

// The output columns of a tile: per panel, its packed weight, its first column (of `out` and of
// the bias) and how many of its kLanes columns are wanted (fewer past a group's end or the
// caller's range).
template <int kPanels>
struct TileColumns {
  const float* weight[kPanels];
  int64_t column[kPanels];
  int width[kPanels];
};

// Rows [r0, r0 + kRows) of the tile's columns.
template <int kRows, int kPanels>
void panel_tile(const PanelGemm& p, int64_t r0, const TileColumns<kPanels>& t) {
  const float* x[kRows];
  for (int i = 0; i < kRows; ++i) x[i] = p.x + (r0 + i) * p.x_stride;
  FloatVec acc[kRows][kPanels];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kPanels; ++v) acc[i][v] = FloatVec(0.f);
  }
  for (int64_t k = 0; k < p.k; ++k) {
    FloatVec wv[kPanels];
    for (int v = 0; v < kPanels; ++v) wv[v] = FloatVec::loadu(t.weight[v] + k * kLanes);
    for (int i = 0; i < kRows; ++i) {
      const FloatVec xv(x[i][k]);
      for (int v = 0; v < kPanels; ++v) acc[i][v] = at::vec::fmadd(xv, wv[v], acc[i][v]);
    }
  }
  FloatVec bias[kPanels];
  if (p.bias) {
    for (int v = 0; v < kPanels; ++v) bias[v] = FloatVec::loadu(p.bias + t.column[v], t.width[v]);
  }
  for (int i = 0; i < kRows; ++i) {
    float* out = p.out + (r0 + i) * p.out_stride;
    for (int v = 0; v < kPanels; ++v) {
      FloatVec sums = acc[i][v];
      if (p.accumulate) sums = sums + FloatVec::loadu(out + t.column[v], t.width[v]);
      if (p.bias) sums = sums + bias[v];
      sums.store(out + t.column[v], t.width[v]);
    }
  }
}

// The rows of the next row tile with `left` rows to go, tiles of at most kRows rows: kRows while
// at least 3 rows would be left after it, then the rest in one tile, or kRows + 1 or + 2 rows in
// two near-equal tiles (8 rows by 6 are 4 + 4, not 6 + 2: a tile of 1 or 2 rows has few chains
// of FMAs, which wait on latency, and reads the tile's weight once more for a row or two).
// Against tiles of kRows, then 4, 2 and 1 rows, a Zen 4's inference forward (T = 100, I = H =
// 256, 2 threads, the two plans in one process in a shuffled order) took 0.91x the time at B = 3,
// 0.94x at B = 5, 0.96x at B = 7, 0.97x at B = 8; capped at AVX2, 0.91x at B = 5, 0.98x at
// B = 7, the same at 1, 3, 8 and 16.
constexpr int64_t next_tile_rows(int64_t left, int64_t max_rows) {
  return left <= max_rows ? left : left - max_rows >= 3 ? max_rows : (left + 1) / 2;
}

// panel_tile<rows, kPanels> for 1 <= rows <= kRows.
template <int kRows, int kPanels>
void panel_tile_of(int64_t rows, const PanelGemm& p, int64_t r0, const TileColumns<kPanels>& t) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return panel_tile_of<kRows - 1, kPanels>(rows, p, r0, t);
  }
  panel_tile<kRows, kPanels>(p, r0, t);
}

// Rows [r_begin, r_end) of the tile's columns, in row tiles of up to kRows (next_tile_rows).
template <int kRows, int kPanels>
void tile_rows(const PanelGemm& p, int64_t r_begin, int64_t r_end, const TileColumns<kPanels>& t) {
  for (int64_t r = r_begin; r < r_end;) {
    const int64_t rows = next_tile_rows(r_end - r, kRows);
    panel_tile_of<kRows, kPanels>(rows, p, r, t);
    r += rows;
  }
}

// Rows [r_begin, r_end) of group g's columns [c0, c0 + kPanels * kLanes) (kPanels <=
// kTilePanels, c0 a multiple of kLanes), the last panel's first `last` columns only.
template <int kPanels>
void panel_rows(const PanelGemm& p, int64_t r_begin, int64_t r_end, int64_t g, int64_t c0,
                int last) {
  TileColumns<kPanels> t;
  for (int v = 0; v < kPanels; ++v) {
    t.weight[v] = panel_at(p, g, c0) + v * p.k * kLanes;
    t.column[v] = g * p.group_columns + c0 + v * kLanes;
    t.width[v] = v == kPanels - 1 ? last : kLanes;
  }
  tile_rows<kPanelRows>(p, r_begin, r_end, t);
}

// Rows [r_begin, r_end) of group g's columns [c_begin, c_end), c_begin a multiple of kLanes:
// tiles of kTilePanels panels (whose weight then serves every row tile from the cache), the rest
// narrower.
void panel_columns(const PanelGemm& p, int64_t r_begin, int64_t r_end, int64_t g,
                   int64_t c_begin, int64_t c_end) {
  for (int64_t c = c_begin; c < c_end; c += kTilePanels * kLanes) {
    const int64_t columns = std::min<int64_t>(c_end - c, kTilePanels * kLanes);
    const int panels = static_cast<int>((columns + kLanes - 1) / kLanes);
    const int last = static_cast<int>(columns - (panels - 1) * kLanes);
    if (panels == 3) {
      if constexpr (kTilePanels >= 3) panel_rows<3>(p, r_begin, r_end, g, c, last);
    } else if (panels == 2) {
      panel_rows<2>(p, r_begin, r_end, g, c, last);
    } else {
      panel_rows<1>(p, r_begin, r_end, g, c, last);
    }
  }
}

// How many of `rows` rows tile_rows<kRows> leaves to a last tile of fewer than 4 rows (0-3).
template <int kRows>
int64_t short_tile_rows(int64_t rows) {
  while (next_tile_rows(rows, kRows) < rows) rows -= next_tile_rows(rows, kRows);
  return rows < 4 ? rows : 0;
}

// Rows [r_begin, r_end) of every group's columns [c_begin, c_end) (c_begin a multiple of kLanes).
// With 3 or 4 groups (the gates), tiles of one panel of each group: with AVX-512 every row, 24 /
// groups rows at a time; with AVX2 the 1-3 rows that the one-group tiles would leave to a last
// tile of fewer than 4 rows (2 to 6 chains of FMAs, where the two pipes need 8 in flight; 3 rows
// of 4 gates keep 12, but as the main tile they ran slower than 6 rows by 2 panels). Else (and
// the other rows) panel_columns of each group.
void group_columns(const PanelGemm& p, int64_t r_begin, int64_t r_end, int64_t c_begin,
                   int64_t c_end) {
  const bool gates = p.groups == 3 || p.groups == 4;
  const int64_t r_split = !gates        ? r_end
                          : kGroupTiles ? r_begin
                                        : r_end - short_tile_rows<kPanelRows>(r_end - r_begin);
  if (r_split > r_begin) {
    for (int64_t g = 0; g < p.groups; ++g) panel_columns(p, r_begin, r_split, g, c_begin, c_end);
  }
  if (r_split == r_end) return;
  auto tiles = [&](auto groups) {
    constexpr int kGroups = decltype(groups)::value;
    TileColumns<kGroups> t;
    for (int64_t c = c_begin; c < c_end; c += kLanes) {
      for (int v = 0; v < kGroups; ++v) {
        t.weight[v] = panel_at(p, v, c);
        t.column[v] = v * p.group_columns + c;
        t.width[v] = static_cast<int>(std::min<int64_t>(kLanes, c_end - c));
      }
      tile_rows<kGroupTiles ? 24 / kGroups : 3>(p, r_split, r_end, t);
    }
  };
  if (p.groups == 4) {
    tiles(std::integral_constant<int, 4>());
  } else {
    tiles(std::integral_constant<int, 3>());
  }
}

// Runs body(c) once for every c in [0, chunks), on the threads of one parallel region (or of the
// time loop's thread team: run_on_threads, ../thread_team.h). Each
// thread owns the contiguous segment of chunks a static split gives it (the same at every call,
// so in a time loop it keeps the same weight columns in its core's cache step after step) and
// runs it front to back; a thread done with its own takes what is left of the other segments
// from their backs. A core slowed by another process then hands its last chunks to the other
// instead of holding every thread at the end of the step. Which thread runs a chunk does not
// change its result.
template <typename Body>
void run_balanced(int64_t chunks, const Body& body) {
  const int64_t threads = std::min<int64_t>(thread_count(), chunks);
  if (threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  // A segment's chunks [begin, end): `left` counts down on every claim (its owner's from the
  // front, the others' from the back), so no chunk is claimed twice; on a cache line of its own.
  struct alignas(64) Segment {
    std::atomic<int64_t> left{0}, taken_from_back{0};
    int64_t begin = 0, end = 0;
  };
  std::vector<Segment> segments(threads);
  for (int64_t i = 0; i < threads; ++i) {
    segments[i].begin = i * chunks / threads, segments[i].end = (i + 1) * chunks / threads;
    segments[i].left.store(segments[i].end - segments[i].begin, std::memory_order_relaxed);
  }
  run_on_threads(threads, [&](int64_t first, int64_t last) {
    for (int64_t own = first; own < last; ++own) {
      Segment& s = segments[own];
      for (int64_t c = s.begin; s.left.fetch_sub(1, std::memory_order_relaxed) > 0; ++c) body(c);
    }
    for (int64_t i = 1; i < threads; ++i) {
      Segment& s = segments[(last - 1 + i) % threads];
      while (s.left.fetch_sub(1, std::memory_order_relaxed) > 0) {
        body(s.end - 1 - s.taken_from_back.fetch_add(1, std::memory_order_relaxed));
      }
    }
  });
}

// Rows of a balanced chunk, and the fewest rows that are run in balanced chunks: a step of fewer
// rows takes a few microseconds, and a chunk claimed across cores costs more than the imbalance
// it saves (at B = 1 on a Zen 4 the forward took 1.04-1.06x the static split's time; B = 8,
// 0.98-1.00x; B = 16-64 with one core slowed by another process, 0.80-0.88x).
constexpr int64_t kChunkRows = 16, kBalancedRows = 8;

// body(r0, r1, u0, u1) for rows [r0, r1) and units [u0, u1) (of each column group: a gate's hidden
// units) covering [0, rows) x [0, units) once, split between the threads by units as every
// GEMM of a step and of its chunked input projection is, so each thread keeps its share of the
// weights in its cache and computes the pre-activations its own step activates. From
// kBalancedRows rows, in chunks of kChunkRows rows by up to kTilePanels panels (the GEMM's widest
// tiles; at least 4 chunks of units a thread), run_balanced; fewer, a static split.
template <typename Body>
void split_by_units(int64_t rows, int64_t units, const Body& body) {
  const int64_t blocks = (units + kLanes - 1) / kLanes;
  if (rows < kBalancedRows) {
    parallel_range(0, blocks, 1, [&](int64_t begin, int64_t end) {
      body(0, rows, begin * kLanes, std::min(units, end * kLanes));
    });
    return;
  }
  const int64_t chunk_units =
      kLanes *
      std::clamp<int64_t>(blocks / (4 * std::max<int64_t>(1, thread_count())), 1, kTilePanels);
  const int64_t row_chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int64_t unit_chunks = (units + chunk_units - 1) / chunk_units;
  run_balanced(unit_chunks * row_chunks, [&](int64_t c) {
    const int64_t u = c / row_chunks, r = c % row_chunks;
    body(r * kChunkRows, std::min(rows, (r + 1) * kChunkRows), u * chunk_units,
         std::min(units, (u + 1) * chunk_units));
  });
}

// Rows per task when a GEMM has many rows (a layer's input projection, T * B rows): their x
// (kRowsPerTask * K floats) stays in the core's cache while every weight panel passes once.
constexpr int64_t kRowsPerTask = 64;

// A weight in groups (one per gate: the recurrent weight, or the input weight of a loop that reads
// its projection a chunk at a time): split_by_units, as the fused step. Few rows (a time step's)
// of one group: the threads split the columns. Many rows of one group: the threads split the
// rows, in blocks of kRowsPerTask, each block against the whole weight.
void panel_gemm(const PanelGemm& p) {
  if (p.groups > 1) {
    split_by_units(p.rows, p.group_columns, [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
      group_columns(p, r0, r1, u0, u1);
    });
    return;
  }
  const int64_t blocks = (p.group_columns + kLanes - 1) / kLanes;
  if (p.rows <= 2 * kRowsPerTask) {
    parallel_range(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = 0; g < p.groups; ++g) {
        panel_columns(p, 0, p.rows, g, begin * kLanes, std::min(p.group_columns, end * kLanes));
      }
    });
    return;
  }
  const int64_t row_blocks = (p.rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_range(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kRowsPerTask, r1 = std::min(p.rows, r0 + kRowsPerTask);
      for (int64_t g = 0; g < p.groups; ++g) panel_columns(p, r0, r1, g, 0, p.group_columns);
    }
  });
}

// One forward step: z += h_{t-1} W_hhᵀ, then the pointwise forward, split_by_units: for rows
// [r0, r1) and units [u0, u1), `gemm(r0, r1, u0, u1)` adds those units' columns of every gate,
// then their pointwise step runs while z is in the cache, so the step is one job for the threads.
template <typename ChunkGemm>
void recurrent_step_by_units(const ForwardStep& step, const ChunkGemm& gemm) {
  variant_switch(step, [&](auto coupled, auto diagonal, auto part) {
    split_by_units(step.rows, step.hidden, [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
      gemm(r0, r1, u0, u1);
      for (int64_t row = r0; row < r1; ++row) {
        for (int64_t j = u0; j < u1; j += kLanes) {
          forward_chunk<SimdIO<float>, decltype(coupled)::value, decltype(diagonal)::value,
                        decltype(part)::value>(step, row, j,
                                               static_cast<int>(std::min<int64_t>(kLanes, u1 - j)));
        }
      }
      end_streamed_stores(step.stream_saved);
    });
  });
}

// The weight as stored ([G * H, K] rows): the LSTMCell step.
void recurrent_step(const DotGemm& gemm, const ForwardStep& step) {
  const int64_t H = step.hidden;
  const int gates = num_gates(step.coupled);
  recurrent_step_by_units(step, [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
    for (int g = 0; g < gates; ++g) dot_columns(gemm, r0, r1, g * H + u0, g * H + u1);
  });
}

// The weight packed in one panel group per gate: a layer's time loop.
void recurrent_step_panels(const PanelGemm& gemm, const ForwardStep& step) {
  TORCH_INTERNAL_ASSERT(gemm.group_columns == step.hidden &&
                        gemm.groups == num_gates(step.coupled));
  recurrent_step_by_units(step, [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
    group_columns(gemm, r0, r1, u0, u1);
  });
}

// --- the transposed form: the weight and input gradients (small_gemm.h, TransposedGemm) ------
//
// The panel tile with the roles of the operands' rows and columns swapped: out rows m0.. (columns
// of a) by kPanels panels of out columns n0.. (columns of b). At each summed row k, kRows
// broadcasts of a's values (a(k, m0 + i) at a[k * a_step + i * a_row]: TransposedBlockValues)
// and kPanels loads of b's row (the panels of a packed weight are exactly such rows) feed
// kRows * kPanels FMAs. The rows are summed a block at a time so that the block of b stays in
// the core's cache while every tile of the thread's out rows passes over it. A tile starts from
// the sums of the earlier blocks in `out` (stored and loaded exactly): every output is one chain
// of FMAs over k in order, whatever the blocking and the thread count. kFull: the last panel is
// whole (else its first `last` columns only).
template <int kRows, int kPanels, bool kFull>
C10_NOINLINE void transposed_tile(const float* a, int64_t a_step, int64_t a_row, const float* b,
                                  int64_t b_step, int64_t count, float* out, int64_t out_stride,
                                  bool first, int last) {
  const auto width = [&](int v) { return kFull || v < kPanels - 1 ? kLanes : last; };
  FloatVec acc[kRows][kPanels];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kPanels; ++v) {
      acc[i][v] = first ? FloatVec(0.f)
                        : FloatVec::loadu(out + i * out_stride + v * kLanes, width(v));
    }
  }
  for (int64_t k = 0; k < count; ++k, a += a_step, b += b_step) {
    FloatVec wv[kPanels];
    for (int v = 0; v < kPanels; ++v) {
      wv[v] = kFull || v < kPanels - 1 ? FloatVec::loadu(b + v * kLanes)
                                       : FloatVec::loadu(b + v * kLanes, last);
    }
    for (int i = 0; i < kRows; ++i) {
      const FloatVec xv(a[i * a_row]);
      for (int v = 0; v < kPanels; ++v) acc[i][v] = at::vec::fmadd(xv, wv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kPanels; ++v) acc[i][v].store(out + i * out_stride + v * kLanes, width(v));
  }
}

// Rows summed per block: the block of b (128 KiB at 256 columns) and two blocks of the thread's
// copied a values (the one the tiles read, the next one being copied) stay in a core's L2 cache.
constexpr int64_t kTransposedBlockRows = 128;

// Out rows [m0, m0 + kRows) by all columns, summed over the block's `count` rows from k0: tiles
// of kTilePanels panels, the rest narrower. a_values: the tile's first a value of the block,
// a_step apart from row to row, a_row from out row to out row.
template <int kRows>
void transposed_rows(const TransposedGemm& p, int64_t m0, int64_t k0, int64_t count,
                     const float* a_values, int64_t a_step, int64_t a_row) {
  const float* b = p.b + k0 * p.b_stride;
  float* out = p.out + m0 * p.out_stride;
  const bool first = k0 == 0;
  constexpr int64_t kTileColumns = kTilePanels * kLanes;
  int64_t n = 0;
  for (; n + kTileColumns <= p.n; n += kTileColumns) {
    transposed_tile<kRows, kTilePanels, true>(a_values, a_step, a_row, b + n, p.b_stride, count,
                                              out + n, p.out_stride, first, kLanes);
  }
  if (n == p.n) return;
  const int64_t columns = p.n - n;
  const int panels = static_cast<int>((columns + kLanes - 1) / kLanes);
  const int last = static_cast<int>(columns - (panels - 1) * kLanes);
  const auto tile = [&](auto panels_c, auto full_c) {
    transposed_tile<kRows, decltype(panels_c)::value, decltype(full_c)::value>(
        a_values, a_step, a_row, b + n, p.b_stride, count, out + n, p.out_stride, first, last);
  };
  using Full = std::true_type;
  using Part = std::false_type;
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (panels == 1) {
    last == kLanes ? tile(One{}, Full{}) : tile(One{}, Part{});
  } else if (panels == 2) {
    last == kLanes ? tile(Two{}, Full{}) : tile(Two{}, Part{});
  } else if constexpr (kTilePanels > 2) {  // 3 panels, the last partial
    tile(std::integral_constant<int, 3>{}, Part{});
  }
}

// Where the tiles find a's values of a block of rows for a chunk of out rows [m_begin, m_begin +
// width): a(k, m) at at(m)[k * step() + (m - m0) * row()] for the tile's first out row m0.
// Stored [m, rows] (the input gradient's dz), a itself: each out row's values are a run the
// tile reads in order, as the forward's tile reads x. Stored [rows, m] (the weight gradients'
// dz), they are copied first into slots of kPanelRows values per row, one slot per tile: a's
// rows are 4 KiB or more apart, each on pages of its own, where the hardware does not prefetch,
// so they are asked for (prefetch) ahead of the copy, and copied during the previous block's
// tiles, in parts: units [u0, u1) of units() (rows) at a time. Slots are one cache line longer
// than their values: slots a multiple of 4 KiB apart would all share one L1 set.
class TransposedBlockValues {
 public:
  TransposedBlockValues(const TransposedGemm& p, int64_t max_width)
      : p_(p), slot_floats_(kTransposedBlockRows * kPanelRows + 64 / sizeof(float)),
        values_(p.a_transposed ? 0 : ((max_width + kPanelRows - 1) / kPanelRows) * slot_floats_) {}

  // Now for out rows [m_begin, m_begin + width) and the block's `count` rows from k0.
  void start(int64_t m_begin, int64_t width, int64_t k0, int64_t count) {
    m_begin_ = m_begin, width_ = width, k0_ = k0, count_ = count;
  }
  int64_t units() const { return p_.a_transposed ? 0 : count_; }
  void copy(int64_t u0, int64_t u1) {
    for (int64_t k = u0; k < u1; ++k) {
      const float* row = p_.a + (k0_ + k) * p_.a_stride + m_begin_;
      float* dst = values_.data() + k * kPanelRows;
      int64_t m = 0;
      for (; m + kPanelRows <= width_; m += kPanelRows, dst += slot_floats_) {
        for (int i = 0; i < kPanelRows; ++i) dst[i] = row[m + i];
      }
      std::copy(row + m, row + width_, dst);
    }
  }
  void prefetch(int64_t u0, int64_t u1) const {
    for (int64_t k = u0; k < std::min(u1, units()); ++k) {
      const float* row = p_.a + (k0_ + k) * p_.a_stride + m_begin_;
      for (int64_t m = 0; m < width_; m += 64 / sizeof(float)) __builtin_prefetch(row + m, 0, 2);
    }
  }
  const float* at(int64_t m) const {
    if (p_.a_transposed) return p_.a + m * p_.a_stride + k0_;
    return values_.data() + ((m - m_begin_) / kPanelRows) * slot_floats_ +
           (m - m_begin_) % kPanelRows;
  }
  int64_t step() const { return p_.a_transposed ? 1 : kPanelRows; }
  int64_t row() const { return p_.a_transposed ? p_.a_stride : 1; }

 private:
  const TransposedGemm& p_;
  int64_t slot_floats_, m_begin_ = 0, width_ = 0, k0_ = 0, count_ = 0;
  std::vector<float> values_;
};

// Out rows per chunk: a thread sums every block of rows for a chunk of out rows before the next
// chunk, so that the chunk's out rows (with the a values, two blocks' worth) stay in its L2
// cache from block to block however many out rows there are (the input gradient has T*B).
constexpr int64_t kTransposedChunkRows = 64 * kPanelRows;

// The threads split the out rows (tiles of kPanelRows), each summing every row of a and b for a
// chunk of its out rows at a time. Where a's values are copied (a stored [rows, m]), the next
// block's (of this chunk, or the first of the next) are copied while the tiles of this one run:
// a part of its rows after each tile of out rows, the part after it asked for (prefetched) then,
// a tile's time before its copy.
void transposed_gemm(const TransposedGemm& p) {
  const int64_t m_tiles = (p.m + kPanelRows - 1) / kPanelRows;
  parallel_range(0, m_tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t m_begin = begin * kPanelRows, m_end = std::min(p.m, end * kPanelRows);
    const int64_t blocks = (p.rows + kTransposedBlockRows - 1) / kTransposedBlockRows;
    const int64_t chunks = (m_end - m_begin + kTransposedChunkRows - 1) / kTransposedChunkRows;
    // Work item w: block w % blocks of chunk w / blocks.
    const auto chunk_begin = [&](int64_t w) { return m_begin + (w / blocks) * kTransposedChunkRows; };
    const auto chunk_end = [&](int64_t w) {
      return std::min(m_end, chunk_begin(w) + kTransposedChunkRows);
    };
    const auto block_k0 = [&](int64_t w) { return (w % blocks) * kTransposedBlockRows; };
    const auto block_rows = [&](int64_t w) {
      return std::min(p.rows - block_k0(w), kTransposedBlockRows);
    };
    const int64_t width = std::min(m_end - m_begin, kTransposedChunkRows);
    TransposedBlockValues values[2] = {{p, width}, {p, width}};
    const auto start = [&](TransposedBlockValues& v, int64_t w) {
      v.start(chunk_begin(w), chunk_end(w) - chunk_begin(w), block_k0(w), block_rows(w));
    };
    start(values[0], 0);
    values[0].prefetch(0, values[0].units());
    values[0].copy(0, values[0].units());
    for (int64_t w = 0; w < chunks * blocks; ++w) {
      const int64_t m0 = chunk_begin(w), m1 = chunk_end(w), k0 = block_k0(w), count = block_rows(w);
      const TransposedBlockValues& current = values[w % 2];
      TransposedBlockValues& next = values[(w + 1) % 2];
      const bool more = w + 1 < chunks * blocks;
      if (more) start(next, w + 1);
      const int64_t next_units = more ? next.units() : 0;
      const int64_t full_tiles = (m1 - m0) / kPanelRows;
      // The next block's units copied after tile t: [part(t), part(t + 1)).
      const auto part = [&](int64_t t) { return next_units * t / std::max<int64_t>(1, full_tiles); };
      next.prefetch(0, part(1));
      int64_t m = m0;
      for (int64_t t = 0; t < full_tiles; ++t, m += kPanelRows) {
        transposed_rows<kPanelRows>(p, m, k0, count, current.at(m), current.step(), current.row());
        next.prefetch(part(t + 1), part(t + 2));
        next.copy(part(t), part(t + 1));
      }
      next.copy(part(full_tiles), next_units);  // (no full tiles: every unit)
      // The chunk's last out rows in tiles of 4, 2 and 1.
      const int64_t step = current.step(), row = current.row();
      if constexpr (kPanelRows > 4) {
        for (; m + 4 <= m1; m += 4) transposed_rows<4>(p, m, k0, count, current.at(m), step, row);
      }
      for (; m + 2 <= m1; m += 2) transposed_rows<2>(p, m, k0, count, current.at(m), step, row);
      for (; m < m1; ++m) transposed_rows<1>(p, m, k0, count, current.at(m), step, row);
    }
  });
}

}  // namespace

const CpuGemmKernels& gemm_kernels() {
  static const CpuGemmKernels table{dot_gemm, panel_gemm, transposed_gemm, recurrent_step,
                                    recurrent_step_panels, kLanes};
  return table;
}

}  // namespace lstm_fused::CPU_CAPABILITY
