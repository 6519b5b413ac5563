// CUDA kernel of ditfast::patch_embed: space-to-depth, the (C*p*p -> D) projection, bias and
// position embedding in one pass; the (B*T, D) output is written once with 16-byte stores.
//
// A block owns a tile of `tile` consecutive tokens (over the flattened B*T) and a range of
// 8-channel output groups. It stages the tile's patches in shared memory as fp32 [Kpad][tile]
// (Kpad = K rounded up to 8, zero-padded), then each thread computes items of 4 tokens x 8
// output channels: per chunk of 8 reduction steps it holds the 8x8 weight slab in registers
// (16-byte loads of weight rows, which stay in L1) and reads the 4 tokens' patch values as one
// shared-memory vector, so every loaded value feeds 4 or 8 FMAs.
#include "common.cuh"

namespace ditfast {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTok = 4;    // tokens per thread item
constexpr int kOut = 8;    // output channels per thread item
constexpr int kChunk = 8;  // reduction steps per weight slab held in registers
constexpr int kMaxTile = 32;
constexpr size_t kSmemLimit = 48 * 1024;

struct Geometry {
  int64_t n_tokens;        // B*T
  int64_t sb, sc, sh, sw;  // x strides, elements
  int64_t tokens;          // T, tokens per image
  int grid_w;              // W / p
  int p, K, Kpad, D;
  int groups_per_split;    // 8-channel groups handled by one blockIdx.y
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
patch_embed_kernel(const T* __restrict__ x,       // (B, C, H, W), strides in g
                   const T* __restrict__ weight,  // (D, K) contiguous, K = C*p*p in (c, kh, kw) order
                   const T* __restrict__ bias,    // (D,) or null
                   const T* __restrict__ pos,     // (T, D) or null
                   T* __restrict__ out,           // (B*T, D)
                   Geometry g, int tile, bool vec_w, bool vec_out) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* patch = reinterpret_cast<A*>(smem_raw);  // [Kpad][tile]
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int p = g.p;

  // Stage: index i -> (c, kh, token, kw) with kw fastest, so neighbouring threads read
  // neighbouring pixels of one image row.
  for (int i = threadIdx.x; i < g.K * tile; i += blockDim.x) {
    const int kw = i % p;
    int r = i / p;
    const int tt = r % tile;
    r /= tile;  // c*p + kh
    const int kh = r % p;
    const int c = r / p;
    const int64_t n = n0 + tt;
    A v = A(0);
    if (n < g.n_tokens) {
      const int64_t b = n / g.tokens;
      const int t = static_cast<int>(n - b * g.tokens);
      const int gh = t / g.grid_w;
      const int gw = t - gh * g.grid_w;
      v = to_acc(x[b * g.sb + c * g.sc + static_cast<int64_t>(gh * p + kh) * g.sh +
                   static_cast<int64_t>(gw * p + kw) * g.sw]);
    }
    patch[(r * p + kw) * tile + tt] = v;
  }
  for (int i = g.K * tile + threadIdx.x; i < g.Kpad * tile; i += blockDim.x) patch[i] = A(0);
  __syncthreads();

  const int groups = (g.D + kOut - 1) / kOut;
  const int g_begin = blockIdx.y * g.groups_per_split;
  const int g_count = min(groups, g_begin + g.groups_per_split) - g_begin;
  const int items = (tile / kTok) * g_count;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int tg = it / g_count;
    const int d0 = (g_begin + it - tg * g_count) * kOut;
    const int tt0 = tg * kTok;
    if (n0 + tt0 >= g.n_tokens) continue;

    A acc[kTok][kOut];
#pragma unroll
    for (int j = 0; j < kTok; ++j)
#pragma unroll
      for (int v = 0; v < kOut; ++v) acc[j][v] = A(0);

    for (int k0 = 0; k0 < g.Kpad; k0 += kChunk) {
      // The 8x8 weight slab, kept in T (half the registers for 16-bit types), widened per step.
      alignas(16) T w[kOut][kChunk];
#pragma unroll
      for (int v = 0; v < kOut; ++v) {
        const int d = d0 + v;
        const T* row = weight + static_cast<int64_t>(d) * g.K;
        if (vec_w && d < g.D) {  // K % 8 == 0 and rows 16-byte aligned: no reduction padding
          load_vec(row + k0, w[v]);
        } else {
#pragma unroll
          for (int kk = 0; kk < kChunk; ++kk) {
            const int k = k0 + kk;
            w[v][kk] = (d < g.D && k < g.K) ? row[k] : from_acc<T>(A(0));
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) {
        const A* src = patch + (k0 + kk) * tile + tt0;  // 4 tokens, 16-byte aligned for fp32
        A pv[kTok];
        if constexpr (std::is_same_v<A, float>) {
          const float4 q = *reinterpret_cast<const float4*>(src);
          pv[0] = q.x, pv[1] = q.y, pv[2] = q.z, pv[3] = q.w;
        } else {
#pragma unroll
          for (int j = 0; j < kTok; ++j) pv[j] = src[j];
        }
        A wv[kOut];
#pragma unroll
        for (int v = 0; v < kOut; ++v) wv[v] = to_acc(w[v][kk]);
#pragma unroll
        for (int j = 0; j < kTok; ++j)
#pragma unroll
          for (int v = 0; v < kOut; ++v) acc[j][v] += pv[j] * wv[v];
      }
    }

    // Epilogue: + bias + pos, one rounding to T, 16-byte stores.
    A b_add[kOut];
#pragma unroll
    for (int v = 0; v < kOut; ++v) b_add[v] = A(0);
    if (bias != nullptr) {
      if (vec_out) {
        alignas(16) T raw[kOut];
        load_vec(bias + d0, raw);
#pragma unroll
        for (int v = 0; v < kOut; ++v) b_add[v] = to_acc(raw[v]);
      } else {
#pragma unroll
        for (int v = 0; v < kOut; ++v)
          if (d0 + v < g.D) b_add[v] = to_acc(bias[d0 + v]);
      }
    }
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      const int64_t n = n0 + tt0 + j;
      if (n >= g.n_tokens) break;
      const int64_t t = n % g.tokens;
      T* dst = out + n * g.D + d0;
      if (vec_out) {
        alignas(16) T pe[kOut];
        if (pos != nullptr) {
          load_vec(pos + t * g.D + d0, pe);
        }
        alignas(16) T res[kOut];
#pragma unroll
        for (int v = 0; v < kOut; ++v) {
          const A extra = pos != nullptr ? to_acc(pe[v]) : A(0);
          res[v] = from_acc<T>(acc[j][v] + b_add[v] + extra);
        }
        store_vec(dst, res);
      } else {
#pragma unroll
        for (int v = 0; v < kOut; ++v) {
          if (d0 + v >= g.D) break;
          const A extra = pos != nullptr ? to_acc(pos[t * g.D + d0 + v]) : A(0);
          dst[v] = from_acc<T>(acc[j][v] + b_add[v] + extra);
        }
      }
    }
  }
}

}  // namespace

cudaError_t patch_embed(DType dtype, const void* x, int64_t sb, int64_t sc, int64_t sh, int64_t sw,
                        const void* weight, const void* bias, const void* pos, void* out, int64_t B, int64_t C,
                        int64_t H, int64_t W, int64_t p, int64_t D, cudaStream_t stream) {
  if (p <= 0 || H % p || W % p || C <= 0 || D <= 0) return cudaErrorInvalidValue;
  const int64_t tokens = (H / p) * (W / p);
  const int64_t n_tokens = B * tokens;
  if (n_tokens == 0) return cudaSuccess;
  const int64_t K = C * p * p;
  const int64_t Kpad = ceil_div(K, kChunk) * kChunk;
  if (D > (int64_t{1} << 30) || Kpad > (int64_t{1} << 20)) return cudaErrorInvalidValue;

  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using A = acc_t<T>;
    // Token tile: 32 unless the grid would leave SMs idle or the staged patches exceed shared memory.
    const int64_t target_blocks = 2 * static_cast<int64_t>(sm_count());
    int tile = kMaxTile;
    while (tile > kTok && ceil_div(n_tokens, tile) < target_blocks) tile /= 2;
    while (tile > kTok && static_cast<size_t>(Kpad) * tile * sizeof(A) > kSmemLimit) tile /= 2;
    const size_t smem = static_cast<size_t>(Kpad) * tile * sizeof(A);
    if (smem > kSmemLimit) return cudaErrorInvalidValue;
    const int64_t blocks_x = ceil_div(n_tokens, tile);
    if (blocks_x > 0x7fffffff) return cudaErrorInvalidValue;
    // Split the output channels over blockIdx.y while the grid is small (keep >= 16 groups each).
    const int64_t groups = ceil_div(D, kOut);
    int64_t splits = 1;
    while (blocks_x * splits < target_blocks && groups / (2 * splits) >= 16) splits *= 2;
    const int64_t per_split = ceil_div(groups, splits);
    splits = ceil_div(groups, per_split);

    Geometry g;
    g.n_tokens = n_tokens;
    g.sb = sb, g.sc = sc, g.sh = sh, g.sw = sw;
    g.tokens = tokens;
    g.grid_w = static_cast<int>(W / p);
    g.p = static_cast<int>(p);
    g.K = static_cast<int>(K);
    g.Kpad = static_cast<int>(Kpad);
    g.D = static_cast<int>(D);
    g.groups_per_split = static_cast<int>(per_split);
    const bool vec_w = K % kChunk == 0 && aligned16(weight);
    const bool vec_out = D % kOut == 0 && aligned16(out) && (bias == nullptr || aligned16(bias)) &&
                         (pos == nullptr || aligned16(pos));
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(splits));
    patch_embed_kernel<T><<<grid, kThreads, smem, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
        static_cast<const T*>(pos), static_cast<T*>(out), g, tile, vec_w, vec_out);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace ditfast
