// The bench-kernels tables' timing, shared by bench/kernels.cpp and
// bench/kernels_f32.cpp (included after run.cpp or runq.cpp, for now_seconds).
#pragma once
#include <functional>

// Calls run again and again, for at least a second and three calls (the first
// call, the warm-up, is the caller's): how many calls, in how many seconds.
struct Timed {
    int calls;
    double seconds;
};
static Timed time_calls(const std::function<void()>& run) {
    int calls = 0;
    const double start = now_seconds();
    double elapsed = 0;
    while (elapsed < 1.0 || calls < 3) {
        run();
        calls++;
        elapsed = now_seconds() - start;
    }
    return {calls, elapsed};
}
