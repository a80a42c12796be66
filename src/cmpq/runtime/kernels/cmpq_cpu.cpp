// cmpq's CPU kernels: a packed look-up-table linear times a few tokens
// (decode), and de-quantization of a stripe of rows (prefill, before a BLAS
// matmul). docs/runtime.md describes the layout and the loops.
//
// Built by the set-up command with the system's g++, without -march: the
// AVX2 + FMA + F16C functions carry their own target attribute and are chosen
// at run time (cmpq_isa); everything else is portable C++17. With -fopenmp
// where the compiler has it (threads shared with torch), else a small pool.
//
// Layout read here (format version 4, docs/format.md): the columns of a
// linear are permuted into bit-groups; group g (width b, n columns) holds its
// codes in row tiles of 8 rows: tile after tile, column after column, the 8
// codes of one tile and one column in b bytes, least significant bit first.
// Column layout only: group g has one fp16 table of 2^b entries per column.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CMPQ_X86 1
#endif

// the stored tensors of one linear (cmpq/runtime/cpu_kernel.py fills it)
struct Layer {
  int64_t out_features;
  int64_t in_features;
  int64_t groups;
  const uint8_t* group_bits;       // [groups]
  const int32_t* group_sizes;      // [groups]
  const uint8_t* codes;            // tiled codes, group after group
  int64_t codes_bytes;             // their length (the kernel never reads past it)
  const uint16_t* lut;             // fp16 bits: per group [n_g, 2^b]
  const void* perm;                // [in] int16 or int32: stored column -> original column
  int64_t perm_bytes;              // 2 or 4
  const int32_t* outlier_crow;     // [out + 1], or null
  const void* outlier_cols;        // [n] int16 or int32 (original columns)
  int64_t outlier_col_bytes;       // 2 or 4
  const uint16_t* outlier_values;  // [n] fp16 bits: the weight there
  const uint16_t* outlier_base;    // [n] fp16 bits: what the codes give there
};

namespace {

constexpr int kTileRows = 8;
constexpr int64_t kTableFloats = 65536;  // a column block's tables: 256 KB, in L2



inline int64_t index_at(const void* base, int64_t bytes, int64_t i) {
  return bytes == 2 ? static_cast<const int16_t*>(base)[i] : static_cast<const int32_t*>(base)[i];
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// ---- threads: torch's count, passed in per call ----

class Pool {
 public:
  void run(int threads, const std::function<void(int, int)>& job) {
    if (threads <= 1) {
      job(0, 1);
      return;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < threads - 1) {
      const int index = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, index] { work(index); });
    }
    job_ = &job;
    threads_ = threads;
    pending_.store(threads - 1);
    generation_.fetch_add(1);
    lock.unlock();
    wake_.notify_all();
    job(0, threads);
    for (int spin = 0; pending_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin > 20000) {
        std::unique_lock<std::mutex> wait_lock(mutex_);
        done_.wait(wait_lock, [this] { return pending_.load() == 0; });
        break;
      }
#if CMPQ_X86
      _mm_pause();
#endif
    }
  }

 private:
  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; generation_.load(std::memory_order_acquire) == seen; ++spin) {
        if (spin > 20000) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          break;
        }
#if CMPQ_X86
        _mm_pause();
#endif
      }
      std::unique_lock<std::mutex> lock(mutex_);
      seen = generation_.load();
      const std::function<void(int, int)>* job = job_;
      const int threads = threads_;
      lock.unlock();
      if (index >= threads) continue;
      (*job)(index, threads);
      if (pending_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> guard(mutex_);
        done_.notify_all();
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int, int)>* job_ = nullptr;
  int threads_ = 1;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: workers live as long as the process
  return *instance;
}

// Runs job(part, parts) on `threads` threads. Built with OpenMP, on the process's OpenMP
// runtime: loaded after torch, this library binds to the libgomp.so.1 torch already loaded,
// so its threads are torch's (one runtime, no threads competing for the cores). Without
// OpenMP, on the pool above.
void parallel(int threads, const std::function<void(int, int)>& job) {
#ifdef _OPENMP
  if (threads <= 1) {
    job(0, 1);
    return;
  }
#pragma omp parallel num_threads(threads)
  job(omp_get_thread_num(), omp_get_num_threads());
#else
  pool().run(threads, job);
#endif
}

void split(int64_t count, int part, int parts, int64_t* first, int64_t* stop) {
  *first = count * part / parts;
  *stop = count * (part + 1) / parts;
}

int64_t tile_count(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

// where each group's codes, tables and stored columns start
struct GroupOffsets {
  std::vector<int64_t> codes, lut, column;
};

GroupOffsets offsets_of(const Layer& layer) {
  GroupOffsets o;
  int64_t codes = 0, lut = 0, column = 0;
  const int64_t tiles = tile_count(layer.out_features);
  for (int64_t g = 0; g < layer.groups; ++g) {
    o.codes.push_back(codes);
    o.lut.push_back(lut);
    o.column.push_back(column);
    const int64_t bits = layer.group_bits[g], size = layer.group_sizes[g];
    codes += tiles * size * bits;
    lut += size << bits;
    column += size;
  }
  return o;
}

// the B bytes holding a tile's 8 codes of one column, as an integer (in registers: a
// memcpy into a wider variable would go through memory and stall the vector load after it)
template <int B>
inline uint64_t load_code_bytes(const uint8_t* p) {
  uint64_t word = 0;
#pragma GCC unroll 8
  for (int i = 0; i < B; ++i) word |= static_cast<uint64_t>(p[i]) << (8 * i);
  return word;
}

inline uint64_t load_code_bytes(const uint8_t* p, int bits) {
  uint64_t word = 0;
  for (int i = 0; i < bits; ++i) word |= static_cast<uint64_t>(p[i]) << (8 * i);
  return word;
}

// tables of one column block: table[t][j][k] = x[t][perm[column + j]] * lut[j][k % 2^bits],
// `stride` entries each: a table narrower than 8 repeats itself, so an index whose bits above
// the code's are not cleared still finds the right entry
void build_tables(const Layer& layer, const float* x, int64_t tokens, int bits, int64_t column,
                  const uint16_t* lut, int64_t count, int64_t stride, float* table) {
  const int64_t entries = int64_t{1} << bits;
  for (int64_t j = 0; j < count; ++j) {
    float values[256];
    for (int64_t k = 0; k < entries; ++k) values[k] = half_to_float(lut[j * entries + k]);
    const int64_t original = index_at(layer.perm, layer.perm_bytes, column + j);
    for (int64_t t = 0; t < tokens; ++t) {
      const float scale = x[t * layer.in_features + original];
      float* row = table + (t * count + j) * stride;
      for (int64_t k = 0; k < stride; ++k) row[k] = scale * values[k % entries];
    }
  }
}

void add_outliers(const Layer& layer, const float* x, int64_t tokens, int64_t row_first,
                  int64_t row_stop, float* y, int64_t y_stride) {
  if (layer.outlier_crow == nullptr) return;
  for (int64_t r = row_first; r < row_stop; ++r) {
    for (int64_t e = layer.outlier_crow[r]; e < layer.outlier_crow[r + 1]; ++e) {
      const int64_t c = index_at(layer.outlier_cols, layer.outlier_col_bytes, e);
      const float delta =
          half_to_float(layer.outlier_values[e]) - half_to_float(layer.outlier_base[e]);
      for (int64_t t = 0; t < tokens; ++t) y[t * y_stride + r] += x[t * layer.in_features + c] * delta;
    }
  }
}

// ---- portable decode ----

void decode_portable(const Layer& layer, const GroupOffsets& o, const float* x, int64_t tokens,
                     float* y, int64_t tile_first, int64_t tile_stop, std::vector<float>& table) {
  const int64_t y_stride = tile_count(layer.out_features) * kTileRows;
  for (int64_t g = 0; g < layer.groups; ++g) {
    const int bits = layer.group_bits[g];
    const int64_t size = layer.group_sizes[g], stride = int64_t{1} << bits;
    const int64_t block = std::max<int64_t>(1, kTableFloats / (tokens * stride));
    const uint64_t mask = (uint64_t{1} << bits) - 1;
    for (int64_t j0 = 0; j0 < size; j0 += block) {
      const int64_t count = std::min(block, size - j0);
      table.resize(tokens * count * stride);
      build_tables(layer, x, tokens, bits, o.column[g] + j0, layer.lut + o.lut[g] + j0 * stride,
                   count, stride, table.data());
      for (int64_t tile = tile_first; tile < tile_stop; ++tile) {
        const uint8_t* codes = layer.codes + o.codes[g] + (tile * size + j0) * bits;
        float acc[8][kTileRows] = {};
        for (int64_t j = 0; j < count; ++j) {
          const uint64_t word = load_code_bytes(codes + j * bits, bits);
          for (int64_t t = 0; t < tokens; ++t) {
            const float* row = table.data() + (t * count + j) * stride;
            for (int l = 0; l < kTileRows; ++l) acc[t][l] += row[(word >> (l * bits)) & mask];
          }
        }
        for (int64_t t = 0; t < tokens; ++t)
          for (int l = 0; l < kTileRows; ++l) y[t * y_stride + tile * kTileRows + l] += acc[t][l];
      }
    }
  }
}

// ---- AVX2 decode ----

#if CMPQ_X86
// The 8 codes of one tile and one column, one per lane. `Wide`: the bytes after them may be
// read too (one 4- or 8-byte load); otherwise exactly B bytes are read (the stream's end).
template <int B, bool Wide>
__attribute__((target("avx2,fma,f16c"))) inline __m256i code_lanes(const uint8_t* p) {
  uint64_t word;
  if constexpr (Wide && B <= 4) {
    uint32_t low;
    std::memcpy(&low, p, sizeof low);
    word = low;
  } else if constexpr (Wide) {
    std::memcpy(&word, p, sizeof word);
  } else {
    word = load_code_bytes<B>(p);
  }
  // up to 5 bits the lanes keep the bits above their code: the permutes read the low 3 bits
  // of an index and the blends bit 3 or 4 (shifted to the sign), so nothing else matters
  if constexpr (B <= 4) {
    const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  } else {
    const int low = static_cast<int>(word & 0xffffffffu);
    const int high = static_cast<int>(word >> (4 * B));
    const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 0, B, 2 * B, 3 * B);
    const __m256i halves = _mm256_setr_epi32(low, low, low, low, high, high, high, high);
    const __m256i lanes = _mm256_srlv_epi32(halves, shifts);
    if constexpr (B == 5) return lanes;
    return _mm256_and_si256(lanes, _mm256_set1_epi32((1 << B) - 1));  // gather indices
  }
}

// Each lane's entry of one column's table (`row`, 2^B entries padded to at least 8).
template <int B>
__attribute__((target("avx2,fma,f16c"))) inline __m256 look_up(const float* row, __m256i lanes) {
  if constexpr (B <= 3) {
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(row), lanes);
  } else if constexpr (B <= 5) {  // 8 entries per permute; the code's upper bits choose
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 28));
    const __m256 low = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(row), lanes),
                                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(row + 8), lanes),
                                        bit3);
    if constexpr (B == 4) {
      return low;
    } else {
      const __m256 high =
          _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(row + 16), lanes),
                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(row + 24), lanes), bit3);
      return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 27)));
    }
  } else {
    return _mm256_i32gather_ps(row, lanes, 4);
  }
}

// acc[t] += one tile's 8 row sums over `count` columns, for T tokens
template <int B, int T, bool Wide>
__attribute__((target("avx2,fma,f16c"))) inline void tile_sums(const uint8_t* p, int64_t count,
                                                               const float* table,
                                                               int64_t stride, __m256* sums) {
  constexpr int kUnroll = T == 1 ? 4 : (T <= 3 ? 2 : 1);
  __m256 acc[kUnroll][T];
#pragma GCC unroll 8
  for (int u = 0; u < kUnroll; ++u)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kUnroll <= count; j += kUnroll) {
    if constexpr (Wide) __builtin_prefetch(p + (j + 256) * B);
#pragma GCC unroll 8
    for (int u = 0; u < kUnroll; ++u) {
      const __m256i lanes = code_lanes<B, Wide>(p + (j + u) * B);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t)
        acc[u][t] =
            _mm256_add_ps(acc[u][t], look_up<B>(table + (t * count + j + u) * stride, lanes));
    }
  }
  for (; j < count; ++j) {
    const __m256i lanes = code_lanes<B, false>(p + j * B);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
      acc[0][t] = _mm256_add_ps(acc[0][t], look_up<B>(table + (t * count + j) * stride, lanes));
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    __m256 sum = acc[0][t];
#pragma GCC unroll 8
    for (int u = 1; u < kUnroll; ++u) sum = _mm256_add_ps(sum, acc[u][t]);
    sums[t] = sum;
  }
}

template <int B, int T>
__attribute__((target("avx2,fma,f16c"))) void decode_block_avx2(
    const uint8_t* codes, const uint8_t* codes_end, int64_t size, int64_t count,
    const float* table, int64_t stride, int64_t tile_first, int64_t tile_stop, float* y,
    int64_t y_stride) {
  for (int64_t tile = tile_first; tile < tile_stop; ++tile) {
    const uint8_t* p = codes + tile * size * B;
    __m256 sums[T];
    if (p + count * B + 8 <= codes_end) {
      tile_sums<B, T, true>(p, count, table, stride, sums);
    } else {
      tile_sums<B, T, false>(p, count, table, stride, sums);
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      float* out = y + t * y_stride + tile * kTileRows;
      _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), sums[t]));
    }
  }
}

using BlockFn = void (*)(const uint8_t*, const uint8_t*, int64_t, int64_t, const float*,
                         int64_t, int64_t, int64_t, float*, int64_t);

template <int B>
BlockFn block_for_tokens(int64_t tokens) {
  switch (tokens) {
    case 1: return decode_block_avx2<B, 1>;
    case 2: return decode_block_avx2<B, 2>;
    case 3: return decode_block_avx2<B, 3>;
    case 4: return decode_block_avx2<B, 4>;
    case 5: return decode_block_avx2<B, 5>;
    case 6: return decode_block_avx2<B, 6>;
    case 7: return decode_block_avx2<B, 7>;
    default: return decode_block_avx2<B, 8>;
  }
}

BlockFn block_function(int bits, int64_t tokens) {
  switch (bits) {
    case 1: return block_for_tokens<1>(tokens);
    case 2: return block_for_tokens<2>(tokens);
    case 3: return block_for_tokens<3>(tokens);
    case 4: return block_for_tokens<4>(tokens);
    case 5: return block_for_tokens<5>(tokens);
    case 6: return block_for_tokens<6>(tokens);
    case 7: return block_for_tokens<7>(tokens);
    default: return block_for_tokens<8>(tokens);
  }
}

void decode_avx2(const Layer& layer, const GroupOffsets& o, const float* x, int64_t tokens,
                 float* y, int64_t tile_first, int64_t tile_stop, std::vector<float>& table) {
  const int64_t y_stride = tile_count(layer.out_features) * kTileRows;
  for (int64_t g = 0; g < layer.groups; ++g) {
    const int bits = layer.group_bits[g];
    const int64_t size = layer.group_sizes[g];
    const int64_t stride = std::max<int64_t>(8, int64_t{1} << bits);
    const int64_t block = std::max<int64_t>(4, kTableFloats / (tokens * stride));
    const BlockFn fn = block_function(bits, tokens);
    const uint8_t* codes_end = layer.codes + layer.codes_bytes;
    for (int64_t j0 = 0; j0 < size; j0 += block) {
      const int64_t count = std::min(block, size - j0);
      table.resize(tokens * count * stride);
      build_tables(layer, x, tokens, bits, o.column[g] + j0,
                   layer.lut + o.lut[g] + (j0 << bits), count, stride, table.data());
      fn(layer.codes + o.codes[g] + j0 * bits, codes_end, size, count, table.data(), stride,
         tile_first, tile_stop, y, y_stride);
    }
  }
}
#endif

bool has_avx2() {
#if CMPQ_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

}  // namespace

extern "C" {

// 2: AVX2 + FMA + F16C, 0: portable
int cmpq_isa(void) { return has_avx2() ? 2 : 0; }

// 1 when built with OpenMP (threads shared with torch), 0 with the kernel's own pool
int cmpq_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// y[t, r] (r < 8 * ceil(out / 8); zero-filled by the caller) += the layer times x[t, :],
// for up to 8 tokens at a time
int cmpq_decode(const Layer* layer, const float* x, int64_t tokens, float* y, int threads,
                int isa) {
  if (tokens < 1 || tokens > 8) return 1;
  const GroupOffsets o = offsets_of(*layer);
  const int64_t tiles = tile_count(layer->out_features);
  const int64_t y_stride = tiles * kTileRows;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
  parallel(threads, [&](int part, int parts) {
    int64_t first, stop;
    split(tiles, part, parts, &first, &stop);
    thread_local std::vector<float> table;
#if CMPQ_X86
    if (isa == 2) {
      decode_avx2(*layer, o, x, tokens, y, first, stop, table);
    } else {
      decode_portable(*layer, o, x, tokens, y, first, stop, table);
    }
#else
    decode_portable(*layer, o, x, tokens, y, first, stop, table);
#endif
    add_outliers(*layer, x, tokens, first * kTileRows,
                 std::min(stop * kTileRows, layer->out_features), y, y_stride);
  });
  return 0;
}

// w[r - row_first, c] = the weight at row r, original column c (outliers included), for rows
// [row_first, row_stop); row_first a multiple of 8
int cmpq_dequantize(const Layer* layer, int64_t row_first, int64_t row_stop, float* w,
                    int threads) {
  if (row_first % kTileRows != 0 || row_stop > layer->out_features || row_first > row_stop)
    return 1;
  const GroupOffsets o = offsets_of(*layer);
  const int64_t in = layer->in_features;
  const int64_t tile_first = row_first / kTileRows, tile_stop = tile_count(row_stop);
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tile_stop - tile_first)));
  parallel(threads, [&](int part, int parts) {
    int64_t first, stop;
    split(tile_stop - tile_first, part, parts, &first, &stop);
    first += tile_first;
    stop += tile_first;
    thread_local std::vector<float> values;
    for (int64_t g = 0; g < layer->groups; ++g) {
      const int bits = layer->group_bits[g];
      const int64_t size = layer->group_sizes[g], entries = int64_t{1} << bits;
      const uint64_t mask = entries - 1;
      const uint16_t* lut = layer->lut + o.lut[g];
      values.resize(size * entries);
      for (int64_t k = 0; k < size * entries; ++k) values[k] = half_to_float(lut[k]);
      for (int64_t tile = first; tile < stop; ++tile) {
        const uint8_t* codes = layer->codes + o.codes[g] + tile * size * bits;
        const int64_t rows = std::min<int64_t>(kTileRows, row_stop - tile * kTileRows);
        float* out = w + (tile * kTileRows - row_first) * in;
        for (int64_t j = 0; j < size; ++j) {
          const uint64_t word = load_code_bytes(codes + j * bits, bits);
          const int64_t column = index_at(layer->perm, layer->perm_bytes, o.column[g] + j);
          const float* table = values.data() + j * entries;
          for (int64_t l = 0; l < rows; ++l)
            out[l * in + column] = table[(word >> (l * bits)) & mask];
        }
      }
    }
    if (layer->outlier_crow != nullptr) {
      const int64_t rows_stop = std::min(stop * kTileRows, row_stop);
      for (int64_t r = first * kTileRows; r < rows_stop; ++r)
        for (int64_t e = layer->outlier_crow[r]; e < layer->outlier_crow[r + 1]; ++e)
          w[(r - row_first) * in + index_at(layer->outlier_cols, layer->outlier_col_bytes, e)] =
              half_to_float(layer->outlier_values[e]);
    }
  });
  return 0;
}

}  // extern "C"
