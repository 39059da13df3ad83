// The unit tests' harness: CHECK(cond, printf-style message) counts and reports
// failures; finish() prints "N passed, N failed" and returns the exit status.
#pragma once

#include <cstdio>
#include <random>
#include <vector>

static int g_passed = 0, g_failed = 0;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (cond) {                                                       \
            g_passed++;                                                   \
        } else {                                                          \
            g_failed++;                                                   \
            std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            std::printf(__VA_ARGS__);                                     \
            std::printf("\n");                                            \
        }                                                                 \
    } while (0)

static int finish() {
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}

constexpr double u = 1.0 / (1 << 24);  // float unit roundoff
static std::mt19937 rng(1234);         // fixed seed: every run tests the same values

static std::vector<float> random_floats(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (float& f : v) f = d(rng);
    return v;
}
