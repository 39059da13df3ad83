// bandwidth: the machine's memory read bandwidth, for `make bench` to compare
// the engines' GB/s against. Sums a 1 GiB buffer (far larger than any cache)
// as 64-bit integers, which the compiler vectorizes, and prints the best of 5
// passes for 1 thread and for all threads:  "threads N GB/s X".

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

int main() {
    const size_t n = (size_t)1 << 27;  // 2^27 uint64 = 1 GiB
    std::vector<uint64_t> buf(n);
    for (size_t i = 0; i < n; i++) buf[i] = i;  // touch every page before timing
    int max_threads = 1;
#ifdef _OPENMP
    max_threads = omp_get_max_threads();
#endif
    uint64_t sink = 0;
    for (int threads : {1, max_threads}) {
        double best = 0;
        for (int rep = 0; rep < 5; rep++) {
            const auto t0 = std::chrono::steady_clock::now();
            uint64_t sum = 0;
            #pragma omp parallel for reduction(+ : sum) num_threads(threads) schedule(static)
            for (size_t i = 0; i < n; i++) sum += buf[i];
            const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            sink += sum;
            best = std::max(best, n * sizeof(uint64_t) / s / 1e9);
        }
        std::printf("threads %d GB/s %.1f\n", threads, best);
        if (max_threads == 1) break;
    }
    return sink == 42;  // keeps the sums alive
}
