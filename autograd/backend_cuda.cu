/* autograd/backend_cuda.cu — the `cuda` backend: every entry of the backend
 * table (autograd/backend.h) on one NVIDIA GPU.
 *
 * Status: compiled (fat binary sm_80/86/89/90 + PTX) and host-tested; not yet
 * run on a GPU (README "GPU"). `make test-gpu` is the first thing to run on one.
 *
 * Memory. Data memory is device memory: alloc is one cudaMalloc (the arena of
 * autograd/tensor.c asks for whole chunks and bump-allocates inside them, so
 * there is no per-op cudaMalloc), free is cudaFree. Host <-> device copies go
 * through two pinned staging buffers (double-buffered with events, so the
 * host's memcpy into one overlaps the DMA of the other). Everything runs on
 * one compute stream, in call order; arena memory reused after a reset is
 * therefore never overwritten before the kernels that read it have run.
 *
 * Host arguments. The table passes some small arrays as host memory (token
 * positions, targets, the decay mask, sequence ids); they are copied to
 * per-slot device buffers on the stream before the kernel. The frozen weights
 * (NF4 packed nibbles and scales, bf16/fp32 tables) and the RoPE tables are
 * host memory owned by the model: they are mirrored on the device the first
 * time a kernel needs them and kept (the NF4 base is uploaded once and
 * dequantized per linear into a bf16 scratch, never whole). A mirror is
 * checked on every use against a fingerprint of its host bytes (size, and a
 * hash of 64 spread samples plus the first and last 4 KiB), and uploaded again
 * when that changed (a freed buffer whose address was reused); contract: the
 * host bytes of a frozen weight do not change while it is in use (the model
 * never writes them).
 *
 * Numerics. The per-element maths is autograd/backend_cuda_elem.h, shared
 * with the host test tests/test_cuda_elem.cu; device code is compiled with
 * --fmad=false and IEEE division and square root. Every reduction has a
 * fixed order that does not depend on timing (block trees, per-thread
 * sequential loops, no float atomics; integer counts use integer atomics), so
 * a run is reproducible on the same GPU. Bit-identical to the CPU backend:
 * NF4/bf16 dequantization, bf16 rounding, dropout masks, embedding, RoPE,
 * SwiGLU, add/axpy/scale, AdamW, Sophia, the Hessian EMA, the sum of squares
 * (the CPU's chunking, reproduced), the non-finite count, the RMSNorm weight
 * gradient; within bounded NMSE (tests/test_backend_ops.c): the GEMM
 * (cuBLASLt's summation order), RMSNorm's row sums (double, tree order),
 * attention and the LM head (fp32 dot products and softmax sums in another
 * order). Sampled labels are the CPU's function of the logits
 * (qe_sample_row, one thread per row in vocabulary order).
 *
 * GEMM: cuBLASLt (dlopen'd at initialisation), bf16 (or fp32) operands, fp32 accumulation and output
 * (CUBLAS_COMPUTE_32F: no TF32), one plan (descriptors + heuristic algorithm)
 * cached per shape, a fixed 32 MiB workspace.
 *
 * Attention: flash-style kernels of our own rather than cuDNN's fused SDPA.
 * cuDNN's graph API would need a separate graph per mask kind (causal plus
 * packed-sequence segments is expressible only through its ragged/"padding"
 * masks, which describe right-padded rows, not several examples packed in one
 * row with document masking), does not expose the row max and 1/sum in the
 * CPU engine's form (it saves a log-sum-exp), and its backward uses atomics
 * for dQ in some engines (not reproducible run to run). Ours, two forms of
 * the same algorithm: (1) for bf16 operands with head_dim a multiple of 16,
 * tiles of queries and keys on bf16 tensor cores (WMMA, in
 * autograd/backend_cuda_flash.h, which tests/test_cuda_flash_emu.cu also runs
 * on the CPU in an emulated launch); (2) otherwise, or with QLORA_CUDA_ATTN=simple, one thread
 * per query row (forward, dQ) or key row (dK, dV) on CUDA cores. Both: K/V (or
 * Q/dO) tiles staged in shared memory, online softmax in the forward (running
 * max and sum, rescaled), the row max and 1/sum saved, the probabilities
 * recomputed in backward from them (Dao et al. 2022); never (B, H, T, T) in
 * memory; the CPU's mask rule (causal, token i sees j only with seq_ids[j] ==
 * seq_ids[i], and inside a sliding window). dK and dV have one owner per key
 * row or key tile, so no atomics.
 */
extern "C" {
#include "autograd/backend.h"
#include "autograd/tensor.h"
}

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <mma.h>
#include <xxhash.h>

#include "autograd/backend_cuda_elem.h"

/* ------------------------------------------------------------------ errors */

static void cuda_die(const char *what, const char *err, const char *file, int line) {
    fprintf(stderr, "[cuda] %s failed at %s:%d: %s\n", what, file, line, err);
    abort();
}

#define CU(call)                                                                      \
    do {                                                                              \
        cudaError_t e_ = (call);                                                      \
        if (e_ != cudaSuccess) cuda_die(#call, cudaGetErrorString(e_), __FILE__, __LINE__); \
    } while (0)

#define LT(call)                                                                      \
    do {                                                                              \
        cublasStatus_t s_ = (call);                                                   \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                            \
            char b_[32];                                                              \
            snprintf(b_, sizeof b_, "cublas status %d", (int)s_);                     \
            cuda_die(#call, b_, __FILE__, __LINE__);                                  \
        }                                                                             \
    } while (0)

#define KCHECK() CU(cudaGetLastError())

/* ------------------------------------------------------------------ state */

static constexpr size_t PIN_BYTES = 8 << 20, GEMM_WS_BYTES = 32 << 20;
static constexpr int N_ARG_SLOTS = 3;

static struct {
    int tried, ok;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *ws;
    unsigned char *pin[2];
    cudaEvent_t pin_ev[2];
    int pin_next;
    void *arg[N_ARG_SLOTS];
    size_t arg_size[N_ARG_SLOTS];
    double *dscratch; /* 1024 doubles: reduction results */
    unsigned long long *ucount;
    /* host offload (gradient_checkpointing: offload): a copy stream, the compute stream's position
     * recorded before each copy, and a ring of events marking the copies' ends (ticket t: ev[t % N]) */
    cudaStream_t copy;
    cudaEvent_t copy_after;
    cudaEvent_t copy_done[64];
    uint64_t copy_ticket;
} G;

__constant__ float c_nf4_code[16];

/* cuBLASLt is loaded with dlopen when the backend initialises, not linked: mapping and relocating
 * libcublasLt costs about 150 MiB of resident memory at process start (measured with VmHWM on this
 * machine), which every CPU run of a CUDA build would pay. */
static struct {
    decltype(&cublasLtCreate) Create;
    decltype(&cublasLtMatmul) Matmul;
    decltype(&cublasLtMatmulAlgoGetHeuristic) MatmulAlgoGetHeuristic;
    decltype(&cublasLtMatmulDescCreate) MatmulDescCreate;
    decltype(&cublasLtMatmulDescSetAttribute) MatmulDescSetAttribute;
    decltype(&cublasLtMatmulPreferenceCreate) MatmulPreferenceCreate;
    decltype(&cublasLtMatmulPreferenceDestroy) MatmulPreferenceDestroy;
    decltype(&cublasLtMatmulPreferenceSetAttribute) MatmulPreferenceSetAttribute;
    decltype(&cublasLtMatrixLayoutCreate) MatrixLayoutCreate;
} LTF;

static int load_cublaslt(void) {
    const char *names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
    void *h = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !h; i++) h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "[cuda] cannot load cuBLASLt (libcublasLt.so.13): %s\n", dlerror());
        return 0;
    }
#define LT_SYM(field, sym)                                                        \
    if (!(*(void **)&LTF.field = dlsym(h, #sym))) {                                \
        fprintf(stderr, "[cuda] cuBLASLt has no %s\n", #sym);                      \
        return 0;                                                                 \
    }
    LT_SYM(Create, cublasLtCreate)
    LT_SYM(Matmul, cublasLtMatmul)
    LT_SYM(MatmulAlgoGetHeuristic, cublasLtMatmulAlgoGetHeuristic)
    LT_SYM(MatmulDescCreate, cublasLtMatmulDescCreate)
    LT_SYM(MatmulDescSetAttribute, cublasLtMatmulDescSetAttribute)
    LT_SYM(MatmulPreferenceCreate, cublasLtMatmulPreferenceCreate)
    LT_SYM(MatmulPreferenceDestroy, cublasLtMatmulPreferenceDestroy)
    LT_SYM(MatmulPreferenceSetAttribute, cublasLtMatmulPreferenceSetAttribute)
    LT_SYM(MatrixLayoutCreate, cublasLtMatrixLayoutCreate)
#undef LT_SYM
    return 1;
}

/* 1 when a device is present and the backend initialised (once per process). */
static int cuda_init(void) {
    if (G.tried) return G.ok;
    G.tried = 1;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
        cudaGetLastError(); /* clear the sticky "no device" error */
        return 0;
    }
    if (!load_cublaslt()) return 0;
    CU(cudaStreamCreateWithFlags(&G.stream, cudaStreamNonBlocking));
    LT(LTF.Create(&G.lt));
    CU(cudaMalloc(&G.ws, GEMM_WS_BYTES));
    for (int i = 0; i < 2; i++) {
        CU(cudaMallocHost((void **)&G.pin[i], PIN_BYTES));
        CU(cudaEventCreateWithFlags(&G.pin_ev[i], cudaEventDisableTiming));
        CU(cudaEventRecord(G.pin_ev[i], G.stream));
    }
    CU(cudaStreamCreateWithFlags(&G.copy, cudaStreamNonBlocking));
    CU(cudaEventCreateWithFlags(&G.copy_after, cudaEventDisableTiming));
    for (int i = 0; i < 64; i++) CU(cudaEventCreateWithFlags(&G.copy_done[i], cudaEventDisableTiming));
    CU(cudaMalloc((void **)&G.dscratch, 1024 * sizeof(double)));
    CU(cudaMalloc((void **)&G.ucount, sizeof(unsigned long long)));
    CU(cudaMemcpyToSymbol(c_nf4_code, nf4_code, sizeof(float) * 16));
    G.ok = 1;
    return 1;
}

extern "C" int ag_backend_cuda_available(void) { return cuda_init(); }

extern "C" int ag_backend_cuda_device_name(char *buf, size_t n, double *mem_bytes) {
    if (!cuda_init()) return -1;
    int dev = 0;
    cudaDeviceProp p;
    CU(cudaGetDevice(&dev));
    CU(cudaGetDeviceProperties(&p, dev));
    snprintf(buf, n, "%s (sm_%d%d, %d SMs)", p.name, p.major, p.minor, p.multiProcessorCount);
    if (mem_bytes) *mem_bytes = (double)p.totalGlobalMem;
    return 0;
}

extern "C" int ag_backend_cuda_mem_info(double *free_bytes, double *total_bytes) {
    if (!cuda_init()) return -1;
    size_t f = 0, t = 0;
    CU(cudaMemGetInfo(&f, &t));
    *free_bytes = (double)f;
    *total_bytes = (double)t;
    return 0;
}

static inline int nblocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (int)(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

/* ------------------------------------------------------------------ memory */

static void *cu_alloc(size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? (bytes + 63) & ~(size_t)63 : 64) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

static void cu_free(void *p) {
    if (p) CU(cudaFree(p)); /* cudaFree waits for the work that may still read p */
}

static void cu_copy_h2d(void *dst, const void *src, size_t bytes) {
    const unsigned char *s = (const unsigned char *)src;
    unsigned char *d = (unsigned char *)dst;
    while (bytes) {
        size_t n = bytes < PIN_BYTES ? bytes : PIN_BYTES;
        int k = G.pin_next;
        G.pin_next ^= 1;
        CU(cudaEventSynchronize(G.pin_ev[k])); /* the staging buffer's last DMA is done */
        memcpy(G.pin[k], s, n);
        CU(cudaMemcpyAsync(d, G.pin[k], n, cudaMemcpyHostToDevice, G.stream));
        CU(cudaEventRecord(G.pin_ev[k], G.stream));
        s += n;
        d += n;
        bytes -= n;
    }
}

static void cu_copy_d2h(void *dst, const void *src, size_t bytes) {
    const unsigned char *s = (const unsigned char *)src;
    unsigned char *d = (unsigned char *)dst;
    while (bytes) {
        size_t n = bytes < PIN_BYTES ? bytes : PIN_BYTES;
        int k = G.pin_next;
        G.pin_next ^= 1;
        CU(cudaEventSynchronize(G.pin_ev[k]));
        CU(cudaMemcpyAsync(G.pin[k], s, n, cudaMemcpyDeviceToHost, G.stream));
        CU(cudaEventRecord(G.pin_ev[k], G.stream));
        CU(cudaEventSynchronize(G.pin_ev[k]));
        memcpy(d, G.pin[k], n);
        s += n;
        d += n;
        bytes -= n;
    }
}

static void cu_copy_d2d(void *dst, const void *src, size_t bytes) {
    if (bytes) CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, G.stream));
}

static void cu_zero(void *dst, size_t bytes) {
    if (bytes) CU(cudaMemsetAsync(dst, 0, bytes, G.stream));
}

__global__ void k_fill(float *d, int64_t n, float v) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        d[i] = v;
}

static void cu_fill_f32(float *dst, int64_t n, float value) {
    if (n <= 0) return;
    k_fill<<<nblocks(n, 256), 256, 0, G.stream>>>(dst, n, value);
    KCHECK();
}

static void cu_sync(void) {
    CU(cudaStreamSynchronize(G.stream));
    if (G.copy_ticket) CU(cudaStreamSynchronize(G.copy)); /* and every offload copy started before */
}

/* ---- host offload (backend.h host_alloc .. offload_wait) ----
 * A copy starts on G.copy after the compute stream's work so far (an event recorded on G.stream that
 * G.copy waits for), so it reads a source the kernels before it wrote and writes a destination they
 * finished reading; the copies run in start order on the one copy stream. Its end is an event of a
 * ring of 64: waiting for ticket t waits for the event's latest record, which is t's copy or a later
 * one on the same stream, so it is never early. offload_wait makes the compute stream wait; the host
 * goes on. cudaMemcpyAsync overlaps compute only for page-locked host memory: host_alloc's. */
static void *cu_host_alloc(size_t bytes) {
    void *p = NULL;
    if (cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

static void cu_host_free(void *p) {
    if (!p) return;
    CU(cudaStreamSynchronize(G.copy)); /* the copies that may still use p */
    CU(cudaFreeHost(p));
}

static uint64_t cu_offload_start(void *dst, const void *src, size_t bytes, int to_host) {
    CU(cudaEventRecord(G.copy_after, G.stream));
    CU(cudaStreamWaitEvent(G.copy, G.copy_after, 0));
    if (bytes)
        CU(cudaMemcpyAsync(dst, src, bytes, to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, G.copy));
    uint64_t t = ++G.copy_ticket;
    CU(cudaEventRecord(G.copy_done[t % 64], G.copy));
    return t;
}

static void cu_offload_wait(uint64_t ticket) {
    if (ticket == 0 || ticket > G.copy_ticket) return;
    CU(cudaStreamWaitEvent(G.stream, G.copy_done[ticket % 64], 0));
}

/* A host array as device memory in slot `slot` (valid until the next upload to that slot;
 * stream order keeps the kernels that read it before that). */
static void *dev_args(int slot, const void *host, size_t bytes) {
    if (!host) return NULL;
    if (G.arg_size[slot] < bytes) {
        if (G.arg[slot]) CU(cudaFree(G.arg[slot]));
        size_t sz = bytes < 4096 ? 4096 : bytes + bytes / 2;
        CU(cudaMalloc(&G.arg[slot], sz));
        G.arg_size[slot] = sz;
    }
    if (bytes) CU(cudaMemcpyAsync(G.arg[slot], host, bytes, cudaMemcpyHostToDevice, G.stream));
    return G.arg[slot];
}

enum { SLOT_POS = 0, SLOT_MASK = 1, SLOT_SEQ = 2 };

/* ------------------------------------------------------------------ mirrors of host frozen data */

typedef struct mirror {
    const void *host;
    size_t bytes;
    uint64_t fp;
    void *dev;
} mirror;

static mirror *g_mirrors;
static size_t g_n_mirrors, g_cap_mirrors;

static uint64_t fingerprint(const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    XXH3_state_t *st = XXH3_createState();
    XXH3_64bits_reset_withSeed(st, (XXH64_hash_t)n);
    size_t edge = n < 4096 ? n : 4096;
    XXH3_64bits_update(st, b, edge);
    XXH3_64bits_update(st, b + n - edge, edge);
    if (n > 64)
        for (int k = 0; k < 64; k++) XXH3_64bits_update(st, b + (n - 64) / 63 * k, 64);
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    return h;
}

/* The device copy of `bytes` host bytes at `host` (uploaded on first use or when they changed). */
static const void *mirror_of(const void *host, size_t bytes) {
    if (!host || !bytes) return NULL;
    uint64_t fp = fingerprint(host, bytes);
    for (size_t i = 0; i < g_n_mirrors; i++) {
        mirror *m = &g_mirrors[i];
        if (m->host != host || m->bytes != bytes) continue;
        if (m->fp != fp) {
            cu_copy_h2d(m->dev, host, bytes);
            m->fp = fp;
        }
        return m->dev;
    }
    if (g_n_mirrors == g_cap_mirrors) {
        size_t cap = g_cap_mirrors ? 2 * g_cap_mirrors : 256;
        mirror *nm = (mirror *)realloc(g_mirrors, cap * sizeof *nm);
        if (!nm) {
            fprintf(stderr, "[cuda] out of host memory for the weight mirror table\n");
            abort();
        }
        g_mirrors = nm;
        g_cap_mirrors = cap;
    }
    void *d = cu_alloc(bytes);
    if (!d) {
        fprintf(stderr, "[cuda] out of device memory mirroring a frozen weight of %zu bytes\n", bytes);
        abort();
    }
    cu_copy_h2d(d, host, bytes);
    g_mirrors[g_n_mirrors++] = (mirror){host, bytes, fp, d};
    return d;
}

/* A frozen weight with device pointers. */
typedef struct dev_frozen {
    int kind;
    int64_t out, in;
    const uint8_t *packed, *absmax_q;
    const float *absmax, *nested_absmax, *nested_code;
    float offset;
    int double_quant, blocksize;
    const uint16_t *w_bf16;
    const float *w_f32;
    const int8_t *cb; /* FROZEN_INT8 */
    const float *scb;
} dev_frozen;

static dev_frozen frozen_dev(const frozen_weight *w) {
    dev_frozen d;
    memset(&d, 0, sizeof d);
    d.kind = (int)w->kind;
    d.out = w->out;
    d.in = w->in;
    if (w->kind == FROZEN_NF4) {
        const nf4_tensor *t = w->nf4;
        d.packed = (const uint8_t *)mirror_of(t->packed, (size_t)((t->n + 1) / 2));
        d.double_quant = t->double_quant;
        d.blocksize = t->blocksize;
        if (t->double_quant) {
            d.absmax_q = (const uint8_t *)mirror_of(t->absmax_q, (size_t)t->nblocks);
            d.nested_absmax = (const float *)mirror_of(t->nested_absmax, (size_t)((t->nblocks + 255) / 256) * 4);
            d.nested_code = (const float *)mirror_of(t->nested_code, 256 * sizeof(float));
            d.offset = t->offset;
        } else {
            d.absmax = (const float *)mirror_of(t->absmax, (size_t)t->nblocks * 4);
        }
    } else if (w->kind == FROZEN_BF16) {
        d.w_bf16 = (const uint16_t *)mirror_of(w->w_bf16, (size_t)(w->out * w->in) * 2);
    } else if (w->kind == FROZEN_INT8) { /* codes and row absmax uploaded once, as stored (1 byte/param) */
        d.cb = (const int8_t *)mirror_of(w->cb, (size_t)(w->out * w->in));
        d.scb = (const float *)mirror_of(w->scb, (size_t)w->out * 4);
    } else {
        d.w_f32 = (const float *)mirror_of(w->w_f32, (size_t)(w->out * w->in) * 4);
    }
    return d;
}

/* Element e of the flattened frozen weight as fp32 (NF4: the bnb dequantization). */
__device__ __forceinline__ float frozen_elem(const dev_frozen &w, int64_t e) {
    if (w.kind == FROZEN_NF4) {
        float a = qe_nf4_absmax(w.double_quant, w.absmax, w.absmax_q, w.nested_code, w.nested_absmax, w.offset,
                                e / w.blocksize);
        return qe_nf4_value(c_nf4_code, w.packed, e, a);
    }
    if (w.kind == FROZEN_BF16) return qe_bf16_to_f32(w.w_bf16[e]);
    if (w.kind == FROZEN_INT8) return qe_int8_value(w.cb, w.scb, e, w.in);
    return w.w_f32[e];
}

/* ------------------------------------------------------------------ GEMM (cuBLASLt) */

typedef struct gemm_plan_key {
    int ta, tb, dt, beta1;
    uint32_t align_a, align_b, align_c; /* bytes: the pointers' alignment (cuBLASLt assumes 256 unless told) */
    int64_t M, N, K, lda, ldb, ldc;
} gemm_plan_key;

typedef struct gemm_plan {
    gemm_plan_key key;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
    int used;
} gemm_plan;

enum { GEMM_PLANS = 4096 };
static gemm_plan *g_plans;

static gemm_plan *gemm_plan_get(const gemm_plan_key *k) {
    if (!g_plans) {
        g_plans = (gemm_plan *)calloc(GEMM_PLANS, sizeof *g_plans);
        if (!g_plans) {
            fprintf(stderr, "[cuda] out of host memory for GEMM plans\n");
            abort();
        }
    }
    uint64_t h = XXH3_64bits(k, sizeof *k);
    for (int i = 0; i < GEMM_PLANS; i++) {
        gemm_plan *p = &g_plans[(h + (uint64_t)i) & (GEMM_PLANS - 1)];
        if (p->used && !memcmp(&p->key, k, sizeof *k)) return p;
        if (p->used) continue;
        /* Row-major C (M,N) = op(A) op(B) is column-major Cᵀ (N,M) = op(B)ᵀ op(A)ᵀ: cuBLASLt's
         * "A" is our B, its "B" our A. Our row-major B (K,N) read column-major is Bᵀ (N,K);
         * stored transposed (N,K) it reads as (K,N) and is transposed back. */
        p->key = *k;
        cudaDataType_t ab = k->dt == GEMM_BF16 ? CUDA_R_16BF : CUDA_R_32F;
        LT(LTF.MatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t opa = k->tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = k->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        LT(LTF.MatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
        LT(LTF.MatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
        /* cuBLASLt "A" = our B: column-major rows x cols before its op */
        uint64_t ar = k->tb ? (uint64_t)k->K : (uint64_t)k->N, ac = k->tb ? (uint64_t)k->N : (uint64_t)k->K;
        uint64_t br = k->ta ? (uint64_t)k->M : (uint64_t)k->K, bc = k->ta ? (uint64_t)k->K : (uint64_t)k->M;
        LT(LTF.MatrixLayoutCreate(&p->la, ab, ar, ac, k->ldb));
        LT(LTF.MatrixLayoutCreate(&p->lb, ab, br, bc, k->lda));
        LT(LTF.MatrixLayoutCreate(&p->lc, CUDA_R_32F, (uint64_t)k->N, (uint64_t)k->M, k->ldc));
        cublasLtMatmulPreference_t pref;
        LT(LTF.MatmulPreferenceCreate(&pref));
        uint64_t ws = GEMM_WS_BYTES;
        LT(LTF.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
        /* cuBLASLt's "A" is our B */
        LT(LTF.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &k->align_b,
                                                sizeof k->align_b));
        LT(LTF.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &k->align_a,
                                                sizeof k->align_a));
        LT(LTF.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &k->align_c,
                                                sizeof k->align_c));
        LT(LTF.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &k->align_c,
                                                sizeof k->align_c));
        cublasLtMatmulHeuristicResult_t res;
        int got = 0;
        LT(LTF.MatmulAlgoGetHeuristic(G.lt, p->op, p->la, p->lb, p->lc, p->lc, pref, 1, &res, &got));
        LTF.MatmulPreferenceDestroy(pref);
        if (got < 1) {
            fprintf(stderr, "[cuda] cuBLASLt has no algorithm for a %s GEMM %lldx%lldx%lld (ta %d tb %d)\n",
                    k->dt == GEMM_BF16 ? "bf16" : "fp32", (long long)k->M, (long long)k->N, (long long)k->K, k->ta,
                    k->tb);
            abort();
        }
        p->algo = res.algo;
        p->used = 1;
        return p;
    }
    fprintf(stderr, "[cuda] more than %d distinct GEMM shapes\n", GEMM_PLANS);
    abort();
}

__global__ void k_gemm_k0(float *C, int64_t M, int64_t N, int64_t ldc, int beta1) {
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < M * N; t += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = t / N, j = t % N;
        if (!beta1) C[i * ldc + j] = 0.0f;
    }
}

/* The largest power of two (<= 256) that divides the address. */
static uint32_t ptr_align(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t al = 256;
    while (al > 1 && (a & (al - 1))) al >>= 1;
    return al;
}

static void cu_gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void *A, int64_t lda,
                    const void *B, int64_t ldb, float beta, float *C, int64_t ldc, gemm_dtype dt) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        k_gemm_k0<<<nblocks(M * N, 256), 256, 0, G.stream>>>(C, M, N, ldc, beta != 0.0f);
        KCHECK();
        return;
    }
    gemm_plan_key k;
    memset(&k, 0, sizeof k);
    k.ta = trans_a;
    k.tb = trans_b;
    k.dt = (int)dt;
    k.beta1 = beta != 0.0f;
    k.M = M;
    k.N = N;
    k.K = K;
    k.lda = lda;
    k.ldb = ldb;
    k.ldc = ldc;
    k.align_a = ptr_align(A);
    k.align_b = ptr_align(B);
    k.align_c = ptr_align(C);
    gemm_plan *p = gemm_plan_get(&k);
    LT(LTF.Matmul(G.lt, p->op, &alpha, B, p->la, A, p->lb, &beta, C, p->lc, C, p->lc, &p->algo, G.ws,
                      GEMM_WS_BYTES, G.stream));
}

/* ------------------------------------------------------------------ elementwise kernels */

#define GRID_LOOP(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

__global__ void k_to_bf16(const float *s, uint16_t *d, int64_t n) {
    GRID_LOOP(i, n) d[i] = qe_f32_to_bf16(s[i]);
}

static void cu_to_bf16(const float *src, bf16 *dst, int64_t n) {
    if (n <= 0) return;
    k_to_bf16<<<nblocks(n, 256), 256, 0, G.stream>>>(src, dst, n);
    KCHECK();
}

__global__ void k_frozen_rows(dev_frozen w, int64_t e0, int64_t n, float *df, uint16_t *db) {
    GRID_LOOP(i, n) {
        if (db && w.kind == FROZEN_BF16) {
            db[i] = w.w_bf16[e0 + i];
            continue;
        }
        float v = frozen_elem(w, e0 + i);
        if (df) df[i] = v;
        else db[i] = qe_f32_to_bf16(v);
    }
}

static void cu_frozen_rows_f32(const frozen_weight *w, int64_t row0, int64_t n, float *dst) {
    int64_t ne = n * w->in;
    if (ne <= 0) return;
    k_frozen_rows<<<nblocks(ne, 256), 256, 0, G.stream>>>(frozen_dev(w), row0 * w->in, ne, dst, NULL);
    KCHECK();
}

static void cu_frozen_rows_bf16(const frozen_weight *w, int64_t row0, int64_t n, bf16 *dst) {
    int64_t ne = n * w->in;
    if (ne <= 0) return;
    k_frozen_rows<<<nblocks(ne, 256), 256, 0, G.stream>>>(frozen_dev(w), row0 * w->in, ne, NULL, dst);
    KCHECK();
}

static const void *cu_frozen_data(const frozen_weight *w) {
    if (w->kind == FROZEN_BF16) return mirror_of(w->w_bf16, (size_t)(w->out * w->in) * 2);
    if (w->kind == FROZEN_F32) return mirror_of(w->w_f32, (size_t)(w->out * w->in) * 4);
    return NULL;
}

__global__ void k_dropout_fwd(const float *x, float *y, int64_t n, float p, float inv, uint64_t seed, uint64_t stream) {
    GRID_LOOP(i, n) y[i] = qe_dropout_keep(seed, stream, i, p) ? x[i] * inv : 0.0f;
}

__global__ void k_dropout_bwd(const float *g, float *dx, int64_t n, float p, float inv, uint64_t seed, uint64_t stream) {
    GRID_LOOP(i, n) if (qe_dropout_keep(seed, stream, i, p)) dx[i] += g[i] * inv;
}

static void cu_dropout_fwd(const float *x, float *y, int64_t n, float p, uint64_t seed, uint64_t stream) {
    if (n <= 0) return;
    k_dropout_fwd<<<nblocks(n, 256), 256, 0, G.stream>>>(x, y, n, p, 1.0f / (1.0f - p), seed, stream);
    KCHECK();
}

static void cu_dropout_bwd(const float *g, float *dx, int64_t n, float p, uint64_t seed, uint64_t stream) {
    if (n <= 0) return;
    k_dropout_bwd<<<nblocks(n, 256), 256, 0, G.stream>>>(g, dx, n, p, 1.0f / (1.0f - p), seed, stream);
    KCHECK();
}

/* The embedding table stays in host memory (for Llama-3-8B it is 1 GiB of bf16 the device does
 * not need): the n rows are gathered on the host with the CPU's own conversions (bf16 -> fp32
 * exact; NF4 through quant/nf4.c's reference dequantization) and uploaded, n·D·4 bytes per call. */
static void cu_embedding(const frozen_weight *table, const int32_t *ids, int64_t n, float *x) {
    if (n <= 0) return;
    const int64_t D = table->in;
    float *h = (float *)malloc((size_t)(n * D) * sizeof(float));
    if (!h) {
        fprintf(stderr, "[cuda] embedding: out of host memory for %lld rows\n", (long long)n);
        abort();
    }
    for (int64_t i = 0; i < n; i++) {
        float *row = h + i * D;
        const int64_t id = ids[i];
        if (table->kind == FROZEN_BF16)
            for (int64_t j = 0; j < D; j++) row[j] = bf16_to_f32(table->w_bf16[id * D + j]);
        else if (table->kind == FROZEN_NF4)
            nf4_dequantize_rows_f32_ref(table->nf4, id, 1, row);
        else
            memcpy(row, table->w_f32 + id * D, (size_t)D * sizeof(float));
    }
    cu_copy_h2d(x, h, (size_t)(n * D) * sizeof(float));
    free(h);
}

/* dtable[ids[i], j] += dx[i, j]: one thread per column, the tokens in order (the CPU's sums, no
 * atomics). ids (host) are uploaded per call. */
__global__ void k_embedding_bwd(const float *dx, const int32_t *ids, int64_t n, int64_t D, float *dt) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    for (int64_t i = 0; i < n; i++) dt[(int64_t)ids[i] * D + j] += dx[i * D + j];
}

static void cu_embedding_bwd(const float *dx, const int32_t *ids, int64_t n, int64_t D, float *dtable) {
    if (n <= 0 || D <= 0) return;
    int32_t *d_ids = (int32_t *)cu_alloc((size_t)n * sizeof(int32_t));
    if (!d_ids) {
        fprintf(stderr, "[cuda] embedding_bwd: out of device memory for %lld ids\n", (long long)n);
        abort();
    }
    cu_copy_h2d(d_ids, ids, (size_t)n * sizeof(int32_t));
    k_embedding_bwd<<<nblocks(D, 128), 128, 0, G.stream>>>(dx, d_ids, n, D, dtable);
    KCHECK();
    cu_free(d_ids);
}

/* ------------------------------------------------------------------ block reductions (fixed order) */

enum { RED_T = 256 };

/* Sum of one value per thread over a block of RED_T threads, by a fixed tree; every thread gets it. */
template <typename T> __device__ T block_sum(T v, T *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = RED_T / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] = sh[threadIdx.x] + sh[threadIdx.x + s];
        __syncthreads();
    }
    T r = sh[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = RED_T / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

/* ------------------------------------------------------------------ RMSNorm */

__global__ void k_rmsnorm_fwd(const float *x, const float *w, float *y, uint16_t *yb, float *rstd, int64_t D, float eps) {
    __shared__ double sh[RED_T];
    const float *xi = x + blockIdx.x * D;
    double ss = 0.0;
    for (int64_t j = threadIdx.x; j < D; j += RED_T) ss += (double)xi[j] * xi[j];
    ss = block_sum(ss, sh);
    float r = qe_rmsnorm_rstd(ss, D, eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int64_t j = threadIdx.x; j < D; j += RED_T) {
        float v = qe_rmsnorm_y(w[j], xi[j], r);
        if (y) y[blockIdx.x * D + j] = v;
        if (yb) yb[blockIdx.x * D + j] = qe_f32_to_bf16(v);
    }
}

__global__ void k_rmsnorm_dx(const float *x, const float *w, const float *rstd, const float *dy, float *dx, int64_t D) {
    __shared__ double sh[RED_T];
    const float *xi = x + blockIdx.x * D, *gi = dy + blockIdx.x * D;
    float r = rstd[blockIdx.x];
    double dot = 0.0;
    for (int64_t j = threadIdx.x; j < D; j += RED_T) dot += qe_rmsnorm_dot_term(gi[j], w[j], xi[j]);
    dot = block_sum(dot, sh);
    float c = qe_rmsnorm_c(dot, D, r);
    for (int64_t j = threadIdx.x; j < D; j += RED_T) dx[blockIdx.x * D + j] += qe_rmsnorm_dx(r, w[j], gi[j], c, xi[j]);
}

/* dw[j] accumulated row by row in row order, as the CPU does: bit-identical */
__global__ void k_rmsnorm_dw(const float *x, const float *rstd, const float *dy, float *dw, int64_t N, int64_t D) {
    GRID_LOOP(j, D) {
        float acc = dw[j];
        for (int64_t i = 0; i < N; i++) acc += qe_rmsnorm_dw(dy[i * D + j], x[i * D + j], rstd[i]);
        dw[j] = acc;
    }
}

static void cu_rmsnorm_fwd(const float *x, const float *w, float *y, bf16 *yb, float *rstd, int64_t N, int64_t D,
                           float eps) {
    if (N <= 0) return;
    k_rmsnorm_fwd<<<(unsigned)N, RED_T, 0, G.stream>>>(x, w, y, yb, rstd, D, eps);
    KCHECK();
}

static void cu_rmsnorm_bwd(const float *x, const float *w, const float *rstd, const float *dy, float *dx, float *dw,
                           int64_t N, int64_t D) {
    if (N <= 0) return;
    if (dx) {
        k_rmsnorm_dx<<<(unsigned)N, RED_T, 0, G.stream>>>(x, w, rstd, dy, dx, D);
        KCHECK();
    }
    if (dw) {
        k_rmsnorm_dw<<<nblocks(D, 128), 128, 0, G.stream>>>(x, rstd, dy, dw, N, D);
        KCHECK();
    }
}

/* ------------------------------------------------------------------ RoPE */

__global__ void k_rope(const float *x, float *y, uint16_t *yb, int64_t N, int nh, int hd, const float *cs,
                       const float *sn, const int32_t *pos, float sign, int acc) {
    int half = hd / 2;
    GRID_LOOP(t, N * nh * half) {
        int64_t tok = t / ((int64_t)nh * half);
        int rem = (int)(t % ((int64_t)nh * half)), h = rem / half, i = rem % half;
        const float *c = cs + (int64_t)pos[tok] * half, *s = sn + (int64_t)pos[tok] * half;
        int64_t o = (tok * nh + h) * hd;
        float a, b;
        qe_rope_pair(x[o + i], x[o + i + half], c[i], s[i], sign, &a, &b);
        if (acc) {
            y[o + i] += a;
            y[o + i + half] += b;
        } else {
            if (y) {
                y[o + i] = a;
                y[o + i + half] = b;
            }
            if (yb) {
                yb[o + i] = qe_f32_to_bf16(a);
                yb[o + i + half] = qe_f32_to_bf16(b);
            }
        }
    }
}

static void rope_run(const float *x, float *y, bf16 *yb, int64_t N, int nh, const rope_table *rt, const int32_t *pos,
                     float sign, int acc) {
    if (N <= 0) return;
    size_t tb = (size_t)rt->max_pos * (rt->head_dim / 2) * sizeof(float);
    const float *cs = (const float *)mirror_of(rt->cos, tb), *sn = (const float *)mirror_of(rt->sin, tb);
    const int32_t *dpos = (const int32_t *)dev_args(SLOT_POS, pos, (size_t)N * 4);
    int64_t work = N * nh * (rt->head_dim / 2);
    k_rope<<<nblocks(work, 256), 256, 0, G.stream>>>(x, y, yb, N, nh, rt->head_dim, cs, sn, dpos, sign, acc);
    KCHECK();
}

static void cu_rope_fwd(const float *x, float *y, bf16 *yb, int64_t N, int n_heads, const rope_table *rt,
                        const int32_t *pos) {
    rope_run(x, y, yb, N, n_heads, rt, pos, 1.0f, 0);
}

static void cu_rope_bwd(const float *dy, float *dx, int64_t N, int n_heads, const rope_table *rt, const int32_t *pos,
                        int write) {
    rope_run(dy, dx, NULL, N, n_heads, rt, pos, -1.0f, !write);
}

/* ------------------------------------------------------------------ attention (flash style) */

enum { ATT_HD_MAX = 256, ATT_ROWS = 64, ATT_TILE_FLOATS = 4096 };

template <typename TOP> __device__ __forceinline__ float ldop(const TOP *p, int64_t i);
template <> __device__ __forceinline__ float ldop<float>(const float *p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ldop<uint16_t>(const uint16_t *p, int64_t i) { return qe_bf16_to_f32(p[i]); }

/* may query row i see key row j (causal, packed-sequence segments, sliding window): qe_attn_allowed */
__device__ __forceinline__ int att_allowed(const int32_t *sid, int i, int j, int window) {
    return qe_attn_allowed(i, j, sid ? sid[i] : 0, sid ? sid[j] : 0, window);
}

/* Forward: block (query tile of ATT_ROWS, head h, batch b), one thread per query row. */
template <typename TOP>
__global__ void k_attn_fwd(const TOP *q, const TOP *k, const TOP *v, const int32_t *seq, float *rmax, float *rinv,
                           float *o, uint16_t *ob, int T, int H, int KVH, int hd, int window, float scale) {
    extern __shared__ float sm[];
    int bk = ATT_TILE_FLOATS / hd; /* keys per tile */
    float *Ks = sm, *Vs = sm + (size_t)bk * hd;
    int b = blockIdx.z, h = blockIdx.y, g = h / (H / KVH);
    int i0 = blockIdx.x * ATT_ROWS, i = i0 + threadIdx.x;
    int64_t qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    const int32_t *sid = seq ? seq + (int64_t)b * T : NULL;
    float qv[ATT_HD_MAX], acc[ATT_HD_MAX];
    int live = i < T;
    if (live)
        for (int d = 0; d < hd; d++) {
            qv[d] = ldop(q, ((int64_t)b * T + i) * qs + (int64_t)h * hd + d);
            acc[d] = 0.0f;
        }
    float m = -INFINITY, l = 0.0f;
    int kend = min(T, i0 + ATT_ROWS);
    for (int j0 = 0; j0 < kend; j0 += bk) {
        int nk = min(bk, kend - j0);
        __syncthreads();
        for (int t = threadIdx.x; t < nk * hd; t += blockDim.x) {
            int jj = t / hd, d = t % hd;
            int64_t off = ((int64_t)b * T + j0 + jj) * ks + (int64_t)g * hd + d;
            Ks[t] = ldop(k, off);
            Vs[t] = ldop(v, off);
        }
        __syncthreads();
        if (!live) continue;
        for (int jj = 0; jj < nk; jj++) {
            int j = j0 + jj;
            if (!att_allowed(sid, i, j, window)) continue;
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += qv[d] * Ks[jj * hd + d];
            float s = dot * scale;
            if (s > m) { /* rescale what was summed against the old max */
                float c = m == -INFINITY ? 0.0f : qe_exp_poly(m - s);
                l = l * c;
                for (int d = 0; d < hd; d++) acc[d] = acc[d] * c;
                m = s;
            }
            float p = qe_exp_poly(s - m);
            l = l + p;
            for (int d = 0; d < hd; d++) acc[d] = acc[d] + p * Vs[jj * hd + d];
        }
    }
    if (!live) return;
    float inv = 1.0f / l;
    int64_t st = ((int64_t)b * H + h) * T + i;
    rmax[st] = m;
    rinv[st] = inv;
    int64_t oo = ((int64_t)b * T + i) * qs + (int64_t)h * hd;
    for (int d = 0; d < hd; d++) {
        float val = acc[d] * inv;
        o[oo + d] = val;
        if (ob) ob[oo + d] = qe_f32_to_bf16(val);
    }
}

/* Backward, query side: per query row, a_i = Σ_j p_ij (dO_i·v_j) (double, j order), then
 * dq_i += Σ_j p_ij (dO_i·v_j − a_i)·scale · k_j. a_i is saved for the key side. */
template <typename TOP>
__global__ void k_attn_bwd_q(const TOP *q, const TOP *k, const TOP *v, const TOP *dob, const int32_t *seq,
                             const float *rmax, const float *rinv, float *arow, float *dq, int T, int H, int KVH, int hd,
                             int window, float scale) {
    extern __shared__ float sm[];
    int bk = ATT_TILE_FLOATS / hd;
    float *Ks = sm, *Vs = sm + (size_t)bk * hd;
    int b = blockIdx.z, h = blockIdx.y, g = h / (H / KVH);
    int i0 = blockIdx.x * ATT_ROWS, i = i0 + threadIdx.x;
    int64_t qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    const int32_t *sid = seq ? seq + (int64_t)b * T : NULL;
    float qv[ATT_HD_MAX], dov[ATT_HD_MAX], acc[ATT_HD_MAX];
    int live = i < T;
    int64_t qo = ((int64_t)b * T + (live ? i : 0)) * qs + (int64_t)h * hd;
    int64_t st = ((int64_t)b * H + h) * T + (live ? i : 0);
    float mx = live ? rmax[st] : 0.0f, inv = live ? rinv[st] : 0.0f;
    if (live)
        for (int d = 0; d < hd; d++) {
            qv[d] = ldop(q, qo + d);
            dov[d] = ldop(dob, qo + d);
            acc[d] = 0.0f;
        }
    int kend = min(T, i0 + ATT_ROWS);
    double a = 0.0;
    for (int pass = 0; pass < 2; pass++) {
        float af = (float)a;
        for (int j0 = 0; j0 < kend; j0 += bk) {
            int nk = min(bk, kend - j0);
            __syncthreads();
            for (int t = threadIdx.x; t < nk * hd; t += blockDim.x) {
                int jj = t / hd, d = t % hd;
                int64_t off = ((int64_t)b * T + j0 + jj) * ks + (int64_t)g * hd + d;
                Ks[t] = ldop(k, off);
                Vs[t] = ldop(v, off);
            }
            __syncthreads();
            if (!live) continue;
            for (int jj = 0; jj < nk; jj++) {
                int j = j0 + jj;
                if (!att_allowed(sid, i, j, window)) continue;
                float dot = 0.0f, dp = 0.0f;
                for (int d = 0; d < hd; d++) {
                    dot += qv[d] * Ks[jj * hd + d];
                    dp += dov[d] * Vs[jj * hd + d];
                }
                float p = qe_attn_p(dot * scale, mx, inv);
                if (pass == 0) {
                    a += qe_attn_a_term(p, dp);
                } else {
                    float ds = qe_attn_ds(p, dp, af, scale);
                    for (int d = 0; d < hd; d++) acc[d] = acc[d] + ds * Ks[jj * hd + d];
                }
            }
        }
    }
    if (!live) return;
    arow[st] = (float)a;
    if (dq)
        for (int d = 0; d < hd; d++) dq[qo + d] += acc[d];
}

/* Backward, key side: block (key tile of ATT_ROWS, kv group g, batch b), one thread per key row j:
 * over the group's heads and the queries i >= j that see j, dk_j += ds_ij q_i, dv_j += p_ij dO_i. */
template <typename TOP>
__global__ void k_attn_bwd_kv(const TOP *q, const TOP *k, const TOP *v, const TOP *dob, const int32_t *seq,
                              const float *rmax, const float *rinv, const float *arow, float *dk, float *dv, int T, int H,
                              int KVH, int hd, int window, float scale) {
    extern __shared__ float sm[];
    int bq = ATT_TILE_FLOATS / hd;
    float *Qs = sm, *Ds = sm + (size_t)bq * hd;
    float *stat = sm + (size_t)2 * bq * hd; /* bq x (max, inv, a) */
    int b = blockIdx.z, g = blockIdx.y, grp = H / KVH;
    int j0 = blockIdx.x * ATT_ROWS, j = j0 + threadIdx.x;
    int64_t qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    const int32_t *sid = seq ? seq + (int64_t)b * T : NULL;
    float kv[ATT_HD_MAX], vv[ATT_HD_MAX], adk[ATT_HD_MAX], adv[ATT_HD_MAX];
    int live = j < T;
    int64_t ko = ((int64_t)b * T + (live ? j : 0)) * ks + (int64_t)g * hd;
    if (live)
        for (int d = 0; d < hd; d++) {
            kv[d] = ldop(k, ko + d);
            vv[d] = ldop(v, ko + d);
            adk[d] = 0.0f;
            adv[d] = 0.0f;
        }
    for (int h = g * grp; h < (g + 1) * grp; h++) {
        for (int i0 = j0; i0 < T; i0 += bq) {
            int nq = min(bq, T - i0);
            __syncthreads();
            for (int t = threadIdx.x; t < nq * hd; t += blockDim.x) {
                int ii = t / hd, d = t % hd;
                int64_t off = ((int64_t)b * T + i0 + ii) * qs + (int64_t)h * hd + d;
                Qs[t] = ldop(q, off);
                Ds[t] = ldop(dob, off);
            }
            for (int t = threadIdx.x; t < nq; t += blockDim.x) {
                int64_t st = ((int64_t)b * H + h) * T + i0 + t;
                stat[3 * t] = rmax[st];
                stat[3 * t + 1] = rinv[st];
                stat[3 * t + 2] = arow[st];
            }
            __syncthreads();
            if (!live) continue;
            for (int ii = 0; ii < nq; ii++) {
                int i = i0 + ii;
                if (!att_allowed(sid, i, j, window)) continue;
                float dot = 0.0f, dp = 0.0f;
                for (int d = 0; d < hd; d++) {
                    dot += Qs[ii * hd + d] * kv[d];
                    dp += Ds[ii * hd + d] * vv[d];
                }
                float p = qe_attn_p(dot * scale, stat[3 * ii], stat[3 * ii + 1]);
                float ds = qe_attn_ds(p, dp, stat[3 * ii + 2], scale);
                for (int d = 0; d < hd; d++) {
                    adk[d] = adk[d] + ds * Qs[ii * hd + d];
                    adv[d] = adv[d] + p * Ds[ii * hd + d];
                }
            }
        }
    }
    if (!live) return;
    for (int d = 0; d < hd; d++) {
        if (dk) dk[ko + d] += adk[d];
        if (dv) dv[ko + d] += adv[d];
    }
}

#include "autograd/backend_cuda_flash.h"

/* QLORA_CUDA_ATTN: unset or "flash" = the tensor-core kernels where they apply, "simple" = always
 * the one-thread-per-row kernels. Read at each call (tests switch it). */
static int attn_use_flash(const ag_attn *a, const void *dob) {
    const char *e = getenv("QLORA_CUDA_ATTN");
    if (e && *e && strcmp(e, "flash") && strcmp(e, "simple")) {
        fprintf(stderr, "[cuda] QLORA_CUDA_ATTN=%s: expected flash or simple\n", e);
        exit(2);
    }
    if (e && !strcmp(e, "simple")) return 0;
    uintptr_t al = (uintptr_t)a->qb | (uintptr_t)a->kb | (uintptr_t)a->vb | (uintptr_t)dob;
    return a->bf16 && a->hd % 16 == 0 && a->hd <= ATT_HD_MAX && (al & 15u) == 0;
}

static int fa_smem_optin(void) {
    static int v = 0;
    if (!v) {
        int dev = 0;
        CU(cudaGetDevice(&dev));
        CU(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    }
    return v;
}

/* Launch kind 0/1/2 with the largest tiles whose shared memory fits the device; 0 when none fits. */
template <int BQ, int BK>
static int fa_launch(int kind, const ag_attn *a, const void *dob, const int32_t *seq, float *arow, float *o,
                     uint16_t *ob, float *dq, float *dk, float *dv) {
    size_t shm = fa_layout(kind, BQ, BK, a->hd).total;
    if (shm > (size_t)fa_smem_optin()) return 0;
    const uint16_t *q = (const uint16_t *)a->qb, *k = (const uint16_t *)a->kb, *v = (const uint16_t *)a->vb,
                   *d = (const uint16_t *)dob;
    float scale = 1.0f / sqrtf((float)a->hd);
    dim3 gq((unsigned)((a->T + BQ - 1) / BQ), (unsigned)a->H, (unsigned)a->B);
    if (kind == 0) {
        CU(cudaFuncSetAttribute(k_flash_fwd<BQ, BK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shm));
        k_flash_fwd<BQ, BK><<<gq, 2 * BQ, shm, G.stream>>>(q, k, v, seq, a->seglo, a->seg_ok, a->rmax, a->rinv, o, ob,
                                                            a->T, a->H, a->KVH, a->hd, a->window, scale);
    } else if (kind == 1) {
        CU(cudaFuncSetAttribute(k_flash_bwd_q<BQ, BK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shm));
        k_flash_bwd_q<BQ, BK><<<gq, 2 * BQ, shm, G.stream>>>(q, k, v, d, seq, a->seglo, a->seg_ok, a->rmax, a->rinv,
                                                              arow, dq, a->T, a->H, a->KVH, a->hd, a->window, scale);
    } else {
        dim3 gk((unsigned)((a->T + BK - 1) / BK), (unsigned)a->KVH, (unsigned)a->B);
        CU(cudaFuncSetAttribute(k_flash_bwd_kv<BQ, BK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shm));
        k_flash_bwd_kv<BQ, BK><<<gk, 2 * BQ, shm, G.stream>>>(q, k, v, d, seq, a->seglo, a->seg_ok, a->rmax, a->rinv,
                                                               arow, dk, dv, a->T, a->H, a->KVH, a->hd, a->window,
                                                               scale);
    }
    KCHECK();
    return 1;
}

static int fa_run(int kind, const ag_attn *a, const void *dob, const int32_t *seq, float *arow, float *o, uint16_t *ob,
                  float *dq, float *dk, float *dv) {
    return fa_launch<64, 64>(kind, a, dob, seq, arow, o, ob, dq, dk, dv) ||
           fa_launch<64, 32>(kind, a, dob, seq, arow, o, ob, dq, dk, dv) ||
           fa_launch<32, 32>(kind, a, dob, seq, arow, o, ob, dq, dk, dv) ||
           fa_launch<16, 16>(kind, a, dob, seq, arow, o, ob, dq, dk, dv);
}

static void attn_check(int hd) {
    if (hd > ATT_HD_MAX || hd < 1 || ATT_TILE_FLOATS / hd < 1) {
        fprintf(stderr, "[cuda] attention: head_dim %d is over the kernels' %d\n", hd, ATT_HD_MAX);
        abort();
    }
}

static void cu_attention_fwd(struct ag_ctx *ctx, ag_attn *a, float *o, bf16 *ob) {
    int B = a->B, T = a->T, hd = a->hd;
    attn_check(hd);
    /* the CPU's segment bookkeeping (attn_seg_lo, attn_window_lo), on the host from the host seq ids,
     * uploaded and saved for backward like the CPU's */
    int32_t *lo = (int32_t *)malloc((size_t)B * T * sizeof(int32_t));
    unsigned char *ok = (unsigned char *)malloc((size_t)B);
    if (!lo || !ok) {
        fprintf(stderr, "[cuda] attention: out of host memory\n");
        abort();
    }
    for (int b = 0; b < B; b++)
        ok[b] = (unsigned char)qe_attn_seg_lo(a->seq_ids ? a->seq_ids + (size_t)b * T : NULL, T, a->window,
                                              lo + (size_t)b * T);
    cu_copy_h2d(a->seglo, lo, (size_t)B * T * sizeof(int32_t));
    cu_copy_h2d(a->seg_ok, ok, (size_t)B);
    free(lo);
    free(ok);
    const int32_t *seq = (const int32_t *)dev_args(SLOT_SEQ, a->seq_ids, (size_t)B * T * 4);
    if (attn_use_flash(a, NULL) && fa_run(0, a, NULL, seq, NULL, o, (uint16_t *)ob, NULL, NULL, NULL)) return;
    dim3 grid((unsigned)((T + ATT_ROWS - 1) / ATT_ROWS), (unsigned)a->H, (unsigned)B);
    size_t shm = 2 * (size_t)ATT_TILE_FLOATS * sizeof(float);
    float scale = 1.0f / sqrtf((float)hd);
    if (a->bf16)
        k_attn_fwd<uint16_t><<<grid, ATT_ROWS, shm, G.stream>>>((const uint16_t *)a->qb, (const uint16_t *)a->kb,
                                                                (const uint16_t *)a->vb, seq, a->rmax, a->rinv, o, ob,
                                                                T, a->H, a->KVH, hd, a->window, scale);
    else
        k_attn_fwd<float><<<grid, ATT_ROWS, shm, G.stream>>>((const float *)a->qb, (const float *)a->kb,
                                                             (const float *)a->vb, seq, a->rmax, a->rinv, o, ob, T,
                                                             a->H, a->KVH, hd, a->window, scale);
    KCHECK();
    (void)ctx;
}

static void cu_attention_bwd(struct ag_ctx *ctx, const ag_attn *a, const void *dob, float *dq, float *dk, float *dv,
                             int write) {
    int B = a->B, T = a->T, hd = a->hd, w = a->window;
    attn_check(hd);
    if (write) { /* the kernels below add into dq, dk, dv: gradients not yet started begin at 0 on the stream */
        if (dq) cu_zero(dq, (size_t)B * T * a->H * hd * sizeof(float));
        if (dk) cu_zero(dk, (size_t)B * T * a->KVH * hd * sizeof(float));
        if (dv) cu_zero(dv, (size_t)B * T * a->KVH * hd * sizeof(float));
    }
    ag_mark mk = ag_arena_mark(ctx);
    float *arow = (float *)ag_alloc(ctx, (size_t)B * a->H * T * sizeof(float));
    const int32_t *seq = (const int32_t *)dev_args(SLOT_SEQ, a->seq_ids, (size_t)B * T * 4);
    if (attn_use_flash(a, dob) && fa_run(1, a, dob, seq, arow, NULL, NULL, dq, NULL, NULL)) {
        if ((dk || dv) && !fa_run(2, a, dob, seq, arow, NULL, NULL, NULL, dk, dv)) {
            fprintf(stderr, "[cuda] attention: no tile size of the key-side kernel fits shared memory (head_dim %d)\n", hd);
            abort();
        }
        ag_arena_reset(ctx, mk);
        return;
    }
    float scale = 1.0f / sqrtf((float)hd);
    dim3 gq((unsigned)((T + ATT_ROWS - 1) / ATT_ROWS), (unsigned)a->H, (unsigned)B);
    dim3 gk((unsigned)((T + ATT_ROWS - 1) / ATT_ROWS), (unsigned)a->KVH, (unsigned)B);
    size_t shq = 2 * (size_t)ATT_TILE_FLOATS * sizeof(float);
    size_t shk = shq + 3 * (size_t)(ATT_TILE_FLOATS / hd) * sizeof(float);
    if (a->bf16) {
        const uint16_t *q = (const uint16_t *)a->qb, *k = (const uint16_t *)a->kb, *v = (const uint16_t *)a->vb,
                       *d = (const uint16_t *)dob;
        k_attn_bwd_q<uint16_t><<<gq, ATT_ROWS, shq, G.stream>>>(q, k, v, d, seq, a->rmax, a->rinv, arow, dq, T, a->H,
                                                                a->KVH, hd, w, scale);
        KCHECK();
        if (dk || dv)
            k_attn_bwd_kv<uint16_t><<<gk, ATT_ROWS, shk, G.stream>>>(q, k, v, d, seq, a->rmax, a->rinv, arow, dk, dv,
                                                                     T, a->H, a->KVH, hd, w, scale);
    } else {
        const float *q = (const float *)a->qb, *k = (const float *)a->kb, *v = (const float *)a->vb,
                    *d = (const float *)dob;
        k_attn_bwd_q<float><<<gq, ATT_ROWS, shq, G.stream>>>(q, k, v, d, seq, a->rmax, a->rinv, arow, dq, T, a->H,
                                                             a->KVH, hd, w, scale);
        KCHECK();
        if (dk || dv)
            k_attn_bwd_kv<float><<<gk, ATT_ROWS, shk, G.stream>>>(q, k, v, d, seq, a->rmax, a->rinv, arow, dk, dv, T,
                                                                  a->H, a->KVH, hd, w, scale);
    }
    KCHECK();
    ag_arena_reset(ctx, mk);
}

/* KV-cached attention (model/llama_infer.c): one thread per (token, head), the CPU's loops
 * (fp32 dot in d order, expf, probabilities rounded like op_attention's operands). */
__device__ __forceinline__ float round_op(float x, int bf) { return bf ? qe_bf16_to_f32(qe_f32_to_bf16(x)) : x; }

__global__ void k_attn_cached(const float *q, const float *K, const float *V, const int32_t *pos, int64_t kvd, int n,
                              int H, int hd, int grp, int bf, int window, float scale, float *s_all, int total,
                              float *out) {
    GRID_LOOP(t, (int64_t)n * H) {
        int i = (int)(t / H), h = (int)(t % H), p = pos[i], g = h / grp;
        float *s = s_all + t * total;
        const float *qh = q + (int64_t)i * H * hd + (int64_t)h * hd;
        float mx = -INFINITY;
        int j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0; /* backend_cpu_nn.inc, the same window */
        for (int j = j0; j <= p; j++) {
            const float *kj = K + (int64_t)j * kvd + (int64_t)g * hd;
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += round_op(qh[d], bf) * round_op(kj[d], bf);
            s[j] = dot * scale;
            if (s[j] > mx) mx = s[j];
        }
        float sum = 0.0f;
        for (int j = j0; j <= p; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        float inv = 1.0f / sum;
        float *o = out + (int64_t)i * H * hd + (int64_t)h * hd;
        for (int d = 0; d < hd; d++) {
            float acc = 0.0f;
            for (int j = j0; j <= p; j++) acc += round_op(s[j] * inv, bf) * round_op(V[(int64_t)j * kvd + (int64_t)g * hd + d], bf);
            o[d] = acc;
        }
    }
}

static void cu_attention_cached(struct ag_ctx *ctx, const ag_attn_cached *a, float *out) {
    attn_check(a->hd);
    int total = a->pos[a->n - 1] + 1;
    ag_mark mk = ag_arena_mark(ctx);
    float *s = (float *)ag_alloc(ctx, (size_t)a->n * a->H * total * sizeof(float));
    const int32_t *dpos = (const int32_t *)dev_args(SLOT_POS, a->pos, (size_t)a->n * 4);
    k_attn_cached<<<nblocks((int64_t)a->n * a->H, 64), 64, 0, G.stream>>>(a->q, a->k, a->v, dpos, a->kv_dim, a->n, a->H,
                                                                          a->hd, a->H / a->KVH, a->bf16, a->window,
                                                                          1.0f / sqrtf((float)a->hd), s, total, out);
    KCHECK();
    ag_arena_reset(ctx, mk);
}

/* ------------------------------------------------------------------ SwiGLU, add, axpy */

__global__ void k_swiglu_fwd(const float *g, const float *u, float *y, uint16_t *yb, uint16_t *gb, uint16_t *ub,
                             int64_t n) {
    GRID_LOOP(i, n) {
        float v = qe_swiglu_y(g[i], u[i]);
        if (y) y[i] = v;
        if (yb) yb[i] = qe_f32_to_bf16(v);
        if (gb) gb[i] = qe_f32_to_bf16(g[i]);
        if (ub) ub[i] = qe_f32_to_bf16(u[i]);
    }
}

static void cu_swiglu_fwd(const float *g, const float *u, float *y, bf16 *yb, bf16 *gb, bf16 *ub, int64_t n) {
    if (n <= 0) return;
    k_swiglu_fwd<<<nblocks(n, 256), 256, 0, G.stream>>>(g, u, y, yb, gb, ub, n);
    KCHECK();
}

__global__ void k_swiglu_bwd(const void *g, const void *u, int isb, const float *dy, float *dg, float *du, int64_t n,
                            int write) {
    GRID_LOOP(i, n) {
        float gv = isb ? qe_bf16_to_f32(((const uint16_t *)g)[i]) : ((const float *)g)[i];
        float uv = isb ? qe_bf16_to_f32(((const uint16_t *)u)[i]) : ((const float *)u)[i];
        float a, b;
        qe_swiglu_bwd(gv, uv, dy[i], &a, &b);
        if (write == 2) { /* bf16 gradients (backend.h) */
            if (du) ((uint16_t *)du)[i] = qe_f32_to_bf16(b);
            if (dg) ((uint16_t *)dg)[i] = qe_f32_to_bf16(a);
            continue;
        }
        if (du) du[i] = write ? b : du[i] + b;
        if (dg) dg[i] = write ? a : dg[i] + a;
    }
}

static void cu_swiglu_bwd(const void *g, const void *u, int is_bf16, const float *dy, float *dg, float *du, int64_t n,
                         int write) {
    if (n <= 0) return;
    k_swiglu_bwd<<<nblocks(n, 256), 256, 0, G.stream>>>(g, u, is_bf16, dy, dg, du, n, write);
    KCHECK();
}

/* GeGLU with the tanh GELU: the formulas of backend.h's geglu entries (qe_geglu_* in backend_cuda_elem.h) */
__global__ void k_geglu_fwd(const float *g, const float *u, float *y, uint16_t *yb, uint16_t *gb, uint16_t *ub,
                            int64_t n) {
    GRID_LOOP(i, n) {
        float v = qe_gelu_tanh(g[i]) * u[i];
        if (y) y[i] = v;
        if (yb) yb[i] = qe_f32_to_bf16(v);
        if (gb) gb[i] = qe_f32_to_bf16(g[i]);
        if (ub) ub[i] = qe_f32_to_bf16(u[i]);
    }
}

static void cu_geglu_fwd(const float *g, const float *u, float *y, bf16 *yb, bf16 *gb, bf16 *ub, int64_t n) {
    if (n <= 0) return;
    k_geglu_fwd<<<nblocks(n, 256), 256, 0, G.stream>>>(g, u, y, yb, gb, ub, n);
    KCHECK();
}

__global__ void k_geglu_bwd(const void *g, const void *u, int isb, const float *dy, float *dg, float *du, int64_t n,
                            int write) {
    GRID_LOOP(i, n) {
        float gv = isb ? qe_bf16_to_f32(((const uint16_t *)g)[i]) : ((const float *)g)[i];
        float uv = isb ? qe_bf16_to_f32(((const uint16_t *)u)[i]) : ((const float *)u)[i];
        float a, b;
        qe_geglu_bwd(gv, uv, dy[i], &a, &b);
        if (write == 2) { /* bf16 gradients (backend.h) */
            if (du) ((uint16_t *)du)[i] = qe_f32_to_bf16(b);
            if (dg) ((uint16_t *)dg)[i] = qe_f32_to_bf16(a);
            continue;
        }
        if (du) du[i] = write ? b : du[i] + b;
        if (dg) dg[i] = write ? a : dg[i] + a;
    }
}

static void cu_geglu_bwd(const void *g, const void *u, int is_bf16, const float *dy, float *dg, float *du, int64_t n,
                         int write) {
    if (n <= 0) return;
    k_geglu_bwd<<<nblocks(n, 256), 256, 0, G.stream>>>(g, u, is_bf16, dy, dg, du, n, write);
    KCHECK();
}

__global__ void k_add(const float *a, const float *b, float *y, int64_t n) { GRID_LOOP(i, n) y[i] = a[i] + b[i]; }
__global__ void k_add_bwd(const float *dy, float *da, float *db, int64_t n) {
    GRID_LOOP(i, n) {
        if (da) da[i] += dy[i];
        if (db) db[i] += dy[i];
    }
}
__global__ void k_axpy(float *y, float alpha, const float *x, int64_t n) { GRID_LOOP(i, n) y[i] += alpha * x[i]; }
__global__ void k_scale(float *x, int64_t n, float s) { GRID_LOOP(i, n) x[i] = x[i] * s; }

static void cu_add(const float *a, const float *b, float *y, int64_t n) {
    if (n <= 0) return;
    k_add<<<nblocks(n, 256), 256, 0, G.stream>>>(a, b, y, n);
    KCHECK();
}

static void cu_add_bwd(const float *dy, float *da, float *db, int64_t n) {
    if (n <= 0) return;
    k_add_bwd<<<nblocks(n, 256), 256, 0, G.stream>>>(dy, da, db, n);
    KCHECK();
}

__global__ void k_add_cols(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t cols, int64_t n) {
    GRID_LOOP(i, n) {
        int64_t r = i / cols, c = i % cols;
        dst[r * ldd + c] += src[r * lds + c];
    }
}

static void cu_copy_cols(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols,
                         int accumulate) {
    if (rows <= 0 || cols <= 0) return;
    if (!accumulate) {
        CU(cudaMemcpy2DAsync(dst, (size_t)ldd * sizeof(float), src, (size_t)lds * sizeof(float),
                             (size_t)cols * sizeof(float), (size_t)rows, cudaMemcpyDeviceToDevice, G.stream));
        return;
    }
    k_add_cols<<<nblocks(rows * cols, 256), 256, 0, G.stream>>>(dst, ldd, src, lds, cols, rows * cols);
    KCHECK();
}

static void cu_axpy(float *y, float alpha, const float *x, int64_t n) {
    if (n <= 0) return;
    k_axpy<<<nblocks(n, 256), 256, 0, G.stream>>>(y, alpha, x, n);
    KCHECK();
}

static void cu_scale(float *x, int64_t n, float s) {
    if (n <= 0) return;
    k_scale<<<nblocks(n, 256), 256, 0, G.stream>>>(x, n, s);
    KCHECK();
}

/* ------------------------------------------------------------------ LM head + cross-entropy */

static constexpr int64_t CE_CHUNK = 128;

/* Per row of the chunk: max (exact in any order), Σ exp_poly(l − max) (fp32, per-thread strided
 * sums then a fixed tree), lse. Rows skipped (-100) get lse = 0. */
__global__ void k_ce_lse(const float *logits, int64_t V, const int32_t *tgt, float *lse) {
    __shared__ float shf[RED_T];
    int r = blockIdx.x;
    if (tgt[r] == -100) {
        if (threadIdx.x == 0) lse[r] = 0.0f;
        return;
    }
    const float *li = logits + (int64_t)r * V;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < V; j += RED_T) mx = li[j] > mx ? li[j] : mx;
    mx = block_max(mx, shf);
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < V; j += RED_T) s += qe_exp_poly(li[j] - mx);
    s = block_sum(s, shf);
    if (threadIdx.x == 0) lse[r] = qe_lse(mx, s);
}

/* Sampled targets: one thread per row, the CPU's inverse CDF in vocabulary order. */
__global__ void k_ce_sample(const float *logits, int64_t V, const float *lse, int32_t *tgt, int c, int64_t r0,
                            uint64_t seed) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= c || tgt[r] == -100) return;
    tgt[r] = qe_sample_row(logits + (int64_t)r * V, V, lse[r], qe_uniform53(seed, CE_SAMPLE_STREAM, (uint64_t)(r0 + r)));
}

/* Loss terms and the logit gradient (in place fp32, or into the bf16 operand). */
__global__ void k_ce_grad(float *logits, uint16_t *glb, int64_t V, const float *lse, const int32_t *tgt, float scale,
                          int grad, double *loss_rows, int32_t *labels_out) {
    int r = blockIdx.x;
    int t = tgt[r];
    float *li = logits + (int64_t)r * V;
    if (t == -100) {
        if (threadIdx.x == 0) {
            loss_rows[r] = 0.0;
            labels_out[r] = -100;
        }
        if (grad)
            for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
                if (glb) glb[(int64_t)r * V + j] = 0;
                else li[j] = 0.0f;
            }
        return;
    }
    float L = lse[r], lt = li[t];
    __syncthreads(); /* every thread has read li[t] before it is overwritten */
    if (threadIdx.x == 0) {
        loss_rows[r] = (double)L - (double)lt;
        labels_out[r] = t;
    }
    if (!grad) return;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        float gj = j == t ? qe_ce_grad_target(lt, L, scale) : qe_ce_grad(li[j], L, scale);
        if (glb) glb[(int64_t)r * V + j] = qe_f32_to_bf16(gj);
        else li[j] = gj;
    }
}

/* Σ loss over rows in row order (one thread): the call's total. */
__global__ void k_ce_total(const double *loss_rows, const int32_t *labels, int64_t N, double *out, unsigned long long *cnt) {
    double s = 0.0;
    unsigned long long c = 0;
    for (int64_t i = 0; i < N; i++)
        if (labels[i] != -100) {
            s += loss_rows[i];
            c++;
        }
    out[0] = s;
    cnt[0] = c;
}

static double cu_lm_head_ce(struct ag_ctx *ctx, const ag_ce_args *a, int64_t *n_count) {
    if (a->dw) { /* the config refuses lora_modules_to_save on cuda; never drop the gradient silently */
        fprintf(stderr, "[cuda] lm_head_ce: the gradient of a trainable LM head (lora_modules_to_save) is not "
                        "implemented on cuda\n");
        abort();
    }
    const int64_t N = a->N, D = a->D, V = a->V;
    if (a->w_shards) { /* FULL_SHARD's sharded head is a CPU-rank feature (device: cuda is refused at set-up) */
        fprintf(stderr, "[cuda] lm_head_ce: a head sharded over the ranks (FULL_SHARD) is not implemented on the device\n");
        abort();
    }
    ag_mark mk = ag_arena_mark(ctx);
    gemm_dtype dt = a->bf16 ? GEMM_BF16 : GEMM_F32;
    float *logits = (float *)ag_alloc(ctx, (size_t)CE_CHUNK * V * sizeof(float));
    uint16_t *glb = a->dh && a->bf16 ? (uint16_t *)ag_alloc(ctx, (size_t)CE_CHUNK * V * 2) : NULL;
    uint16_t *hb = a->bf16 ? (uint16_t *)ag_alloc(ctx, (size_t)CE_CHUNK * D * 2) : NULL;
    float *lse = (float *)ag_alloc(ctx, CE_CHUNK * sizeof(float));
    int32_t *tgt = (int32_t *)ag_alloc(ctx, (size_t)(N > 0 ? N : 1) * sizeof(int32_t));
    int32_t *labels = (int32_t *)ag_alloc(ctx, (size_t)(N > 0 ? N : 1) * sizeof(int32_t));
    double *loss_rows = (double *)ag_alloc(ctx, (size_t)(N > 0 ? N : 1) * sizeof(double));
    /* targets: given (host) or 0 for every row (the sampled mode overwrites them) */
    int32_t *ht = (int32_t *)malloc((size_t)(N > 0 ? N : 1) * sizeof(int32_t));
    if (!ht) {
        fprintf(stderr, "[cuda] lm_head_ce: out of host memory\n");
        abort();
    }
    for (int64_t i = 0; i < N; i++) ht[i] = a->targets ? a->targets[i] : 0;
    cu_copy_h2d(tgt, ht, (size_t)N * sizeof(int32_t));
    for (int64_t r0 = 0; r0 < N; r0 += CE_CHUNK) {
        int64_t c = N - r0 < CE_CHUNK ? N - r0 : CE_CHUNK;
        int any = 0;
        for (int64_t i = 0; i < c; i++) any |= ht[r0 + i] != -100;
        if (!any) { /* the CPU skips the chunk: labels -100, loss 0, dh untouched */
            k_ce_grad<<<(unsigned)c, RED_T, 0, G.stream>>>(logits, NULL, V, lse, tgt + r0, 0.0f, 0, loss_rows + r0,
                                                          labels + r0);
            KCHECK();
            continue;
        }
        const void *hop = a->h + r0 * D;
        if (hb) {
            cu_to_bf16(a->h + r0 * D, hb, c * D);
            hop = hb;
        }
        cu_gemm(0, 1, c, V, D, 1.0f, hop, D, a->w, D, 0.0f, logits, V, dt);
        k_ce_lse<<<(unsigned)c, RED_T, 0, G.stream>>>(logits, V, tgt + r0, lse);
        KCHECK();
        if (a->mode == AG_CE_SAMPLED) {
            k_ce_sample<<<(unsigned)((c + 31) / 32), 32, 0, G.stream>>>(logits, V, lse, tgt + r0, (int)c, r0, a->seed);
            KCHECK();
        }
        k_ce_grad<<<(unsigned)c, RED_T, 0, G.stream>>>(logits, glb, V, lse, tgt + r0, a->scale, a->dh != NULL,
                                                      loss_rows + r0, labels + r0);
        KCHECK();
        if (a->dh) {
            const void *lb = glb ? (const void *)glb : (const void *)logits;
            cu_gemm(0, 0, c, D, V, 1.0f, lb, V, a->w, D, 0.0f, a->dh + r0 * D, D, dt);
        }
    }
    free(ht);
    double total = 0.0;
    unsigned long long cnt = 0;
    if (N > 0) {
        k_ce_total<<<1, 1, 0, G.stream>>>(loss_rows, labels, N, G.dscratch, G.ucount);
        KCHECK();
        cu_copy_d2h(&total, G.dscratch, sizeof total);
        cu_copy_d2h(&cnt, G.ucount, sizeof cnt);
        if (a->labels) cu_copy_d2h(a->labels, labels, (size_t)N * sizeof(int32_t));
    }
    ag_arena_reset(ctx, mk);
    if (n_count) *n_count = (int64_t)cnt;
    return total;
}

/* ------------------------------------------------------------------ optimizers, clipping */

__global__ void k_adamw(float *p, const float *g, float *m, float *v, int64_t n, const uint8_t *mask, qe_adamw_c c) {
    GRID_LOOP(i, n) qe_adamw(&p[i], g[i], &m[i], &v[i], !mask || mask[i], &c);
}

static void cu_adamw_update(float *p, const float *g, float *m, float *v, int64_t n, const uint8_t *mask,
                            const ag_adamw_coef *co) {
    if (n <= 0) return;
    qe_adamw_c c = {co->decay, co->lerp_small, co->decay_f, co->lerp_coeff, co->beta2_f, co->one_minus_beta2_f,
                    co->bc2_sqrt_f, co->eps_f, co->neg_step_f};
    const uint8_t *dm = (const uint8_t *)dev_args(SLOT_MASK, mask, (size_t)n);
    k_adamw<<<nblocks(n, 256), 256, 0, G.stream>>>(p, g, m, v, n, dm, c);
    KCHECK();
}

__global__ void k_sophia(float *p, const float *g, float *m, const float *h, int64_t n, const uint8_t *mask,
                         qe_sophia_c c, unsigned long long *wins) {
    unsigned long long w = 0;
    GRID_LOOP(i, n) w += (unsigned long long)qe_sophia(&p[i], g[i], &m[i], h[i], !mask || mask[i], &c);
    if (w) atomicAdd(wins, w); /* an integer count: the same in any order */
}

static int64_t cu_sophia_update(float *p, const float *g, float *m, const float *h, int64_t n, const uint8_t *mask,
                                const ag_sophia_coef *co) {
    if (n <= 0) return 0;
    qe_sophia_c c = {co->decay_f, co->beta1_f, co->one_minus_beta1_f, co->rho_bs_f, co->eps_f, co->neg_lr_f};
    const uint8_t *dm = (const uint8_t *)dev_args(SLOT_MASK, mask, (size_t)n);
    CU(cudaMemsetAsync(G.ucount, 0, sizeof(unsigned long long), G.stream));
    k_sophia<<<nblocks(n, 256), 256, 0, G.stream>>>(p, g, m, h, n, dm, c, G.ucount);
    KCHECK();
    unsigned long long w = 0;
    cu_copy_d2h(&w, G.ucount, sizeof w);
    return (int64_t)w;
}

/* bitsandbytes' 8-bit blockwise AdamW and its 32-bit update (optim/adamw8bit.c; the CPU sequence is
 * backend_cpu_optim.inc's). One thread block per quantization block (blocksize <= 4096, checked by
 * optim/adamw8bit.c): each thread dequantizes, updates and keeps its elements' new moments in shared
 * memory; the block's absmax is a max (order-free, so the CPU's value exactly); then the moments are
 * quantized with the same 65536-bin tables (device copies made by the optimizer). The square root is
 * IEEE's (backend_cuda_elem.h says why): moments, absmax and codes are the CPU's bit for bit, a parameter
 * may differ where the CPU's torch-style root is one ulp off (tests/test_cuda_elem.cu bounds it). */
#define BW8_MAX_BLOCK 4096
#define BW8_THREADS 256

__global__ void __launch_bounds__(BW8_THREADS)
k_adamw8bit(float *p, const float *g, uint8_t *q1, uint8_t *q2, float *absmax1, float *absmax2, const float *qmap1,
            const float *qmap2, const uint8_t *lut1, const uint8_t *lut2, int64_t n, int blocksize, qe_adamw8bit_c c) {
    __shared__ float ms[BW8_MAX_BLOCK], vs[BW8_MAX_BLOCK];
    __shared__ float r1[BW8_THREADS], r2[BW8_THREADS];
    const int64_t b = blockIdx.x, i0 = b * (int64_t)blocksize;
    const int len = (int)(n - i0 < blocksize ? n - i0 : blocksize);
    const float s1 = absmax1[b], s2 = absmax2[b];
    float a1 = -FLT_MAX, a2 = -FLT_MAX; /* bw8_quantize_block's start */
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const int64_t i = i0 + j;
        float m = qmap1[q1[i]] * s1, v = qmap2[q2[i]] * s2;
        qe_bnb_moments(g[i], &m, &v, &c);
        p[i] = qe_adamw8bit_param(p[i], m, sqrtf(v), &c);
        ms[j] = m;
        vs[j] = v;
        a1 = fmaxf(a1, fabsf(m));
        a2 = fmaxf(a2, fabsf(v));
    }
    r1[threadIdx.x] = a1;
    r2[threadIdx.x] = a2;
    __syncthreads();
    for (int h = BW8_THREADS / 2; h > 0; h >>= 1) {
        if ((int)threadIdx.x < h) {
            r1[threadIdx.x] = fmaxf(r1[threadIdx.x], r1[threadIdx.x + h]);
            r2[threadIdx.x] = fmaxf(r2[threadIdx.x], r2[threadIdx.x + h]);
        }
        __syncthreads();
    }
    const float amax1 = r1[0], amax2 = r2[0];
    const float inv1 = 1.0f / amax1, inv2 = 1.0f / amax2;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        q1[i0 + j] = amax1 == 0.0f ? (uint8_t)0 : qe_bw8_index(lut1, ms[j], inv1);
        q2[i0 + j] = amax2 == 0.0f ? (uint8_t)0 : qe_bw8_index(lut2, vs[j], inv2);
    }
    if (threadIdx.x == 0) {
        absmax1[b] = amax1;
        absmax2[b] = amax2;
    }
}

static qe_adamw8bit_c qe_of(const ag_adamw8bit_coef *co) {
    qe_adamw8bit_c c = {co->decay,        co->decay_f,       co->beta1_f, co->one_minus_beta1_f, co->beta2_f,
                        co->one_minus_beta2_f, co->correction2_f, co->eps_f,   co->step8_f,          co->eps_c2_f,
                        co->step32_f};
    return c;
}

static void cu_adamw8bit_update(float *p, const float *g, uint8_t *q1, uint8_t *q2, float *absmax1, float *absmax2,
                                const float *qmap1, const float *qmap2, const uint8_t *lut1, const uint8_t *lut2,
                                int64_t n, int blocksize, const ag_adamw8bit_coef *co) {
    if (n <= 0) return;
    if (blocksize <= 0 || blocksize > BW8_MAX_BLOCK) {
        fprintf(stderr, "[cuda] adamw8bit_update: blocksize %d outside 1..%d\n", blocksize, BW8_MAX_BLOCK);
        abort();
    }
    const int64_t nb = (n + blocksize - 1) / blocksize;
    k_adamw8bit<<<(unsigned)nb, BW8_THREADS, 0, G.stream>>>(p, g, q1, q2, absmax1, absmax2, qmap1, qmap2, lut1, lut2,
                                                              n, blocksize, qe_of(co));
    KCHECK();
}

__global__ void k_adamw_bnb32(float *p, const float *g, float *m, float *v, int64_t n, qe_adamw8bit_c c) {
    GRID_LOOP(i, n) {
        float mi = m[i], vi = v[i];
        qe_bnb_moments(g[i], &mi, &vi, &c);
        p[i] = qe_adamw_bnb32_param(p[i], mi, sqrtf(vi), &c);
        m[i] = mi;
        v[i] = vi;
    }
}

static void cu_adamw_bnb32_update(float *p, const float *g, float *m, float *v, int64_t n, const ag_adamw8bit_coef *co) {
    if (n <= 0) return;
    k_adamw_bnb32<<<nblocks(n, 256), 256, 0, G.stream>>>(p, g, m, v, n, qe_of(co));
    KCHECK();
}

__global__ void k_sophia_hessian(float *h, const float *g, int64_t n, float b2, float omb2) {
    GRID_LOOP(i, n) h[i] = qe_sophia_hessian(h[i], g[i], b2, omb2);
}

static void cu_sophia_hessian(float *h, const float *ghat, int64_t n, float beta2_f, float one_minus_beta2_f) {
    if (n <= 0) return;
    k_sophia_hessian<<<nblocks(n, 256), 256, 0, G.stream>>>(h, ghat, n, beta2_f, one_minus_beta2_f);
    KCHECK();
}

/* The CPU's sum of squares exactly: the same chunks, each chunk's 8 lane accumulators (one
 * thread per lane, sequential), the CPU's pairing of the lanes, the chunk sums in order. */
__global__ void k_sumsq_lanes(const float *x, int64_t n, int64_t nchunks, int64_t chunk, double *lanes) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= nchunks * 8) return;
    int64_t c = t / 8;
    int l = (int)(t % 8);
    int64_t i0 = c * chunk;
    int64_t len = i0 >= n ? 0 : (n - i0 < chunk ? n - i0 : chunk);
    lanes[t] = qe_sumsq_lane(x + i0, len, l);
}

__global__ void k_sumsq_total(const double *lanes, int64_t nchunks, double *out) {
    double total = 0.0;
    for (int64_t c = 0; c < nchunks; c++) total += qe_sumsq_combine(lanes + c * 8);
    out[0] = total;
}

static double cu_sum_squares(const float *x, int64_t n) {
    if (n <= 0) return 0.0;
    int64_t nchunks = qe_sumsq_nchunks(n);
    int64_t chunk = (n + nchunks - 1) / nchunks;
    static double *d_lanes; /* 256 chunks x 8 lanes */
    if (!d_lanes) CU(cudaMalloc((void **)&d_lanes, QE_CLIP_MAX_CHUNKS * 8 * sizeof(double)));
    k_sumsq_lanes<<<(unsigned)((nchunks * 8 + 127) / 128), 128, 0, G.stream>>>(x, n, nchunks, chunk, d_lanes);
    KCHECK();
    k_sumsq_total<<<1, 1, 0, G.stream>>>(d_lanes, nchunks, G.dscratch);
    KCHECK();
    double r = 0.0;
    cu_copy_d2h(&r, G.dscratch, sizeof r);
    return r;
}

__global__ void k_nonfinite(const float *x, int64_t n, unsigned long long *cnt) {
    unsigned long long c = 0;
    GRID_LOOP(i, n) c += !isfinite(x[i]);
    if (c) atomicAdd(cnt, c);
}

/* fp16 mode's operand rounding (backend.h round_f16): __float2half_rn, round to nearest even as the CPU's. */
__global__ void k_round_f16(const float *s, float *d, int64_t n) {
    GRID_LOOP(i, n) d[i] = __half2float(__float2half_rn(s[i]));
}

static void cu_round_f16(const float *src, float *dst, int64_t n) {
    if (n <= 0) return;
    k_round_f16<<<nblocks(n, 256), 256, 0, G.stream>>>(src, dst, n);
    KCHECK();
}

static int64_t cu_count_nonfinite(const float *x, int64_t n) {
    if (n <= 0) return 0;
    CU(cudaMemsetAsync(G.ucount, 0, sizeof(unsigned long long), G.stream));
    k_nonfinite<<<nblocks(n, 256), 256, 0, G.stream>>>(x, n, G.ucount);
    KCHECK();
    unsigned long long c = 0;
    cu_copy_d2h(&c, G.ucount, sizeof c);
    return (int64_t)c;
}

/* ------------------------------------------------------------------ the table */

extern "C" const ag_backend ag_backend_cuda = {
    "cuda",
    0, /* host_data */
    cu_alloc,
    cu_free,
    cu_copy_h2d,
    cu_copy_d2h,
    cu_copy_d2d,
    cu_zero,
    cu_fill_f32,
    cu_sync,
    cu_gemm,
    cu_gemm, /* lora_gemm: the LoRA products through cuBLASLt as every product */
    cu_frozen_rows_f32,
    cu_frozen_rows_bf16,
    NULL, /* frozen_t_bf16: cuBLASLt takes op(B) = W transposed in its kernel (CUBLAS_OP_T), no copy */
    cu_frozen_data,
    cu_to_bf16,
    cu_dropout_fwd,
    cu_dropout_bwd,
    cu_embedding,
    cu_rmsnorm_fwd,
    cu_rmsnorm_bwd,
    cu_rope_fwd,
    cu_rope_bwd,
    cu_attention_fwd,
    cu_attention_bwd,
    cu_attention_cached,
    cu_swiglu_fwd,
    cu_swiglu_bwd,
    cu_geglu_fwd,
    cu_geglu_bwd,
    cu_add,
    cu_add_bwd,
    cu_axpy,
    cu_copy_cols,
    cu_lm_head_ce,
    cu_adamw_update,
    cu_sophia_update,
    cu_adamw8bit_update,
    cu_adamw_bnb32_update,
    cu_sophia_hessian,
    cu_sum_squares,
    cu_scale,
    cu_count_nonfinite,
    cu_embedding_bwd, /* compiled and checked against the CPU (test_backend_ops); lora_modules_to_save
                       * itself is refused on cuda (trainer/run.c: the LM head's gradient is CPU-only) */
    cu_host_alloc,
    cu_host_free,
    cu_offload_start,
    cu_offload_wait,
    cu_round_f16, /* compiled and checked against the CPU (test_backend_ops); fp16 itself is refused on cuda */
};
