// The CPU GEMM driver: prepare_cpu_weight (repacking, once per layer) and
// cpu_gemm (per call: input preparation, threading, routing between the
// fused kernels and dequantize + BLAS, output conversion). The kernels
// themselves live in kernels_*.cpp; the layout is described in layout.h and
// docs/format.md ("In-memory CPU layout").
#include "gptqkit/cpu_gemm.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "../bitstream.h"
#include "../blas.h"
#include "../checks.h"
#include "../half.h"
#include "../parallel.h"
#include "dispatch.h"
#include "layout.h"
#include "thread_pool.h"

namespace gptqkit {

using cpu::kPanel;
using cpu::pool_for;

namespace {

// From this many rows of x on, dequantize + BLAS sgemm beats the fused
// kernels (measured with benchmarks/bench_cpu_gemm.py, AVX2, 2 threads:
// docs/performance.md).
constexpr int64_t kDefaultBlasMinRows = 128;
// Multiply-adds a worker should have at least before another thread is
// woken (about 40 us of one core). Smaller products run on the calling
// thread: a hand-over costs little, but when the cores are oversubscribed
// (PyTorch's OpenMP workers spin for a while after each parallel region) a
// preempted helper makes the caller wait for a scheduler tick. Measured on
// SmolLM2-135M decoding (layers of 0.1-0.9 M weights), 2 threads: 21 tokens/s
// with a 64 Ki threshold, 26 with this one.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;
// Per-worker scratch for a dequantized weight tile on the BLAS path.
constexpr int64_t kTileBytes = int64_t{4} << 20;

constexpr int codes_per_word(int bits) { return bits == 3 ? 10 : 32 / bits; }

// 64-byte aligned, zero-initialised storage (whole cache lines per panel row).
struct AlignedBuffer {
  void* data = nullptr;
  size_t bytes = 0;
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t n) : bytes(n) {
    if (n == 0) return;
    data = ::operator new(n, std::align_val_t(64));
    std::memset(data, 0, n);
  }
  ~AlignedBuffer() {
    if (data != nullptr) ::operator delete(data, std::align_val_t(64));
  }
  AlignedBuffer(AlignedBuffer&& o) noexcept : data(o.data), bytes(o.bytes) {
    o.data = nullptr;
    o.bytes = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    std::swap(data, o.data);
    std::swap(bytes, o.bytes);
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

float load_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// Codes of columns [n0, n0 + cols) of qweight into codes[c * k_dim + k].
void decode_columns(const uint32_t* q, int bits, int64_t n_dim, int64_t k_dim, int64_t n0, int cols,
                    uint8_t* codes) {
  const int64_t w_dim = packed_words(k_dim, bits);
  uint32_t words[8];
  uint32_t chunk[bitstream::kChunk];
  for (int64_t k0 = 0; k0 < k_dim; k0 += bitstream::kChunk) {
    const int64_t w0 = k0 / bitstream::kChunk * bits;
    const int64_t len = std::min<int64_t>(bitstream::kChunk, k_dim - k0);
    for (int c = 0; c < cols; ++c) {
      for (int j = 0; j < bits; ++j) words[j] = w0 + j < w_dim ? q[(w0 + j) * n_dim + n0 + c] : 0u;
      switch (bits) {
        case 2: bitstream::decode_chunk<2>(words, chunk); break;
        case 3: bitstream::decode_chunk<3>(words, chunk); break;
        case 4: bitstream::decode_chunk<4>(words, chunk); break;
        default: bitstream::decode_chunk<8>(words, chunk); break;
      }
      for (int64_t i = 0; i < len; ++i) codes[c * k_dim + k0 + i] = static_cast<uint8_t>(chunk[i]);
    }
  }
}

Status validate_weight(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                       const TensorView& g_idx, int bits, ZeroFormat format) {
  GPTQKIT_RETURN_IF_ERROR(checks::packed_layer(qweight, qzeros, scales, g_idx, bits, format,
                                               {DType::kFloat16, DType::kBFloat16, DType::kFloat32}));
  const int64_t k_dim = g_idx.shape[0];
  const int64_t n_dim = qweight.shape[1];
  if (scales.shape[0] == 0)
    return Status::InvalidArgument("scales: expected at least one group (G = scales.shape[0] = 0)");
  if (n_dim > INT_MAX || k_dim > INT_MAX)
    return Status::InvalidArgument("qweight: extents N = " + std::to_string(n_dim) + ", K = " +
                                   std::to_string(k_dim) + " exceed the supported range (2^31 - 1)");
  return Status::Ok();
}

}  // namespace

struct PreparedWeight::Impl {
  cpu::Layout layout{};
  AlignedBuffer qw;
  AlignedBuffer meta;
  std::vector<int32_t> group_rows;  // [G + 1]
  std::vector<int32_t> perm;        // [rows * cpl]: original column of each position, -1 = padding;
                                    // empty when the layout keeps K's order without padding
  int64_t size_bytes() const {
    return static_cast<int64_t>(qw.bytes + meta.bytes + group_rows.size() * sizeof(int32_t) +
                                perm.size() * sizeof(int32_t) + sizeof(Impl));
  }
};

PreparedWeight::PreparedWeight() = default;
PreparedWeight::~PreparedWeight() = default;
PreparedWeight::PreparedWeight(PreparedWeight&&) noexcept = default;
PreparedWeight& PreparedWeight::operator=(PreparedWeight&&) noexcept = default;
bool PreparedWeight::empty() const { return impl_ == nullptr; }
int64_t PreparedWeight::in_features() const { return impl_ ? impl_->layout.k : 0; }
int64_t PreparedWeight::out_features() const { return impl_ ? impl_->layout.n : 0; }
int PreparedWeight::bits() const { return impl_ ? impl_->layout.bits : 0; }
int64_t PreparedWeight::groups() const { return impl_ ? impl_->layout.groups : 0; }
bool PreparedWeight::reordered() const { return impl_ && !impl_->perm.empty(); }
int64_t PreparedWeight::size_bytes() const { return impl_ ? impl_->size_bytes() : 0; }

Status prepare_cpu_weight(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                          const TensorView& g_idx, int bits, ZeroFormat format, PreparedWeight* out) {
  try {
    if (out == nullptr) return Status::InvalidArgument("out: expected a PreparedWeight to fill, got nullptr");
    GPTQKIT_RETURN_IF_ERROR(validate_weight(qweight, qzeros, scales, g_idx, bits, format));
    const int64_t k_dim = g_idx.shape[0];
    const int64_t n_dim = qweight.shape[1];
    const int64_t g_dim = scales.shape[0];
    const int cpl = codes_per_word(bits);
    const int32_t* gi = static_cast<const int32_t*>(g_idx.data);

    auto impl = std::make_unique<PreparedWeight::Impl>();
    cpu::Layout& L = impl->layout;
    L.bits = bits;
    L.cpl = cpl;
    L.n = n_dim;
    L.k = k_dim;
    L.groups = g_dim;
    L.panels = (n_dim + kPanel - 1) / kPanel;

    // Rows of K in group order (stable, so without act-order the order is
    // kept), each group padded to whole words of cpl codes.
    std::vector<int64_t> count(static_cast<size_t>(g_dim), 0);
    for (int64_t k = 0; k < k_dim; ++k) ++count[gi[k]];
    impl->group_rows.resize(static_cast<size_t>(g_dim + 1));
    int64_t rows = 0;
    for (int64_t g = 0; g < g_dim; ++g) {
      impl->group_rows[g] = static_cast<int32_t>(rows);
      rows += (count[g] + cpl - 1) / cpl;
    }
    impl->group_rows[g_dim] = static_cast<int32_t>(rows);
    L.rows = rows;
    const int64_t positions = rows * cpl;
    std::vector<int32_t> perm(static_cast<size_t>(positions), -1);
    {
      std::vector<int64_t> fill(static_cast<size_t>(g_dim), 0);
      for (int64_t k = 0; k < k_dim; ++k) {
        const int32_t g = gi[k];
        perm[impl->group_rows[g] * cpl + fill[g]++] = static_cast<int32_t>(k);
      }
    }
    bool identity = positions == k_dim;
    for (int64_t p = 0; identity && p < positions; ++p) identity = perm[p] == p;
    if (!identity) impl->perm = std::move(perm);

    // Zero points and scales as floats [G, N].
    std::vector<int32_t> zeros(static_cast<size_t>(g_dim * n_dim));
    GPTQKIT_RETURN_IF_ERROR(unpack_qzeros(qzeros, bits, format, make_view(zeros.data(), DType::kInt32, g_dim, n_dim)));
    std::vector<float> scale_f(static_cast<size_t>(g_dim * n_dim));
    bool half = true;  // store fp16 metadata when every scale is exactly an fp16 value
    for (int64_t i = 0; i < g_dim * n_dim; ++i) {
      scale_f[i] = load_float(scales.data, scales.dtype, i);
      if (half && scales.dtype != DType::kFloat16) {
        const float back = fp16_to_float(float_to_fp16(scale_f[i]));
        half = std::memcmp(&back, &scale_f[i], sizeof back) == 0;
      }
    }
    L.half_meta = half;

    impl->qw = AlignedBuffer(static_cast<size_t>(L.panels * rows * kPanel) * sizeof(uint32_t));
    impl->meta = AlignedBuffer(static_cast<size_t>(L.panels * g_dim * 2 * kPanel) * (half ? 2 : 4));
    uint32_t* qw = static_cast<uint32_t*>(impl->qw.data);
    const uint32_t* q = static_cast<const uint32_t*>(qweight.data);
    const int32_t* pm = impl->perm.empty() ? nullptr : impl->perm.data();

    parallel_for(L.panels, 4, [&](int64_t p0, int64_t p1) {
      std::vector<uint8_t> codes(static_cast<size_t>(kPanel * std::max<int64_t>(k_dim, 1)));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel;
        const int cols = static_cast<int>(std::min<int64_t>(kPanel, n_dim - n0));
        decode_columns(q, bits, n_dim, k_dim, n0, cols, codes.data());
        uint32_t* dst = qw + p * rows * kPanel;
        for (int64_t r = 0; r < rows; ++r)
          for (int c = 0; c < cols; ++c) {
            uint32_t word = 0;
            for (int j = 0; j < cpl; ++j) {
              const int64_t pos = r * cpl + j;
              const int64_t k = pm ? pm[pos] : pos;
              if (k >= 0 && k < k_dim) word |= static_cast<uint32_t>(codes[c * k_dim + k]) << (bits * j);
            }
            dst[r * kPanel + c] = word;
          }
        for (int64_t g = 0; g < g_dim; ++g) {
          const int64_t off = (p * g_dim + g) * 2 * kPanel;
          for (int c = 0; c < cols; ++c) {
            const float s = scale_f[g * n_dim + n0 + c];
            const float z = static_cast<float>(zeros[g * n_dim + n0 + c]);
            if (half) {
              uint16_t* m = static_cast<uint16_t*>(impl->meta.data) + off;
              m[c] = float_to_fp16(s);
              m[kPanel + c] = float_to_fp16(z);  // zeros are at most 256: exact in fp16
            } else {
              float* m = static_cast<float*>(impl->meta.data) + off;
              m[c] = s;
              m[kPanel + c] = z;
            }
          }
        }
      }
    });
    L.qw = qw;
    L.meta = impl->meta.data;
    L.group_rows = impl->group_rows.data();
    out->impl_ = std::move(impl);
    return Status::Ok();
  } catch (const std::bad_alloc&) {
    return Status::Internal("prepare_cpu_weight: out of memory");
  } catch (const std::exception& e) {
    return Status::Internal(std::string("prepare_cpu_weight: ") + e.what());
  } catch (...) {
    return Status::Internal("prepare_cpu_weight: unknown exception");
  }
}

namespace {

Status validate_call(const TensorView& x, const PreparedWeight& w, const TensorView* bias, const TensorView& y) {
  if (w.empty())
    return Status::InvalidArgument("weight: the PreparedWeight is empty; fill it with prepare_cpu_weight first");
  const std::initializer_list<DType> floats = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(x, "x"));
  GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(x, "x", floats));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(x, "x", 2));
  GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(y, "y"));
  GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(y, "y", 2));
  if (y.dtype != x.dtype)
    return Status::InvalidArgument(std::string("y: expected the dtype of x (") + dtype_name(x.dtype) + "), got " +
                                   dtype_name(y.dtype));
  if (bias != nullptr) {
    GPTQKIT_RETURN_IF_ERROR(checks::cpu_contiguous(*bias, "bias"));
    GPTQKIT_RETURN_IF_ERROR(checks::dtype_is(*bias, "bias", floats));
    GPTQKIT_RETURN_IF_ERROR(checks::ndim_is(*bias, "bias", 1));
  }
  const int64_t k_dim = w.in_features(), n_dim = w.out_features(), m_dim = x.shape[0];
  const std::string dims = "K = in_features = " + std::to_string(k_dim) + ", N = out_features = " +
                           std::to_string(n_dim) + " of the prepared weight";
  GPTQKIT_RETURN_IF_ERROR(checks::with_reason(checks::shape_is(x, "x", {-1, k_dim}), "[M, K] with " + dims));
  GPTQKIT_RETURN_IF_ERROR(checks::with_reason(checks::shape_is(y, "y", {m_dim, n_dim}),
                                      "[M, N] with M = x.shape[0] = " + std::to_string(m_dim) + ", " + dims));
  if (bias != nullptr)
    GPTQKIT_RETURN_IF_ERROR(checks::with_reason(checks::shape_is(*bias, "bias", {n_dim}), "[N] with " + dims));
  if (m_dim > INT_MAX)
    return Status::InvalidArgument("x: M = x.shape[0] = " + std::to_string(m_dim) +
                                   " exceeds the supported range (2^31 - 1)");
  if (checks::overlaps(y, x)) return Status::InvalidArgument("y: overlaps the memory of x; pass a separate output array");
  if (bias != nullptr && checks::overlaps(y, *bias))
    return Status::InvalidArgument("y: overlaps the memory of bias; pass a separate output array");
  return Status::Ok();
}

// Row i of x, reordered and padded into layout positions. SCALED: times the
// per-position factor the fused kernels expect (layout.h, PanelJob), and the
// group sums into xsum; else plain (for the BLAS path).
template <typename T, bool SCALED>
void gather_row(const T* x, const cpu::Layout& L, const int32_t* perm, const float* factor, float* dst,
                float* xsum) {
  const int cpl = L.cpl;
  for (int64_t g = 0; g < L.groups; ++g) {
    const int64_t p0 = static_cast<int64_t>(L.group_rows[g]) * cpl, p1 = static_cast<int64_t>(L.group_rows[g + 1]) * cpl;
    double sum = 0.0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k = perm ? perm[p] : p;
      float v = 0.0f;
      if (k >= 0 && k < L.k) {
        if constexpr (sizeof(T) == 4) {
          v = x[k];
        } else {
          v = T::load(x + k);
        }
      }
      if constexpr (SCALED) {
        sum += v;
        dst[p] = v * factor[p % cpl];
      } else {
        dst[p] = v;
      }
    }
    if constexpr (SCALED) xsum[g] = static_cast<float>(sum);
  }
}

struct Half {
  uint16_t bits;
  static float load(const Half* p) { return fp16_to_float(p->bits); }
};
struct BHalf {
  uint16_t bits;
  static float load(const BHalf* p) { return bf16_to_float(p->bits); }
};

template <bool SCALED>
void gather(const TensorView& x, const cpu::Layout& L, const int32_t* perm, float* dst, int64_t ldx, float* xsum,
            int64_t i0, int64_t i1) {
  float factor[16];
  for (int j = 0; j < L.cpl; ++j)
    factor[j] = (32 % L.bits == 0 && j == L.cpl - 1) ? 1.0f : std::ldexp(1.0f, -L.bits * j);
  for (int64_t i = i0; i < i1; ++i) {
    float* d = dst + i * ldx;
    float* s = xsum + i * L.groups;
    switch (x.dtype) {
      case DType::kFloat16:
        gather_row<Half, SCALED>(static_cast<const Half*>(x.data) + i * L.k, L, perm, factor, d, s);
        break;
      case DType::kBFloat16:
        gather_row<BHalf, SCALED>(static_cast<const BHalf*>(x.data) + i * L.k, L, perm, factor, d, s);
        break;
      default:
        gather_row<float, SCALED>(static_cast<const float*>(x.data) + i * L.k, L, perm, factor, d, s);
        break;
    }
  }
}

// y[i][n0 + c] = src[i * lds + c] + bias[n0 + c], c < cols, in y's dtype.
void store_rows(const TensorView& y, int64_t n_dim, int64_t i0, int64_t i1, int64_t n0, int64_t cols,
                const float* src, int64_t lds, const float* bias) {
  for (int64_t i = i0; i < i1; ++i) {
    const float* s = src + (i - i0) * lds;
    const int64_t base = i * n_dim + n0;
    switch (y.dtype) {
      case DType::kFloat16: {
        uint16_t* d = static_cast<uint16_t*>(y.data) + base;
        for (int64_t c = 0; c < cols; ++c) d[c] = float_to_fp16(s[c] + (bias ? bias[n0 + c] : 0.0f));
        break;
      }
      case DType::kBFloat16: {
        uint16_t* d = static_cast<uint16_t*>(y.data) + base;
        for (int64_t c = 0; c < cols; ++c) d[c] = float_to_bf16(s[c] + (bias ? bias[n0 + c] : 0.0f));
        break;
      }
      default: {
        float* d = static_cast<float*>(y.data) + base;
        if (bias) {
          for (int64_t c = 0; c < cols; ++c) d[c] = s[c] + bias[n0 + c];
        } else {
          std::memcpy(d, s, static_cast<size_t>(cols) * sizeof(float));
        }
        break;
      }
    }
  }
}

int workers_for(int64_t work, int64_t tasks) {
  const int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({num_threads(), tasks, by_work})));
}

// Per-thread scratch, kept between calls (a few KiB on the fused path, one
// weight tile of at most kTileBytes plus an output tile on the BLAS path).
float* scratch(std::vector<float>& buf, int64_t floats) {
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(static_cast<size_t>(floats));
  return buf.data();
}
thread_local std::vector<float> t_out_scratch;
thread_local std::vector<float> t_tile_scratch;

void run_fused(const cpu::KernelTable& kt, const cpu::Layout& L, const int32_t* perm, const TensorView& x,
               const float* bias, const TensorView& y) {
  const int64_t m_dim = x.shape[0];
  const int64_t ldx = std::max<int64_t>(L.rows * L.cpl, 1);
  std::vector<float> xs(static_cast<size_t>(m_dim * ldx));
  std::vector<float> xsum(static_cast<size_t>(m_dim * L.groups));
  const int gather_workers = workers_for(m_dim * ldx * 16, m_dim);  // ~16 MACs' worth per element
  pool_for(m_dim, (m_dim + gather_workers - 1) / gather_workers, gather_workers, [&](int64_t i0, int64_t i1) {
    gather<true>(x, L, perm, xs.data(), ldx, xsum.data(), i0, i1);
  });

  // Tasks: panels x row chunks (rows are split only when there are too few
  // panels to keep every thread busy), claimed in batches of about an eighth
  // of a thread's share.
  const int64_t threads = num_threads();
  int64_t row_chunks = 1;
  if (L.panels < threads && m_dim > 4) row_chunks = std::min((threads + L.panels - 1) / L.panels, (m_dim + 3) / 4);
  const int64_t rows_per_chunk = (m_dim + row_chunks - 1) / row_chunks;
  const int64_t tasks = L.panels * row_chunks;
  const int workers = workers_for(m_dim * ldx * L.panels * kPanel, tasks);
  const int64_t batch = std::max<int64_t>(1, tasks / (int64_t{8} * workers));
  pool_for(tasks, batch, workers, [&](int64_t t0, int64_t t1) {
    float* out = scratch(t_out_scratch, rows_per_chunk * kPanel);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = t / row_chunks;
      const int64_t i0 = (t % row_chunks) * rows_per_chunk;
      const int64_t i1 = std::min(m_dim, i0 + rows_per_chunk);
      if (i0 >= i1) continue;
      cpu::PanelJob job{};
      job.w = &L;
      job.panel = panel;
      job.m = i1 - i0;
      job.xs = xs.data() + i0 * ldx;
      job.ldx = ldx;
      job.xsum = xsum.data() + i0 * L.groups;
      job.ldsum = L.groups;
      job.out = out;
      kt.gemm_panel(job);
      const int64_t n0 = panel * kPanel;
      store_rows(y, L.n, i0, i1, n0, std::min<int64_t>(kPanel, L.n - n0), out, kPanel, bias);
    }
  });
}

void run_blas(const cpu::KernelTable& kt, const cpu::Layout& L, const int32_t* perm, const TensorView& x,
              const float* bias, const TensorView& y) {
  const int64_t m_dim = x.shape[0];
  const int64_t kp = L.rows * L.cpl;
  // x reordered and padded like the layout (borrowed when it already is:
  // then kp == K).
  std::vector<float> xp_buf;
  const float* xp = static_cast<const float*>(x.data);
  if (perm != nullptr || x.dtype != DType::kFloat32) {
    xp_buf.resize(static_cast<size_t>(m_dim * kp));
    const int gw = workers_for(m_dim * kp * 16, m_dim);
    pool_for(m_dim, (m_dim + gw - 1) / gw, gw, [&](int64_t i0, int64_t i1) {
      gather<false>(x, L, perm, xp_buf.data(), kp, nullptr, i0, i1);
    });
    xp = xp_buf.data();
  }
  const bool direct = y.dtype == DType::kFloat32;
  const int64_t tile_panels = std::max<int64_t>(1, std::min<int64_t>(16, kTileBytes / (kp * kPanel * 4)));
  const int64_t ld = tile_panels * kPanel;
  blas::ScopedBlasThreads one_blas_thread(1);
  // One batch = one tile: dequantize tile_panels panels, then one single-threaded sgemm.
  pool_for(L.panels, tile_panels, workers_for(m_dim * kp * L.panels * kPanel, L.panels), [&](int64_t pt, int64_t pe) {
    float* tile = scratch(t_tile_scratch, kp * ld + (direct ? 0 : m_dim * ld));
    float* c_buf = tile + kp * ld;
    for (int64_t p = pt; p < pe; ++p) {
      cpu::DequantJob job{};
      job.w = &L;
      job.panel = p;
      job.tile = tile + (p - pt) * kPanel;
      job.ld = ld;
      kt.dequant_panel(job);
    }
    const int64_t n0 = pt * kPanel;
    const int64_t cols = std::min(L.n, pe * kPanel) - n0;
    float* c = direct ? static_cast<float*>(y.data) + n0 : c_buf;
    const int64_t ldc = direct ? L.n : cols;
    float beta = 0.0f;
    if (direct && bias != nullptr) {  // C starts as the bias, then C += W x
      for (int64_t i = 0; i < m_dim; ++i) std::memcpy(c + i * ldc, bias + n0, static_cast<size_t>(cols) * 4);
      beta = 1.0f;
    }
    // Column-major view: C[cols x M] = tile[cols x kp] * xp^T[kp x M].
    blas::sgemm('N', 'N', static_cast<int>(cols), static_cast<int>(m_dim), static_cast<int>(kp), 1.0f, tile,
                static_cast<int>(ld), xp, static_cast<int>(kp), beta, c, static_cast<int>(ldc));
    if (!direct) store_rows(y, L.n, 0, m_dim, n0, cols, c_buf, ldc, bias);
  });
}

}  // namespace

Status cpu_gemm(const TensorView& x, const PreparedWeight& weight, const TensorView* bias, const TensorView& y,
                const CpuGemmOptions& options) {
  try {
    GPTQKIT_RETURN_IF_ERROR(validate_call(x, weight, bias, y));
    const cpu::KernelTable* kt = cpu::kernel_table(options.kernel);
    if (kt == nullptr)
      return Status::Unsupported(std::string("options.kernel: the ") + cpu_kernel_name(options.kernel) +
                                 " kernel " +
                                 (cpu_kernel_built(options.kernel) ? "needs instructions this CPU lacks"
                                                                   : "is not built into this library") +
                                 " (chosen at start-up: " + cpu_kernel_name() + ")");
    const PreparedWeight::Impl& w = *weight.impl_;
    const cpu::Layout& L = w.layout;
    const int64_t m_dim = x.shape[0];
    if (m_dim == 0 || L.n == 0) return Status::Ok();

    std::vector<float> bias_f;
    if (bias != nullptr) {
      bias_f.resize(static_cast<size_t>(L.n));
      for (int64_t n = 0; n < L.n; ++n) bias_f[n] = load_float(bias->data, bias->dtype, n);
    }
    const float* b = bias ? bias_f.data() : nullptr;
    const int32_t* perm = w.perm.empty() ? nullptr : w.perm.data();
    const int64_t blas_min = options.blas_min_rows < 0 ? kDefaultBlasMinRows : options.blas_min_rows;
    if (m_dim >= blas_min && L.rows > 0) {
      run_blas(*kt, L, perm, x, b, y);
    } else {
      run_fused(*kt, L, perm, x, b, y);
    }
    return Status::Ok();
  } catch (const std::bad_alloc&) {
    return Status::Internal("cpu_gemm: out of memory");
  } catch (const std::exception& e) {
    return Status::Internal(std::string("cpu_gemm: ") + e.what());
  } catch (...) {
    return Status::Internal("cpu_gemm: unknown exception");
  }
}

}  // namespace gptqkit
