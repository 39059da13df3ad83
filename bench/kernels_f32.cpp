// make bench-kernels, fp32 part: run.cpp's matmul, technique by technique.
//
// One fp32 matmul, the same Llama 2 7B feed-forward matrix as bench/kernels.cpp
// (w1: 11008 x 4096), for one token (decoding) and for a block of kBlock tokens
// (a prompt). Every technique computes each sum in the reference's order (w[i, 0]
// x[0] first, one fused multiply-add per term), so each result is checked bit for
// bit against run.cpp's matmul_reference before it is timed. The rows named
// "run's matmul" are run.cpp's own matmul, not a copy.

#define RUN_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../run.cpp"

#include "timing.h"
#include <random>

#ifdef _OPENMP
#include <omp.h>
#endif

constexpr int kN = 4096, kD = 11008;

// The plain loops on this thread's share of the rows: multithreading alone.
static void reference_on_all_cores(float* out, const float* x, const float* w, int n, int d) {
    #pragma omp parallel
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
#endif
        rows_reference(out, x, w, n, d, 1, (int)((long)d * t / nt), (int)((long)d * (t + 1) / nt));
    }
}

// 16 rows in the lanes, W's rows read where they lie in the file (16 streams),
// each 16 x 16 block turned over in registers (transpose16: 64 permutes with
// AVX-512) before its 16 columns' madds; one thread. What the panels save.
static void rows_transposed_one_thread(float* out, const float* x, const float* w, int n, int d) {
    for (int i = 0; i + kPanel <= d; i += kPanel) {
        f32x16 acc = {};
        for (int j = 0; j + 16 <= n; j += 16) {  // (kN is a multiple of 16)
            f32x16 block[16];
            for (int r = 0; r < 16; r++) load16(block[r], w + (size_t)(i + r) * n + j);
            transpose16(block);  // block[c]: column j + c of the 16 rows
            for (int c = 0; c < 16; c++) madd16(acc, block[c], x[j + c] - f32x16{});
        }
        std::memcpy(out + i, &acc, sizeof acc);
    }
}

// 16 rows in the lanes (panel_token, on W as panels), one thread: SIMD without threads.
static void panels_one_thread(float* out, const float* x, const float* wp, int n, int d) {
    for (int i = 0; i + kPanel <= d; i += kPanel) panel_token(out + i, panel_row(wp, i, n), x, n);
}

// A block with tokens in the lanes, one thread: run's prompt kernel without threads.
static void tokens_one_thread(float* out, const float* x, float* xt, const float* w, int n, int d, int nb) {
    transpose_tokens(xt, x, n, nb);
    for (int t = 0; t < tiles(d); t++) matmul_tile(out, x, xt, w, n, d, nb, t);
}

int main() {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(kBlock * (size_t)kN), w((size_t)kD * kN), xt(kBlock * (size_t)kN);
    for (float& v : x) v = normal(rng);
    for (float& v : w) v = normal(rng) * 0.02f;
    std::vector<float> out((size_t)kBlock * kD), one(kD);

    struct Technique {
        const char* name;
        std::function<void(float*)> run;
        int tokens;  // per call
    };
    std::vector<float> wp(panel_rows(kD) * kN);  // W as panels, as run packs it at load
    pack_panels(wp.data(), w.data(), 1, kD, kN);
    const float *X = x.data(), *W = w.data(), *WP = wp.data();
    float* XT = xt.data();
    const Technique techniques[] = {
        {"reference (plain loops: each madd waits on the last, one thread)",
         [&](float* o) { rows_reference(o, X, W, kN, kD, 1, 0, kD); }, 1},
        {"multithreading", [&](float* o) { reference_on_all_cores(o, X, W, kN, kD); }, 1},
        {"SIMD: 16 rows in the lanes, rows as they lie (16 x 16 transposes), one thread",
         [&](float* o) { rows_transposed_one_thread(o, X, W, kN, kD); }, 1},
        {"SIMD: 16 rows in the lanes, W as panels (panel_token), one thread",
         [&](float* o) { panels_one_thread(o, X, WP, kN, kD); }, 1},
        {"all: run's matmul (16 rows in the lanes, threads)", [&](float* o) { matmul(o, X, WP, kN, kD, 1, nullptr); }, 1},
        {"batched (a prompt block per call): tokens in the lanes, one thread",
         [&](float* o) { tokens_one_thread(o, X, XT, WP, kN, kD, kBlock); }, kBlock},
        {"batched: run's matmul (8 rows x 48 tokens in registers, threads)",
         [&](float* o) { matmul(o, X, WP, kN, kD, kBlock, XT); }, kBlock},
    };

    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    std::printf("matmul %d x %d, fp32; %d threads; batched: %d tokens per call; each checked against the reference\n\n",
                kD, kN, threads, kBlock);
    std::printf("| technique | calls | total ms | ms per token | GFLOP/s | weight GB/s | speed-up |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
    double base = 0;
    for (const Technique& t : techniques) {
        std::fill(out.begin(), out.end(), 0.0f);
        t.run(out.data());  // also the warm-up
        for (int b : {0, 1, 47, 48, t.tokens - 1}) {  // around a pass of 48 tokens, and the last
            if (b >= t.tokens) continue;
            matmul_reference(one.data(), X + (size_t)b * kN, W, kN, kD, 1);
            if (std::memcmp(one.data(), out.data() + (size_t)b * kD, kD * sizeof(float)) != 0)
                fatal("%s: token %d differs from the reference", t.name, b);
        }
        const auto [calls, elapsed] = time_calls([&] { t.run(out.data()); });
        const double per_token = elapsed / calls / t.tokens;
        if (base == 0) base = per_token;
        std::printf("| %s | %d | %.0f | %.3f | %.1f | %.1f | %.1fx |\n", t.name, calls, elapsed * 1e3, per_token * 1e3,
                    2.0 * kN * kD / per_token / 1e9, 4.0 * kD * kN / (elapsed / calls) / 1e9, base / per_token);
    }
    return 0;
}
