// make bench-kernels: the kernel-optimization lesson, with this machine's numbers.
//
// One int8 matmul, a Llama 2 7B feed-forward matrix (w1: 11008 x 4096, group
// size 64), computed by one technique after another. Each result is checked
// against runq.cpp's matmul_reference before it is timed (bit for bit: the
// group sums are exact integers and the float side is the same code), then
// the table gives total and per-call time, GOP/s (2 n d operations per token)
// and the weight bytes streamed per second. The rows named "runq's matmul" are
// runq.cpp's own matmul, not a copy: for one token, four rows side by side
// (rows4_i8 with AVX-512 VNNI); for a block of kBlock tokens, as when a prompt is
// read, 16 rows in the lanes of a register (gemm16), per token. The rows before
// each show what that step replaced: one row at a time, and four tokens per
// weight load. Then the same matrix with int4 weights (version 3, group size 32).

#define RUN_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../runq.cpp"

#include "timing.h"
#include <random>

#ifdef _OPENMP
#include <omp.h>
#endif

constexpr int kN = 4096, kD = 11008, kGS = 64;

// At -O3 the compiler turns plain loops like matmul_reference's into SIMD code
// by itself. To see what each technique buys on its own, the scalar rows are
// compiled with the auto-vectorizer off.
#if defined(__clang__)
#define SCALAR __attribute__((noinline))
#define SCALAR_LOOP _Pragma("clang loop vectorize(disable) interleave(disable)")
#else
#define SCALAR __attribute__((noinline, optimize("no-tree-vectorize")))
#define SCALAR_LOOP
#endif

// The reference's loops, one thread, no SIMD.
SCALAR static void matmul_scalar(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d) {
    const int gs = w.group_size, groups = n / gs;
    for (int i = 0; i < d; i++) {
        float acc = 0.0f;
        for (int g = 0; g < groups; g++) {
            int32_t dot = 0;
            SCALAR_LOOP
            for (int j = g * gs; j < (g + 1) * gs; j++) dot += (int32_t)x.q[j] * w.q[(size_t)i * n + j];
            acc = add_group(acc, dot, x.s[g], w.s[(size_t)i * groups + g]);
        }
        out[i] = acc;
    }
}

// Loop unrolling: four independent int32 sums per group, so the adds do not
// wait on each other, and a quarter of the loop overhead. One thread, no SIMD.
SCALAR static void matmul_unrolled(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d) {
    const int gs = w.group_size, groups = n / gs;
    for (int i = 0; i < d; i++) {
        const int8_t* row = w.q + (size_t)i * n;
        float acc = 0.0f;
        for (int g = 0; g < groups; g++) {
            int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            SCALAR_LOOP
            for (int j = g * gs; j < (g + 1) * gs; j += 4) {
                s0 += x.q[j] * row[j];
                s1 += x.q[j + 1] * row[j + 1];
                s2 += x.q[j + 2] * row[j + 2];
                s3 += x.q[j + 3] * row[j + 3];
            }
            acc = add_group(acc, s0 + s1 + s2 + s3, x.s[g], w.s[(size_t)i * groups + g]);
        }
        out[i] = acc;
    }
}

// Runs kernel on this thread's share of the rows: multithreading for any of them.
template <typename Kernel>
static void on_all_cores(Kernel kernel, float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n,
                         int d) {
    #pragma omp parallel
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
#endif
        const int begin = (int)((long)d * t / nt), end = (int)((long)d * (t + 1) / nt);
        kernel(out + begin, x, {w.q + (size_t)begin * n, w.s + (size_t)begin * (n / w.group_size), w.group_size},
               n, end - begin);
    }
}

// SIMD: runq's dot_i8 (AVX-512 / AVX2 multiply-adds) per group, one thread,
// the group size read at run time.
static void matmul_simd(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d) {
    const int gs = w.group_size, groups = n / gs;
    for (int i = 0; i < d; i++) {
        const int8_t* row = w.q + (size_t)i * n;
        float acc = 0.0f;
        for (int g = 0; g < groups; g++)
            acc = add_group(acc, dot_i8(x.q + g * gs, row + g * gs, gs), x.s[g], w.s[(size_t)i * groups + g]);
        out[i] = acc;
    }
}

// runq's matmul without its 16-row prompt kernel (gemm16): tiles of four rows
// by matmul_rows. GS = 0 reads the group size at run time, which also leaves
// out the decode kernels that need it fixed: each row's groups then go one
// after another (dot_i8 or dot_i4 per group, each multiply-add waiting on the last).
template <int GS>
static void four_rows_at_a_time(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb) {
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < (d + 3) / 4; t++) matmul_rows<GS>(out, x, w, n, d, nb, 4 * t, std::min(d, 4 * t + 4));
}

int main() {
    std::mt19937 rng(7);
    std::vector<float> xf(kBlock * (size_t)kN), wf((size_t)kD * kN);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : xf) v = normal(rng);
    for (float& v : wf) v = normal(rng) * 0.02f;
    QuantizedBuffer x(kBlock, kN, kGS), w(kD, kN, kGS);
    quantize(x.t, xf.data(), kBlock, kN);
    quantize(w.t, wf.data(), kD, kN);

    // int4 weights: random nibbles and scales (the speed does not depend on the values)
    constexpr int kGS4 = 32;
    QuantizedBuffer x4(kBlock, kN, kGS4);
    quantize(x4.t, xf.data(), kBlock, kN);
    std::vector<int8_t> w4q((size_t)kD * kN / 2);
    std::vector<float> w4s((size_t)kD * kN / kGS4);
    for (int8_t& b : w4q) b = (int8_t)rng();
    for (float& v : w4s) v = 0.003f * (1.0f + normal(rng) * 0.1f);
    const QuantizedTensor w4{w4q.data(), w4s.data(), kGS4, 4};
    std::vector<float> out((size_t)kBlock * kD);

    struct Technique {
        const char* name;
        std::function<void(float*)> run;
        int tokens;                    // per call
        const QuantizedTensor *x, *w;  // for the check and the bytes
    };
    const QuantizedTensor &xt = x.t, &wt = w.t, &x4t = x4.t;
    const auto int8 = [&](const char* name, std::function<void(float*)> run, int tokens = 1) {
        return Technique{name, run, tokens, &xt, &wt};
    };
    const auto int4 = [&](const char* name, std::function<void(float*)> run, int tokens = 1) {
        return Technique{name, run, tokens, &x4t, &w4};
    };
    const Technique techniques[] = {
        int8("reference (plain loops, no SIMD, one thread)", [&](float* o) { matmul_scalar(o, xt, wt, kN, kD); }),
        int8("loop unrolling", [&](float* o) { matmul_unrolled(o, xt, wt, kN, kD); }),
        int8("multithreading", [&](float* o) { on_all_cores(matmul_scalar, o, xt, wt, kN, kD); }),
        int8("multithreading + unrolling", [&](float* o) { on_all_cores(matmul_unrolled, o, xt, wt, kN, kD); }),
        int8("SIMD (explicit, one thread)", [&](float* o) { matmul_simd(o, xt, wt, kN, kD); }),
        int8("plain loops as the compiler vectorizes them", [&](float* o) { matmul_reference(o, xt, wt, kN, kD, 1); }),
        int8("threads + SIMD, one row at a time (dot_i8 per group)",
             [&](float* o) { four_rows_at_a_time<0>(o, xt, wt, kN, kD, 1); }),
        int8("all: runq's matmul (four rows side by side, VNNI, prefetch)", [&](float* o) { matmul(o, xt, wt, kN, kD, 1); }),
        int8("batched (a prompt block per call): four tokens per weight load",
             [&](float* o) { four_rows_at_a_time<kGS>(o, xt, wt, kN, kD, kBlock); }, kBlock),
        int8("batched: runq's matmul (16 rows in the lanes, gemm16)", [&](float* o) { matmul(o, xt, wt, kN, kD, kBlock); }, kBlock),
        int4("int4: one row at a time (threads, SIMD)", [&](float* o) { four_rows_at_a_time<0>(o, x4t, w4, kN, kD, 1); }),
        int4("int4: runq's matmul (four rows side by side, prefetch)", [&](float* o) { matmul(o, x4t, w4, kN, kD, 1); }),
        int4("int4, batched: four tokens per weight load",
             [&](float* o) { four_rows_at_a_time<kGS4>(o, x4t, w4, kN, kD, kBlock); }, kBlock),
        int4("int4, batched: runq's matmul (gemm16)", [&](float* o) { matmul(o, x4t, w4, kN, kD, kBlock); }, kBlock),
    };

    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    std::printf("matmul %d x %d, int8 (group size %d), then int4 (group size %d); %d threads; batched: %d tokens "
                "per call; each checked against the reference\n\n", kD, kN, kGS, kGS4, threads, kBlock);
    std::printf("| technique | calls | total ms | ms per token | GOP/s | weight GB/s | speed-up |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
    double base = 0;
    for (const Technique& t : techniques) {
        std::fill(out.begin(), out.end(), 0.0f);
        t.run(out.data());  // also the warm-up
        for (int b = 0; b < t.tokens; b++) {
            // token b of a batch has its own activations
            std::vector<float> one(kD);
            matmul_reference(one.data(), t.x->row(b, kN), *t.w, kN, kD, 1);
            if (std::memcmp(one.data(), out.data() + (size_t)b * kD, kD * sizeof(float)) != 0)
                fatal("%s: token %d differs from the reference", t.name, b);
        }
        const auto [calls, elapsed] = time_calls([&] { t.run(out.data()); });
        const double per_token = elapsed / calls / t.tokens;
        if (base == 0) base = per_token;
        std::printf("| %s | %d | %.0f | %.3f | %.1f | %.1f | %.1fx |\n", t.name, calls, elapsed * 1e3,
                    per_token * 1e3, 2.0 * kN * kD / per_token / 1e9,
                    (double)kD * (t.w->row_bytes(kN) + 4.0 * t.w->groups(kN)) / (elapsed / calls) / 1e9,
                    base / per_token);
    }
    return 0;
}
