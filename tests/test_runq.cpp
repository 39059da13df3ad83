// Unit tests for runq.cpp's kernels: quantize / dequantize against their
// error bound, 4-bit unpacking, and the fast matmul (int8 and int4 weights)
// against the scalar reference, which must agree exactly (the dot products are integer arithmetic, and the float side
// is the same code in the same order). The kernels run.cpp shares are tested
// in test_run.cpp. Prints "N passed, N failed" and exits 1 on any failure.

#define RUN_NO_MAIN
// the CLI half of runq.cpp is tested end to end, not here
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../runq.cpp"

#include "check.h"

// The compiled-in group sizes, and others that take the generic path.
static const int kGroupSizes[] = {32, 64, 128, 1, 4, 12, 48, 96, 100, 256};

static void test_quantize() {
    for (int gs : kGroupSizes) {
        const int n = gs * 5;
        std::vector<float> x = random_floats(n, -3, 3);
        for (int i = gs; i < 2 * gs; i++) x[i] = 0.0f;  // group 1: all zeros
        x[3 * gs] = 1e-30f;                             // group 3: tiny values
        std::vector<int8_t> q(n);
        std::vector<float> s(n / gs), back(n);
        std::vector<int32_t> offsets(n / gs);
        QuantizedTensor t{q.data(), s.data(), gs, 8, offsets.data()};
        quantize(t, x.data(), 1, n);
        dequantize(t, back.data(), n);
        bool sums = true;
        for (int g = 0; g < n / gs; g++) {
            int32_t sum = 0;
            for (int i = g * gs; i < (g + 1) * gs; i++) sum += q[i];
            sums = sums && offsets[g] == -128 * sum;
        }
        CHECK(sums, "gs=%d: quantize's offsets are -128 * each group's sum", gs);
        double worst = 0;
        int out_of_range = 0, nans = 0;
        for (int i = 0; i < n; i++) {
            const double step = s[i / gs];
            const double bound = step / 2 * (1 + 2 * u) + 2 * u * std::fabs(x[i]);
            worst = std::max(worst, std::fabs(back[i] - x[i]) / (bound > 0 ? bound : 1e-300));
            out_of_range += q[i] == -128;  // the only int8 outside [-127, 127]
            nans += std::isnan(back[i]);
        }
        CHECK(worst <= 1.0, "gs=%d: dequantize(quantize(x)) is %.2f x half a step away", gs, worst);
        CHECK(out_of_range == 0 && nans == 0, "gs=%d: %d values outside [-127, 127], %d NaN", gs, out_of_range, nans);
        // a NaN or infinity makes its group's scale NaN (values 0), so it reaches the output
        for (float bad : {NAN, INFINITY, -INFINITY}) {
            std::vector<float> y = x;
            y[2 * gs + gs / 2] = bad;
            quantize(t, y.data(), 1, n);
            CHECK(std::isnan(s[2]) && q[2 * gs] == 0 && !std::isnan(s[0]), "gs=%d: %g in group 2 gives scale %g",
                  gs, bad, s[2]);
        }
        // a subnormal group, whose scale vmax / 127 is too coarse to keep v / scale
        // within 127 (found by fuzzing; the sanitizer build flags the bad cast):
        // values stay in [-127, 127] and keep their sign
        for (float tiny : {1.8e-43f, 3e-44f, 1e-45f}) {
            std::vector<float> y(n, 0.0f);
            for (int i = 0; i < gs; i++) y[i] = tiny * (i % 2 ? -1.0f : 1.0f) * (float)(gs - i) / gs;
            quantize(t, y.data(), 1, n);
            bool ok = true;
            for (int i = 0; i < gs; i++) ok = ok && q[i] != -128 && q[i] * y[i] >= 0;
            CHECK(ok, "gs=%d: subnormal group of max %g", gs, tiny);
        }
        // one rounding rule for the activations and the KV cache: quantize is
        // quantize_group, group by group (ties included: x = 2.5 at scale 1)
        {
            std::vector<float> y = x;
            y[4 * gs] = 127.0f;
            if (gs > 1) y[4 * gs + 1] = 2.5f;
            quantize(t, y.data(), 1, n);
            std::vector<int8_t> q2(n);
            bool same = true;
            for (int g = 0; g < n / gs; g++) same = same && quantize_group(q2.data() + g * gs, y.data() + g * gs, gs) == s[g];
            CHECK(same && q == q2 && (gs == 1 || q[4 * gs + 1] == 2), "gs=%d: quantize is quantize_group per group", gs);
        }
        quantize(t, x.data(), 1, n);
        bool zero_group = s[1] == 0.0f;
        for (int i = gs; i < 2 * gs; i++) zero_group = zero_group && q[i] == 0 && back[i] == 0.0f;
        CHECK(zero_group, "gs=%d: a group of zeros stays zero with scale 0", gs);
        // the largest magnitude of each group maps to +-127
        for (int g = 0; g < n / gs; g++) {
            if (g == 1) continue;
            int qmax = 0;
            for (int i = g * gs; i < (g + 1) * gs; i++) qmax = std::max(qmax, std::abs((int)q[i]));
            CHECK(qmax == 127, "gs=%d group %d: max |q| is %d", gs, g, qmax);
        }
    }
}

// Rows whose length group_size does not divide end in a shorter group, with a
// scale of its own: every group's largest magnitude maps to +-127, and no
// group reaches into the next row.
static void test_quantize_short_groups() {
    for (int gs : {2, 5, 32, 64})
        for (int n : {gs + 1, 3 * gs - 1, 2 * gs + gs / 2}) {
            const int rows = 3, groups = (n + gs - 1) / gs;
            std::vector<float> x = random_floats((size_t)rows * n, -3, 3), back(n);
            std::vector<int8_t> q((size_t)rows * n);
            std::vector<float> s((size_t)rows * groups);
            QuantizedTensor t{q.data(), s.data(), gs};
            CHECK(t.groups(n) == groups, "gs=%d n=%d: %d groups", gs, n, t.groups(n));
            quantize(t, x.data(), rows, n);
            bool ok = true;
            for (int r = 0; r < rows; r++) {
                dequantize(t.row(r, n), back.data(), n);
                for (int g = 0; g < groups; g++) {
                    float vmax = 0;
                    int qmax = 0;
                    for (int j = g * gs; j < std::min(n, (g + 1) * gs); j++) {
                        vmax = std::max(vmax, std::fabs(x[(size_t)r * n + j]));
                        qmax = std::max(qmax, std::abs((int)q[(size_t)r * n + j]));
                        ok = ok && std::fabs(back[j] - x[(size_t)r * n + j]) <= s[r * groups + g] / 2 * (1 + 2 * u) +
                                                                                    2 * u * std::fabs(x[(size_t)r * n + j]);
                    }
                    ok = ok && qmax == 127 && s[r * groups + g] == vmax / 127.0f;
                }
            }
            CHECK(ok, "gs=%d n=%d: short last groups", gs, n);
        }
}

// unpack4 turns every byte into its two nibbles, low first, sign-extended, from
// any start (odd ones split a byte) and for any length; dequantize of a 4-bit
// row agrees.
static void test_unpack4() {
    std::vector<int8_t> packed(300);
    for (size_t i = 0; i < packed.size(); i++) packed[i] = (int8_t)(i * 37 + 11);  // every byte value
    const auto expected = [&](int j) {
        const int v = j % 2 ? ((uint8_t)packed[j / 2] >> 4) : ((uint8_t)packed[j / 2] & 15);
        return v < 8 ? v : v - 16;
    };
    alignas(64) int8_t out[kMaxGroup4];
    bool ok = true;
    for (int first : {0, 1, 2, 31, 32, 33, 64})
        for (int len : {1, 2, 15, 16, 31, 32, 33, 63, 64, 65, 100, 256}) {
            unpack4(out, packed.data(), first, len);
            for (int j = 0; j < len; j++) ok = ok && out[j] == expected(first + j) && nibble(packed.data(), first + j) == out[j];
        }
    CHECK(ok, "unpack4 / nibble against the bytes' nibbles");
    int seen[16] = {};
    for (int j = 0; j < 512; j++) seen[expected(j) + 8]++;
    CHECK(*std::min_element(seen, seen + 16) > 0, "the test bytes cover all 16 nibble values");
    std::vector<float> s = {0.5f, 2.0f}, back(40);
    dequantize({packed.data(), s.data(), 32, 4}, back.data(), 40);
    bool deq = true;
    for (int j = 0; j < 40; j++) deq = deq && back[j] == expected(j) * s[j / 32];
    CHECK(deq, "dequantize of a 4-bit row");
}

// The activations' group offsets, -128 * sum(q), as quantize leaves them for
// the VNNI kernels (test_quantize checks quantize's own).
static void group_offsets(QuantizedTensor& x, int rows, int n) {
    const int groups = x.groups(n);
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < groups; g++) {
            int32_t sum = 0;
            for (int j = g * x.group_size; j < std::min(n, (g + 1) * x.group_size); j++) sum += x.q[(size_t)r * n + j];
            x.offsets[(size_t)r * groups + g] = -128 * sum;
        }
}

// Random int8 values including the extremes -128 (possible in a file, never
// made by quantize) and 127 at the first bytes the tensor uses (from `first`:
// the misaligned tests skip the bytes before it) and at its last, with
// positive scales.
static void fill_random(std::vector<int8_t>& q, std::vector<float>& s, size_t first = 0) {
    std::uniform_int_distribution<int> d(-128, 127);
    for (int8_t& v : q) v = (int8_t)d(rng);
    q[first] = -128;
    if (q.size() > first + 1) q[first + 1] = 127, q.back() = -128;
    for (float& v : s) v = std::uniform_real_distribution<float>(1e-3f, 0.1f)(rng);
}

// Weight rows of n values in `bits` (8 or 4), groups of gs (the last shorter
// when gs does not divide n), against the reference bit for bit and against
// exact arithmetic on the dequantized values within the banner's bound.
static void test_matmul() {
    for (int bits : {8, 4})
        for (int gs : kGroupSizes)
            for (int groups : {1, 2, 3, 7, 9})
                for (int tail : {0, gs / 2 + 1}) {  // the values past the full groups
                    if (tail >= gs) continue;
                    const int n = gs * groups + tail, G = groups + (tail > 0);
                    for (int d : {1, 3, 17, 33})
                        for (int shift : {0, 1, 3})  // misaligned starts
                        for (int nb : {1, 6, 37, kBlock + 5}) {  // one token, a block (4 at once + 2), more than kBlock
                            if (nb > 6 && (shift != 0 || d != 17)) continue;  // (slow: a sample)
                            if (nb > kBlock && groups > 2) continue;
                            QuantizedTensor w{nullptr, nullptr, gs, bits};
                            std::vector<int8_t> xq((size_t)nb * n + shift), wq((size_t)d * w.row_bytes(n) + shift);
                            std::vector<float> xs((size_t)nb * G), ws((size_t)d * G);
                            fill_random(xq, xs, shift);
                            fill_random(wq, ws, shift);
                            std::vector<int32_t> xo(xs.size());
                            QuantizedTensor x{xq.data() + shift, xs.data(), gs, 8, xo.data()};
                            group_offsets(x, nb, n);  // as quantize leaves them, for the prompt kernel
                            w.q = wq.data() + shift, w.s = ws.data();
                            std::vector<float> fast((size_t)nb * d), ref((size_t)nb * d), one(d);
                            matmul(fast.data(), x, w, n, d, nb);
                            matmul_reference(ref.data(), x, w, n, d, nb);
                            CHECK(std::memcmp(fast.data(), ref.data(), fast.size() * sizeof(float)) == 0,
                                  "bits=%d gs=%d n=%d d=%d nb=%d shift=%d: fast matmul differs from the reference",
                                  bits, gs, n, d, nb, shift);

                            // and the reference against exact arithmetic on the dequantized values
                            double worst = 0;
                            for (int b = 0; b < nb; b++) {
                                for (int i = 0; i < d; i++) {
                                    const int8_t* row = w.q + i * w.row_bytes(n);
                                    double exact = 0, mag = 0;
                                    for (int g = 0; g < G; g++) {
                                        double dot = 0;
                                        for (int j = g * gs; j < std::min(n, (g + 1) * gs); j++)
                                            dot += (double)x.q[(size_t)b * n + j] * (bits == 4 ? nibble(row, j) : row[j]);
                                        const double term = dot * xs[(size_t)b * G + g] * ws[(size_t)i * G + g];
                                        exact += term, mag += std::fabs(term);
                                    }
                                    const double bound = (G + 2) * u * mag + 1e-300;
                                    worst = std::max(worst, std::fabs(ref[(size_t)b * d + i] - exact) / bound);
                                }
                                matmul(one.data(), x.row(b, n), w, n, d, 1);
                                CHECK(std::memcmp(one.data(), fast.data() + (size_t)b * d, d * sizeof(float)) == 0,
                                      "bits=%d gs=%d n=%d d=%d: token %d alone differs from in a block", bits, gs, n,
                                      d, b);
                            }
                            CHECK(worst <= 1.0, "bits=%d gs=%d n=%d d=%d: %.2f x the bound", bits, gs, n, d, worst);
                        }
                }
}

static void test_dot_extremes() {
    // the largest products: -128 * -128 over a whole group stays exact in int32
    // up to 2^17 - 1 values: 2^17 products of 2^14 would reach 2^31
    for (int n : {1, 15, 16, 17, 31, 32, 33, 64, 100, 4096, (1 << 17) - 1}) {
        std::vector<int8_t> a(n, -128), b(n, -128);
        CHECK(dot_i8(a.data(), b.data(), n) == 16384 * n, "n=%d: dot of -128s", n);
        std::fill(b.begin(), b.end(), 127);
        CHECK(dot_i8(a.data(), b.data(), n) == -16256 * n, "n=%d: dot of -128 and 127", n);
    }
}

// The fused passes equal separate matmuls (and the gate after them) to the bit:
// q, k, v in one loop over all their tiles; w1 and w3 with SwiGLU tile by tile.
static void test_fused_matmuls() {
  for (int bits : {8, 4})
    for (int gs : {4, 32, 48})
        for (int dq : {3, 8, 17})
            for (int dkv : {1, 4, 6})
                for (int nb : {1, 6}) {
                    const int n = 3 * gs, groups = 3;
                    auto random_tensor = [&](int rows, std::vector<int8_t>& q, std::vector<float>& s, int b) {
                        const QuantizedTensor shape{nullptr, nullptr, gs, b};
                        q.resize((size_t)rows * shape.row_bytes(n)), s.resize((size_t)rows * groups);
                        fill_random(q, s);
                        return QuantizedTensor{q.data(), s.data(), gs, b};
                    };
                    std::vector<int8_t> xq, qq, kq, vq, w3q;
                    std::vector<float> xs, qs, ks, vs, w3s;
                    QuantizedTensor x = random_tensor(nb, xq, xs, 8);
                    std::vector<int32_t> xo(xs.size());
                    x.offsets = xo.data();
                    group_offsets(x, nb, n);
                    const QuantizedTensor wq = random_tensor(dq, qq, qs, bits),
                                          wk = random_tensor(dkv, kq, ks, bits), wv = random_tensor(dkv, vq, vs, bits),
                                          w3 = random_tensor(dq, w3q, w3s, bits);
                    std::vector<float> q(nb * dq), k(nb * dkv), v(nb * dkv), q2(q), k2(k), v2(v);
                    matmul_qkv(q.data(), k.data(), v.data(), x, wq, wk, wv, n, dq, dkv, nb);
                    matmul(q2.data(), x, wq, n, dq, nb);
                    matmul(k2.data(), x, wk, n, dkv, nb);
                    matmul(v2.data(), x, wv, n, dkv, nb);
                    CHECK(q == q2 && k == k2 && v == v2, "matmul_qkv bits=%d gs=%d dq=%d dkv=%d nb=%d", bits, gs, dq,
                          dkv, nb);

                    std::vector<float> h(nb * dq), h3(nb * dq), g1(nb * dq), g3(nb * dq);
                    matmul_swiglu(h.data(), h3.data(), x, wq, w3, n, dq, nb);
                    matmul(g1.data(), x, wq, n, dq, nb);
                    matmul(g3.data(), x, w3, n, dq, nb);
                    swiglu(g1.data(), g3.data(), nb * dq);
                    CHECK(h == g1, "matmul_swiglu bits=%d gs=%d d=%d nb=%d", bits, gs, dq, nb);
                }
}

int main() {
    test_quantize();
    test_quantize_short_groups();
    test_unpack4();
    test_fused_matmuls();
    test_dot_extremes();
    test_matmul();
    return finish();
}
