// CUDA kernels of ditfast::unpatchify, ditfast::patchify and ditfast::unpatchify_cfg: moves
// between the token-major layout (B, G*G, p*p*C) and the image layout (B, C, G*p, G*p).
//
// A "unit" is a run of up to `gt` tokens of one patch-grid row of one sample: contiguous in the
// token layout (gt*P values, P = p*p*C) and C*p row segments of gt*p values in the image layout.
// A block stages a few units in shared memory in token order, then copies them out in the
// other layout, so both global sides are accessed contiguously, 16 bytes per access where the
// layout allows (VT: token side, VI: image side; decided per launch).
#include "common.cuh"

namespace ditfast {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr size_t kUnitSmemMax = 32 * 1024;   // one unit's staged values, at most
constexpr size_t kBlockSmemTarget = 16 * 1024;
constexpr int kMaxUnitsPerBlock = 8;

enum class Mode { kUnpatchify, kPatchify, kCfg };

struct Layout {
  int64_t samples;   // samples written (kUnpatchify/kPatchify: B; kCfg: half)
  int64_t units;     // samples * G * tiles
  int C, p, G, P;    // channels, patch, grid side, values per token
  int gt, tiles;     // tokens per unit, units per grid row
  int upb;           // units per block
  int guided;        // kCfg: channels [0, guided) are guided
  double scale;      // kCfg: guidance scale
  bool full_batch;   // kCfg: also write the unconditional half
};

// Where unit u lies: its sample b, the offset of its first value in the token layout, the offset
// of its first row segment inside one image plane, and how many tokens it has.
struct Unit {
  int64_t b, tok, pix;
  int ntok;
};

__device__ __forceinline__ Unit locate(const Layout& L, int64_t u) {
  const int64_t per_sample = static_cast<int64_t>(L.G) * L.tiles;
  Unit r;
  r.b = u / per_sample;
  const int rem = static_cast<int>(u - r.b * per_sample);
  const int gh = rem / L.tiles;
  const int gw0 = (rem - gh * L.tiles) * L.gt;
  r.ntok = min(L.gt, L.G - gw0);
  const int64_t T = static_cast<int64_t>(L.G) * L.G;
  const int64_t side = static_cast<int64_t>(L.G) * L.p;
  r.tok = (r.b * T + static_cast<int64_t>(gh) * L.G + gw0) * L.P;
  r.pix = static_cast<int64_t>(gh) * L.p * side + static_cast<int64_t>(gw0) * L.p;
  return r;
}

// Value offset in a staged unit of image element (row = c*p + i, position w in the row segment).
__device__ __forceinline__ int staged_index(const Layout& L, int row, int w) {
  const int c = row / L.p, i = row - c * L.p;
  const int gw = w / L.p, j = w - gw * L.p;
  return gw * L.P + (i * L.p + j) * L.C + c;
}

// Copies N contiguous values: one or more 16-byte accesses, or a single value when N == 1.
template <typename T, int N>
__device__ __forceinline__ void copy_run(T* __restrict__ dst, const T* __restrict__ src) {
  if constexpr (N == 1) {
    dst[0] = src[0];
  } else {
    alignas(16) T v[N];
    load_vec(src, v);
    store_vec(dst, v);
  }
}

template <typename T, Mode M, bool VT, bool VI>
__global__ void __launch_bounds__(kThreads)
permute_kernel(const T* __restrict__ src,  // kPatchify: image (B, C, Gp, Gp); else tokens (B or 2*half, G*G, P)
               T* __restrict__ dst,        // kPatchify: tokens; else image (samples or 2*samples, C, Gp, Gp)
               Layout L) {
  using A = acc_t<T>;
  constexpr int kIn = M == Mode::kCfg ? 2 : 1;  // staged copies per unit: cond and uncond
  constexpr int kVT = VT ? kVec16<T> : 1;
  constexpr int kVI = VI ? kVec16<T> : 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage = reinterpret_cast<T*>(smem_raw);  // [upb][kIn][gt*P]
  const int unit_len = L.gt * L.P;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * L.upb;
  const int nunits = static_cast<int>(min(static_cast<int64_t>(L.upb), L.units - first));
  const int64_t side = static_cast<int64_t>(L.G) * L.p;
  const int64_t plane = side * side;
  const int rows = L.C * L.p;
  const int row_vecs = (L.gt * L.p) / kVI;  // per full unit; VI implies gt*p % kVI == 0

  if constexpr (M != Mode::kPatchify) {
    // Load: contiguous token runs -> stage.
    const int vecs = unit_len / kVT;  // VT implies P % kVT == 0
    const int64_t sample_stride = L.samples * L.G * L.G * L.P;  // kCfg: cond -> uncond
    for (int it = threadIdx.x; it < nunits * kIn * vecs; it += blockDim.x) {
      const int uh = it / vecs, q = it - uh * vecs;
      const int uu = uh / kIn, h = uh - uu * kIn;
      const Unit U = locate(L, first + uu);
      if (q * kVT >= U.ntok * L.P) continue;
      copy_run<T, kVT>(stage + (uu * kIn + h) * unit_len + q * kVT, src + U.tok + h * sample_stride + q * kVT);
    }
    __syncthreads();
    // Store: stage -> image row segments (kCfg: guided channels combined; both halves if full_batch).
    const int nout = (M == Mode::kCfg && L.full_batch) ? 2 : 1;
    for (int it = threadIdx.x; it < nunits * nout * rows * row_vecs; it += blockDim.x) {
      int r = it;
      const int q = r % row_vecs;
      r /= row_vecs;
      const int row = r % rows;
      r /= rows;
      const int o = r % nout;
      const int uu = r / nout;
      const Unit U = locate(L, first + uu);
      const int w0 = q * kVI;
      if (w0 >= U.ntok * L.p) continue;
      const int c = row / L.p;
      const T* cond = stage + uu * kIn * unit_len;
      alignas(16) T v[kVI];
#pragma unroll
      for (int e = 0; e < kVI; ++e) {
        const int k = staged_index(L, row, w0 + e);
        if constexpr (M == Mode::kCfg) {
          const T* uncond = cond + unit_len;
          if (c < L.guided) {
            const A kc = to_acc(cond[k]), ku = to_acc(uncond[k]);
            v[e] = from_acc<T>(ku + static_cast<A>(L.scale) * (kc - ku));
          } else {
            v[e] = o == 0 ? cond[k] : uncond[k];
          }
        } else {
          v[e] = cond[k];
        }
      }
      const int row_i = row - c * L.p;
      T* d = dst + ((U.b + o * L.samples) * L.C + c) * plane + U.pix + row_i * side + w0;
      if constexpr (VI) {
        store_vec(d, v);
      } else {
        d[0] = v[0];
      }
    }
  } else {
    // Load: image row segments -> stage (token order).
    for (int it = threadIdx.x; it < nunits * rows * row_vecs; it += blockDim.x) {
      const int q = it % row_vecs;
      const int r = it / row_vecs;
      const int row = r % rows;
      const int uu = r / rows;
      const Unit U = locate(L, first + uu);
      const int w0 = q * kVI;
      if (w0 >= U.ntok * L.p) continue;
      const int c = row / L.p, row_i = row - c * L.p;
      const T* s = src + (U.b * L.C + c) * plane + U.pix + row_i * side + w0;
      alignas(16) T v[kVI];
      if constexpr (VI) {
        load_vec(s, v);
      } else {
        v[0] = s[0];
      }
      T* d = stage + uu * unit_len;
#pragma unroll
      for (int e = 0; e < kVI; ++e) d[staged_index(L, row, w0 + e)] = v[e];
    }
    __syncthreads();
    // Store: stage -> contiguous token runs.
    const int vecs = unit_len / kVT;
    for (int it = threadIdx.x; it < nunits * vecs; it += blockDim.x) {
      const int uu = it / vecs, q = it - uu * vecs;
      const Unit U = locate(L, first + uu);
      if (q * kVT >= U.ntok * L.P) continue;
      copy_run<T, kVT>(dst + U.tok + q * kVT, stage + uu * unit_len + q * kVT);
    }
  }
}

template <typename T, Mode M>
cudaError_t launch(const void* src, void* dst, int64_t samples, int64_t C, int64_t p, int64_t G, int64_t guided,
                   double scale, bool full_batch, cudaStream_t stream) {
  if (C <= 0 || p <= 0 || G <= 0) return cudaErrorInvalidValue;
  if (samples == 0) return cudaSuccess;
  constexpr int kIn = M == Mode::kCfg ? 2 : 1;
  constexpr int kV = kVec16<T>;
  const int64_t P = p * p * C;
  const int64_t side = G * p;
  if (P * kIn * static_cast<int64_t>(sizeof(T)) > static_cast<int64_t>(kUnitSmemMax) || side > (1 << 20))
    return cudaErrorInvalidValue;
  // Tokens per unit: a row segment of up to 256 values, fewer if the staged unit would not fit.
  int64_t gt = side <= 256 ? G : std::max<int64_t>(1, 256 / p);
  while (gt > 1 && gt * P * kIn * static_cast<int64_t>(sizeof(T)) > static_cast<int64_t>(kUnitSmemMax)) gt /= 2;
  const int64_t tiles = ceil_div(G, gt);
  const int64_t units = samples * G * tiles;
  const size_t unit_bytes = static_cast<size_t>(gt * P * kIn) * sizeof(T);
  int64_t upb = std::clamp<int64_t>(static_cast<int64_t>(kBlockSmemTarget / unit_bytes), 1, kMaxUnitsPerBlock);
  const int64_t target_blocks = 2 * static_cast<int64_t>(sm_count());
  while (upb > 1 && ceil_div(units, upb) < target_blocks) upb /= 2;
  const int64_t blocks = ceil_div(units, upb);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;

  Layout L;
  L.samples = samples;
  L.units = units;
  L.C = static_cast<int>(C);
  L.p = static_cast<int>(p);
  L.G = static_cast<int>(G);
  L.P = static_cast<int>(P);
  L.gt = static_cast<int>(gt);
  L.tiles = static_cast<int>(tiles);
  L.upb = static_cast<int>(upb);
  L.guided = static_cast<int>(guided);
  L.scale = scale;
  L.full_batch = full_batch;
  const void* tok_ptr = M == Mode::kPatchify ? dst : src;
  const void* img_ptr = M == Mode::kPatchify ? src : dst;
  const bool vt = P % kV == 0 && aligned16(tok_ptr);
  const bool vi = side % kV == 0 && (gt * p) % kV == 0 && aligned16(img_ptr);
  const size_t smem = static_cast<size_t>(upb) * unit_bytes;
  const T* s = static_cast<const T*>(src);
  T* d = static_cast<T*>(dst);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (vt && vi) {
    permute_kernel<T, M, true, true><<<grid, kThreads, smem, stream>>>(s, d, L);
  } else if (vt) {
    permute_kernel<T, M, true, false><<<grid, kThreads, smem, stream>>>(s, d, L);
  } else if (vi) {
    permute_kernel<T, M, false, true><<<grid, kThreads, smem, stream>>>(s, d, L);
  } else {
    permute_kernel<T, M, false, false><<<grid, kThreads, smem, stream>>>(s, d, L);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t unpatchify(DType dtype, const void* tokens, void* image, int64_t B, int64_t C, int64_t p, int64_t G,
                       cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    return launch<decltype(tag), Mode::kUnpatchify>(tokens, image, B, C, p, G, 0, 0.0, false, stream);
  });
}

cudaError_t patchify(DType dtype, const void* image, void* tokens, int64_t B, int64_t C, int64_t p, int64_t G,
                     cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    return launch<decltype(tag), Mode::kPatchify>(image, tokens, B, C, p, G, 0, 0.0, false, stream);
  });
}

cudaError_t unpatchify_cfg(DType dtype, const void* tokens, void* image, int64_t half, int64_t C, int64_t p,
                           int64_t G, int64_t guided, double scale, bool full_batch, cudaStream_t stream) {
  if (guided < 0 || guided > C) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    return launch<decltype(tag), Mode::kCfg>(tokens, image, half, C, p, G, guided, scale, full_batch, stream);
  });
}

}  // namespace cuda
}  // namespace ditfast
