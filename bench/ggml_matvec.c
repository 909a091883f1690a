// ggml_matvec: time llama.cpp's own CPU kernel for out = W x on given tensor bytes.
//
// Why: moeedge's native kernels (moeedge._core.linear_*) claim to be on par with llama.cpp's
// CPU kernels on the same tensor. bench/ggml_compare.py compiles this file against the
// libggml of a llama.cpp build, hands it the very bytes it gives moeedge, and compares the
// time and the output. It is a bench helper, not part of the package.
//
// usage: ggml_matvec FORMAT ROWS COLS T THREADS REPS W_FILE X_FILE OUT_FILE [plain|repack]
//   FORMAT  q8_0 | q4_0 | q4_k | q5_k | q6_k | bf16; W_FILE holds the raw GGUF blocks of W [ROWS, COLS]
//   X_FILE  float32 [T, COLS]; OUT_FILE receives float32 [T, ROWS] (after the last repetition)
//   plain   W in an ordinary CPU buffer: ggml_mul_mat goes through the type's vec_dot
//           (T = 1), llamafile's sgemm (T >= 2: q8_0, q4_0, bf16) or the tiled K-quant path
//           (T >= 8: the K-quants), whichever this ggml picks.
//   repack  W in the CPU_REPACK buffer type, as llama.cpp loads weights by default: on AVX2
//           Q4_0 and Q4_K are repacked to 8x8 interleaved blocks with their own gemv/gemm.
//           Exits 3 when this ggml has no repacked layout for FORMAT on this CPU.
// Prints "times_ms t1 t2 ..." (each call, after one warm-up call) and "median_ms m".
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void * a, const void * b) {
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static void * read_file(const char * path, size_t expected) {
    FILE * f = fopen(path, "rb");
    if (!f) { perror(path); exit(1); }
    void * buf = malloc(expected + 1);
    size_t got = fread(buf, 1, expected + 1, f);
    fclose(f);
    if (got != expected) {
        fprintf(stderr, "%s: %zu bytes, expected %zu\n", path, got, expected);
        exit(1);
    }
    return buf;
}

// The CPU device's extra buffer type named `name` (e.g. "CPU_REPACK"), or NULL.
static ggml_backend_buffer_type_t cpu_extra_buft(const char * name) {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_get_extra_bufts_t get =
        (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get) return NULL;
    for (ggml_backend_buffer_type_t * b = get(ggml_backend_reg_dev_get(reg, 0)); b && *b; b++) {
        if (strcmp(ggml_backend_buft_name(*b), name) == 0) return *b;
    }
    return NULL;
}

int main(int argc, char ** argv) {
    if (argc < 10 || argc > 11) {
        fprintf(stderr, "usage: %s FORMAT ROWS COLS T THREADS REPS W_FILE X_FILE OUT_FILE [plain|repack]\n", argv[0]);
        return 1;
    }
    const char * fmt = argv[1];
    const int64_t rows = atoll(argv[2]), cols = atoll(argv[3]), T = atoll(argv[4]);
    const int threads = atoi(argv[5]), reps = atoi(argv[6]);
    const int repack = argc == 11 && strcmp(argv[10], "repack") == 0;
    if (argc == 11 && !repack && strcmp(argv[10], "plain") != 0) { fprintf(stderr, "mode: plain or repack\n"); return 1; }

    enum ggml_type type;
    if      (strcmp(fmt, "q8_0") == 0) type = GGML_TYPE_Q8_0;
    else if (strcmp(fmt, "q4_0") == 0) type = GGML_TYPE_Q4_0;
    else if (strcmp(fmt, "q4_k") == 0) type = GGML_TYPE_Q4_K;
    else if (strcmp(fmt, "q5_k") == 0) type = GGML_TYPE_Q5_K;
    else if (strcmp(fmt, "q6_k") == 0) type = GGML_TYPE_Q6_K;
    else if (strcmp(fmt, "bf16") == 0) type = GGML_TYPE_BF16;
    else { fprintf(stderr, "unknown format %s\n", fmt); return 1; }
    if (rows <= 0 || T <= 0 || threads <= 0 || reps <= 0 || cols % ggml_blck_size(type) != 0) {
        fprintf(stderr, "bad sizes\n");
        return 1;
    }

    ggml_cpu_init();
    ggml_backend_buffer_type_t w_buft = ggml_backend_cpu_buffer_type();
    if (repack && !(w_buft = cpu_extra_buft("CPU_REPACK"))) { fprintf(stderr, "no CPU_REPACK buffer type\n"); return 3; }

    // Tensors live in backend buffers (not in a no_alloc=false context) because the repack
    // layout is chosen and applied by its buffer type: ggml_backend_tensor_set repacks.
    struct ggml_init_params ip = { 16 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, /*no_alloc=*/true };
    struct ggml_context * ctx_w = ggml_init(ip), * ctx = ggml_init(ip);
    struct ggml_tensor * W = ggml_new_tensor_2d(ctx_w, type, cols, rows);        // ne = [cols, rows]
    struct ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cols, T);
    struct ggml_tensor * out = ggml_mul_mat(ctx, W, x);                           // ne = [rows, T]
    ggml_backend_buffer_t buf_w = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, w_buft);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
    if (!buf_w || !buf) { fprintf(stderr, "buffer allocation failed\n"); return 1; }
    if (repack && W->extra == NULL) {  // the repack buffer found no layout for this type/shape/CPU
        fprintf(stderr, "no repacked layout for %s on this CPU\n", fmt);
        return 3;
    }

    void * wbytes = read_file(argv[7], ggml_nbytes(W));
    void * xbytes = read_file(argv[8], ggml_nbytes(x));
    ggml_backend_tensor_set(W, wbytes, 0, ggml_nbytes(W));
    ggml_backend_tensor_set(x, xbytes, 0, ggml_nbytes(x));
    free(wbytes);
    free(xbytes);

    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    struct ggml_cplan plan = ggml_graph_plan(gf, threads, NULL);
    plan.work_data = plan.work_size ? aligned_alloc(64, (plan.work_size + 63) / 64 * 64) : NULL;

    double * times = malloc(sizeof(double) * reps);
    for (int r = -1; r < reps; r++) {  // r = -1: warm-up
        double t0 = now_ms();
        if (ggml_graph_compute(gf, &plan) != GGML_STATUS_SUCCESS) { fprintf(stderr, "compute failed\n"); return 1; }
        if (r >= 0) times[r] = now_ms() - t0;
    }

    printf("times_ms");
    for (int r = 0; r < reps; r++) printf(" %.5f", times[r]);
    qsort(times, reps, sizeof(double), cmp_double);
    printf("\nmedian_ms %.5f\n", reps % 2 ? times[reps / 2] : (times[reps / 2 - 1] + times[reps / 2]) / 2);

    FILE * f = fopen(argv[9], "wb");
    if (!f || fwrite(out->data, 1, ggml_nbytes(out), f) != ggml_nbytes(out)) { perror(argv[9]); return 1; }
    fclose(f);

    free(times);
    free(plan.work_data);
    ggml_backend_buffer_free(buf_w);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx_w);
    ggml_free(ctx);
    return 0;
}
