// Unit tests for run.cpp's kernels, tokenizer, sampler and text output.
// Each kernel is compared with a double-precision reference under the error
// bound stated in its banner; u = 2^-24 is the float unit roundoff.
// Prints "N passed, N failed" and exits 1 on any failure.

#define RUN_NO_MAIN
// the CLI half of run.cpp is tested end to end, not here
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../run.cpp"

#include "check.h"

// Odd sizes around the 16-lane block of matmul, plus a few large ones.
static const int kSizes[] = {1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 257, 768};

// ---------------------------------------------------------------------------

static void test_rmsnorm() {
    for (int n : kSizes) {
        for (bool in_place : {false, true}) {
            std::vector<float> x = random_floats(n, -2, 2), w = random_floats(n, -1, 1), o(n);
            double ss = 0;
            for (float v : x) ss += (double)v * v;
            const double eps = 1e-5, scale = 1.0 / std::sqrt(ss / n + eps);
            std::vector<float> in = x;
            float* out = in_place ? in.data() : o.data();
            rmsnorm(out, in.data(), w.data(), n, (float)eps);
            double worst = 0;
            for (int i = 0; i < n; i++) {
                const double exact = w[i] * (scale * x[i]);
                worst = std::max(worst, std::fabs(out[i] - exact) / ((n / 2.0 + 6) * u * std::fabs(exact) + 1e-300));
            }
            CHECK(worst <= 1.0, "rmsnorm n=%d in_place=%d: error is %.2f x the bound", n, in_place, worst);
        }
    }
}

static void test_softmax() {
    for (int n : kSizes) {
        std::vector<float> x = random_floats(n, -8, 8);
        std::vector<float> p = x;
        softmax(p.data(), n);
        double mx = -1e300;
        for (float v : x) mx = std::max(mx, (double)v);
        double sum = 0, max_d = 0;
        for (float v : x) sum += std::exp(v - mx), max_d = std::max(max_d, mx - v);
        double worst = 0;
        for (int i = 0; i < n; i++) {
            const double exact = std::exp(x[i] - mx) / sum;
            const double bound = ((mx - x[i]) + max_d + n + 4) * u * exact;
            worst = std::max(worst, std::fabs(p[i] - exact) / bound);
        }
        CHECK(worst <= 1.0, "softmax n=%d: error is %.2f x the bound", n, worst);
    }
}

// W (d, n) as panels (the layout matmul reads), shift floats into the vector.
static std::vector<float> as_panels(const float* w, int n, int d, int shift) {
    std::vector<float> wp(shift + panel_rows(d) * n);
    pack_panels(wp.data() + shift, w, 1, d, n);
    return wp;
}

// pack_panels puts w[16 p + r, j] at [p, j, r] and zeros in the rows past d,
// for each of a stack of matrices (as the layers' are packed at load).
static void test_pack_panels() {
    for (int n : {1, 5, 16, 33})
        for (int d : {1, 15, 16, 17, 40})
            for (int layers : {1, 3}) {
                const std::vector<float> w = random_floats((size_t)layers * d * n, -1, 1);
                std::vector<float> wp(layers * panel_rows(d) * n, NAN);
                const float* end = pack_panels(wp.data(), w.data(), layers, d, n);
                bool ok = end == wp.data() + wp.size();
                for (int l = 0; l < layers; l++)
                    for (uint64_t i = 0; i < panel_rows(d); i++)
                        for (int j = 0; j < n; j++) {
                            const float want = i < (uint64_t)d ? w[((size_t)l * d + i) * n + j] : 0.0f;
                            const size_t at = (((size_t)l * panel_rows(d) / 16 + i / 16) * n + j) * 16 + i % 16;
                            ok = ok && std::memcmp(&wp[at], &want, sizeof want) == 0;
                        }
                CHECK(ok, "pack_panels n=%d d=%d layers=%d", n, d, layers);
            }
}

// matmul equals matmul_reference to the bit, and that is within the bound of
// a double reference: d around the 16-row panel and the 64-row tile (a tile
// with 1..4 whole panels and rows left over; for a block, 8-row groups and then
// 4, 2 and 1 rows), tokens one at a time, blocks of 3 (tail tokens only), 8 (one
// part-filled vector of 16 tokens), 19 (a vector and 3 tail tokens), 37 (a pass of
// three vectors, the last part-filled), 100 (two whole passes and 4 tail tokens)
// and kBlock, and n across column blocks of 128; x, w
// and the panels deliberately misaligned by 0..3 floats so no SIMD path can
// assume alignment; and each token's result the same, to the bit, whether or
// not it is in a block.
static void check_matmul(int n, int d, int shift, int nb) {
    std::vector<float> xs = random_floats((size_t)nb * n + shift, -1, 1);
    std::vector<float> ws = random_floats((size_t)d * n + shift, -1, 1);
    const float* x = xs.data() + shift;
    const float* w = ws.data() + shift;
    const std::vector<float> panels = as_panels(w, n, d, shift);
    const float* wp = panels.data() + shift;
    std::vector<float> fast((size_t)nb * d), ref((size_t)nb * d), one(d), xt((size_t)kBlock * n);
    matmul(fast.data(), x, wp, n, d, nb, xt.data());
    matmul_reference(ref.data(), x, w, n, d, nb);
    CHECK(fast == ref, "matmul n=%d d=%d nb=%d shift=%d: differs from matmul_reference", n, d, nb, shift);
    const double gamma = n * u / (1 - n * u);
    double worst = 0;
    for (int b = 0; b < nb; b++) {
        for (int i = 0; i < d; i++) {
            double exact = 0, mag = 0;
            for (int j = 0; j < n; j++) {
                const double p = (double)w[(size_t)i * n + j] * x[(size_t)b * n + j];
                exact += p, mag += std::fabs(p);
            }
            worst = std::max(worst, std::fabs(ref[(size_t)b * d + i] - exact) / (gamma * mag + 1e-300));
        }
        matmul(one.data(), x + (size_t)b * n, wp, n, d, 1, nullptr);
        CHECK(std::memcmp(one.data(), fast.data() + (size_t)b * d, d * sizeof(float)) == 0,
              "matmul n=%d d=%d: token %d alone differs from token %d of %d", n, d, b, b, nb);
    }
    CHECK(worst <= 1.0, "matmul_reference n=%d d=%d nb=%d: %.2f x the bound", n, d, nb, worst);
}
static void test_matmul() {
    for (int n : kSizes) {
        for (int d : {1, 3, 17, 64})
            for (int shift : {0, 1, 3})
                for (int nb : {1, 3, 8}) check_matmul(n, d, shift, nb);
        check_matmul(n, 17, 0, 37);    // 8 + 8 + 1 rows; a pass of 2 whole vectors and 5 tokens
        check_matmul(n, 77, 2, 100);   // a tile, then 8 + 4 + 1 rows; 2 passes and 4 tokens
        check_matmul(n, 113, 1, 8);    // a tile, then 3 panels + 1 row (3 x (8 + 8) + 1 for a block)
        check_matmul(n, 250, 3, 37);   // 3 tiles, then 3 panels + 10 rows (3 x (8 + 8) + 8 + 2)
        check_matmul(n, 250, 1, 19);   // a vector, and 3 tail tokens in a part-filled group of panels
    }
    check_matmul(300, 70, 1, kBlock);  // a whole block: whole passes only
}

// attention against a double-precision reference: the same rotations (keys at
// positions before pos are in the cache already rotated, the block's are
// rotated by attention itself), scores, softmax and weighted sum of values.
// The bound follows the errors through: rope's 3u (|a| + |b|) on q and k, the
// dot's head_size u sum|q k|, the 1/sqrt scaling (2u), softmax's relative
// (|s - max| + T + 4) u plus how much the score errors move each probability
// (its own and the largest, through the normalizing sum), and the weighted
// sum's T u sum p |v| over the T positions attended to.
// With an int8 cache the reference reads what the engine computes on: the
// query as quantized (s.q8, s.q_scale) and the keys and values as stored,
// dequantized. Their q . k is exact; the scales add 5u (the 1/sqrt's 2u and
// three products) to each score and u to each value term. Separately, every
// stored key and value is within half a quantization step (plus the division's
// u |x| and, for keys, rope's error) of the exact value; and attending one
// position more leaves every stored position's bytes as they were.
static void test_attention() {
    for (bool int8 : {false, true})
    for (int head_size : {2, 8, 64})
        for (int kv_mul : {1, 3})
            for (int pos : {0, 7, 40})
                for (int n : {1, 5}) {
                    Config c{};
                    c.n_kv_heads = 2, c.n_heads = 2 * kv_mul, c.dim = c.n_heads * head_size, c.n_layers = 2;
                    c.hidden_dim = 4, c.vocab_size = 4, c.seq_len = 64, c.rope_theta = 10000.0f;
                    const int kv_dim = c.kv_dim(), half = head_size / 2, l = 1;
                    RunState s = make_run_state(c, c.seq_len, int8);
                    const std::vector<float> q = random_floats((size_t)n * c.dim, -2, 2);
                    const std::vector<float> k = random_floats((size_t)(pos + n) * kv_dim, -2, 2);
                    const std::vector<float> v = random_floats((size_t)(pos + n) * kv_dim, -1, 1);
                    std::memcpy(s.q.get(), q.data(), q.size() * sizeof(float));
                    if (pos > 0) store_kv(s.kv, c, s.positions, l, 0, pos, k.data(), v.data());  // as if rotated before
                    std::memcpy(s.k.get(), k.data() + (size_t)pos * kv_dim, (size_t)n * kv_dim * sizeof(float));
                    std::memcpy(s.v.get(), v.data() + (size_t)pos * kv_dim, (size_t)n * kv_dim * sizeof(float));
                    attention(s, c, l, pos, n);

                    // rotate a head in double: values and their rope error bounds
                    const auto rotate = [&](const float* h, int p, std::vector<double>& out, std::vector<double>& err) {
                        out.assign(head_size, 0), err.assign(head_size, 0);
                        for (int i = 0; i < half; i++) {
                            const double angle = p * std::pow(10000.0, -2.0 * i / head_size);
                            const double a = h[2 * i], b = h[2 * i + 1];
                            out[2 * i] = a * std::cos(angle) - b * std::sin(angle);
                            out[2 * i + 1] = a * std::sin(angle) + b * std::cos(angle);
                            err[2 * i] = err[2 * i + 1] = 3 * u * (std::fabs(a) + std::fabs(b));
                        }
                    };
                    // the cache as the engine reads it: (keys, values) of position t, kv head g
                    const auto cached = [&](const KVCache& kv, int t, int g, bool value, int i) {
                        const size_t row = kv.head(c, s.positions, l, g) + t, at = row * head_size + i;
                        if (!kv.int8) return (double)(value ? kv.value : kv.key)[at];
                        return (double)(value ? kv.value8 : kv.key8)[at] * (value ? kv.value_scale : kv.key_scale)[row];
                    };
                    double worst = 0, worst_stored = 0;
                    if (int8)  // each stored value within half a step of the exact one
                        for (int t = 0; t < pos + n; t++)
                            for (int g = 0; g < c.n_kv_heads; g++) {
                                const float* kt = &k[(size_t)t * kv_dim + g * head_size];
                                const float* vt = &v[(size_t)t * kv_dim + g * head_size];
                                std::vector<double> kr, ke;
                                if (t < pos) kr.assign(kt, kt + head_size), ke.assign(head_size, 0);
                                else rotate(kt, t, kr, ke);
                                const size_t sc = s.kv.head(c, s.positions, l, g) + t;
                                for (int i = 0; i < head_size; i++) {
                                    const double dk = s.kv.key_scale[sc] / 2 + u * std::fabs(kr[i]) + ke[i];
                                    const double dv = s.kv.value_scale[sc] / 2 + u * std::fabs(vt[i]);
                                    worst_stored = std::max({worst_stored, std::fabs(cached(s.kv, t, g, false, i) - kr[i]) / dk,
                                                             std::fabs(cached(s.kv, t, g, true, i) - vt[i]) / dv});
                                }
                            }
                    for (int b = 0; b < n; b++)
                        for (int h = 0; h < c.n_heads; h++) {
                            const int last = pos + b, T = last + 1, g = h / kv_mul, kv_off = g * head_size;
                            std::vector<double> qr, qe, kr, ke, score(T), serr(T);
                            if (int8) {  // the query as quantized, exact
                                const size_t bh = (size_t)b * c.n_heads + h;
                                for (int i = 0; i < head_size; i++) qr.push_back((double)s.q8[bh * head_size + i] * s.q_scale[bh]);
                                qe.assign(head_size, 0);
                            } else {
                                rotate(&q[(size_t)b * c.dim + h * head_size], pos + b, qr, qe);
                            }
                            const double scale = 1.0 / std::sqrt((double)head_size);
                            for (int t = 0; t < T; t++) {
                                const float* kt = &k[(size_t)t * kv_dim + kv_off];
                                if (int8) {  // as stored, exact
                                    kr.assign(head_size, 0), ke.assign(head_size, 0);
                                    for (int i = 0; i < head_size; i++) kr[i] = cached(s.kv, t, g, false, i);
                                } else if (t < pos) {  // already rotated: exact as stored
                                    kr.assign(kt, kt + head_size), ke.assign(head_size, 0);
                                } else {
                                    rotate(kt, t, kr, ke);
                                }
                                double dot = 0, mag = 0, prop = 0;
                                for (int i = 0; i < head_size; i++) {
                                    dot += qr[i] * kr[i], mag += std::fabs(qr[i] * kr[i]);
                                    prop += qe[i] * std::fabs(kr[i]) + std::fabs(qr[i]) * ke[i] + qe[i] * ke[i];
                                }
                                score[t] = dot * scale;
                                serr[t] = int8 ? 5 * u * 1.01 * std::fabs(score[t])
                                               : (head_size * u * 1.01 * (mag + prop) + prop) * scale + 3 * u * std::fabs(score[t]);
                            }
                            const double mx = *std::max_element(score.begin(), score.end());
                            const double max_err = *std::max_element(serr.begin(), serr.end());
                            double sum = 0;
                            for (int t = 0; t < T; t++) sum += std::exp(score[t] - mx);
                            const float* got = s.xb.get() + (size_t)b * c.dim + h * head_size;
                            for (int i = 0; i < head_size; i++) {
                                double exact = 0, bound = 0;
                                for (int t = 0; t < T; t++) {
                                    const double p = std::exp(score[t] - mx) / sum, vt = cached(s.kv, t, g, true, i);
                                    const double rel = 1.01 * (serr[t] + max_err) + (mx - score[t] + T + 4 + int8) * u + T * u;
                                    exact += p * vt, bound += 1.01 * rel * p * std::fabs(vt);
                                }
                                worst = std::max(worst, std::fabs(got[i] - exact) / (bound + 1e-300));
                            }
                        }
                    CHECK(worst <= 1.0, "attention%s head_size=%d kv_mul=%d pos=%d n=%d: %.2f x the bound", int8 ? " (int8 cache)" : "",
                          head_size, kv_mul, pos, n, worst);
                    CHECK(worst_stored <= 1.0, "int8 cache head_size=%d pos=%d n=%d: stored %.2f x half a step away", head_size,
                          pos, n, worst_stored);

                    // one more position: the ones stored stay exactly as they are
                    const auto stored = [&]() {  // every key and value of positions < pos + n, as the engine reads them
                        std::vector<double> all;
                        for (int g = 0; g < c.n_kv_heads; g++)
                            for (int t = 0; t < pos + n; t++)
                                for (int i = 0; i < head_size; i++)
                                    all.push_back(cached(s.kv, t, g, false, i)), all.push_back(cached(s.kv, t, g, true, i));
                        return all;
                    };
                    const std::vector<double> before = stored();
                    std::memcpy(s.q.get(), q.data(), c.dim * sizeof(float));
                    std::memcpy(s.k.get(), k.data(), kv_dim * sizeof(float));
                    std::memcpy(s.v.get(), v.data(), kv_dim * sizeof(float));
                    attention(s, c, l, pos + n, 1);
                    const bool same = stored() == before;
                    CHECK(same, "attention%s pos=%d n=%d: a later position changed the stored keys", int8 ? " (int8 cache)" : "", pos, n);
                }
}

static void test_rope() {
    for (float theta : {10000.0f, 500000.0f}) {
        for (int head_size : {2, 6, 8, 64}) {
            Config c{};
            c.dim = 3 * head_size, c.n_heads = 3, c.n_kv_heads = 3, c.n_layers = 1;
            c.hidden_dim = 4, c.vocab_size = 4, c.seq_len = 600, c.rope_theta = theta;
            RunState s = make_run_state(c, c.seq_len, false);
            for (int pos : {0, 1, 7, 511, 599}) {
                std::vector<float> v = random_floats(c.dim, -3, 3), r = v;
                const size_t half = head_size / 2;
                rope(r.data(), 3, head_size, s.rope_cos.get() + pos * half, s.rope_sin.get() + pos * half);
                double worst = 0;
                for (int h = 0; h < 3; h++)
                    for (size_t i = 0; i < half; i++) {
                        const double angle = pos * std::pow((double)theta, -2.0 * i / head_size);
                        const double a = v[h * head_size + 2 * i], b = v[h * head_size + 2 * i + 1];
                        const double ea = a * std::cos(angle) - b * std::sin(angle);
                        const double eb = a * std::sin(angle) + b * std::cos(angle);
                        const double bound = 3 * u * (std::fabs(a) + std::fabs(b));
                        worst = std::max(worst, std::fabs(r[h * head_size + 2 * i] - ea) / bound);
                        worst = std::max(worst, std::fabs(r[h * head_size + 2 * i + 1] - eb) / bound);
                    }
                CHECK(worst <= 1.0, "rope theta=%g head=%d pos=%d: %.2f x the bound", theta, head_size, pos, worst);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tokenizer: a small vocabulary written to a temporary file.

struct Piece { std::string text; float score; };

static std::string write_tokenizer(const std::vector<Piece>& pieces) {
    char path[] = "/tmp/test_run_tok_XXXXXX";
    int fd = mkstemp(path);
    int32_t max_len = 0;
    for (const Piece& p : pieces) max_len = std::max<int32_t>(max_len, p.text.size());
    std::string buf(reinterpret_cast<char*>(&max_len), 4);
    for (const Piece& p : pieces) {
        int32_t len = p.text.size();
        buf.append(reinterpret_cast<const char*>(&p.score), 4);
        buf.append(reinterpret_cast<char*>(&len), 4);
        buf += p.text;
    }
    if (write(fd, buf.data(), buf.size()) != (ssize_t)buf.size()) std::abort();
    close(fd);
    return path;
}

// <unk>, BOS, EOS, 256 byte pieces, then `normal`
static std::vector<Piece> vocab_with(const std::vector<Piece>& normal) {
    std::vector<Piece> v = {{"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
    for (int b = 0; b < 256; b++) {
        char s[8];
        std::snprintf(s, sizeof s, "<0x%02X>", b);
        v.push_back({s, 0});
    }
    v.insert(v.end(), normal.begin(), normal.end());
    return v;
}

// The textbook algorithm encode() must equal: rescan every adjacent pair,
// merge the best (leftmost on ties), repeat. Quadratic, obviously right.
static std::vector<int> encode_naive(const std::vector<Piece>& vocab, const std::string& text) {
    auto find = [&](const std::string& s) {
        for (size_t i = 259; i < vocab.size(); i++)
            if (vocab[i].text == s) return (int)i;
        return -1;
    };
    std::vector<int> t;
    if (text.empty()) return {kBos};
    std::string s = " " + text;
    for (size_t i = 0; i < s.size();) {
        size_t len = 1;
        while (i + len < s.size() && ((unsigned char)s[i + len] & 0xC0) == 0x80) len++;
        int id = find(s.substr(i, len));
        if (id >= 0) t.push_back(id);
        else for (size_t k = 0; k < len; k++) t.push_back((unsigned char)s[i + k] + 3);
        i += len;
    }
    for (;;) {
        float best = -1e30f;
        int best_i = -1, best_id = -1;
        for (size_t i = 0; i + 1 < t.size(); i++) {
            int id = find(vocab[t[i]].text + vocab[t[i + 1]].text);
            if (id >= 0 && vocab[id].score > best) best = vocab[id].score, best_i = i, best_id = id;
        }
        if (best_i < 0) break;
        t[best_i] = best_id;
        t.erase(t.begin() + best_i + 1);
    }
    t.insert(t.begin(), kBos);
    return t;
}

static void test_tokenizer() {
    // ids: " " 259, "a" 260, "b" 261, "aa" 262, "ab" 263, " a" 264, "aab" 265, "ba" 266, "é" 267
    const std::vector<Piece> normal = {{" ", -10}, {"a", -10}, {"b", -10}, {"aa", 1}, {"ab", 2},
                                       {" a", 0.5}, {"aab", 3}, {"ba", 1}, {"\xC3\xA9", -10}};
    const std::vector<Piece> vocab = vocab_with(normal);
    const std::string path = write_tokenizer(vocab);
    Tokenizer tok = load_tokenizer(path.c_str(), vocab.size());
    unlink(path.c_str());

    auto enc = [&](const char* s, bool bos = true) { return encode(tok, s, bos); };
    CHECK(enc("") == std::vector<int>({1}), "empty text is just BOS");
    CHECK(enc("", false).empty(), "empty text without BOS is empty");
    // " aaa": pairs " a"(0.5) "aa"(1) "aa"(1): leftmost "aa" wins -> " " aa a -> " " "aa" "a"
    CHECK(enc("aaa") == std::vector<int>({1, 259, 262, 260}), "leftmost merge on a tie");
    // " aab": "ab"(2) beats "aa"(1) and " a"(0.5); then "a"+"ab" = "aab"(3)
    CHECK(enc("aab") == std::vector<int>({1, 259, 265}), "highest score merges first");
    // "x" is not in the vocabulary: byte fallback at id byte + 3
    CHECK(enc("x", false) == std::vector<int>({259, 'x' + 3}), "byte fallback");
    CHECK(enc("\xC3\xA9", false) == std::vector<int>({259, 267}), "a known multi-byte character");
    CHECK(enc("\xE2\x82\xAC", false) == std::vector<int>({259, 0xE2 + 3, 0x82 + 3, 0xAC + 3}),
          "an unknown multi-byte character falls back to its bytes");
    CHECK(enc("\xFF", false) == std::vector<int>({259, 0xFF + 3}), "a malformed byte falls back");
    // the text "<unk>" must not become the special token
    std::vector<int> unk = enc("<unk>", false);
    CHECK(std::find(unk.begin(), unk.end(), 0) == unk.end(), "<unk> in text stays text");

    // random strings over a small alphabet against the naive algorithm
    const char* alphabet[] = {"a", "b", " ", "x", "\xC3\xA9"};
    int mismatches = 0;
    for (int trial = 0; trial < 3000; trial++) {
        std::string s;
        for (int n = rng() % 12; n > 0; n--) s += alphabet[rng() % 5];
        if (encode(tok, s, true) != encode_naive(vocab, s)) mismatches++;
    }
    CHECK(mismatches == 0, "%d of 3000 random strings differ from the naive encoder", mismatches);

    char byte;
    CHECK(decode(tok, kBos, 264, &byte) == "a", "the first piece after BOS loses its leading space");
    CHECK(decode(tok, 260, 264, &byte) == " a", "later pieces keep it");
    CHECK(decode(tok, 260, 0xC3 + 3, &byte) == std::string_view("\xC3", 1), "byte pieces are bytes");
}

// ---------------------------------------------------------------------------
// TextOut: capture what it writes to stdout.

static std::string text_out(const std::vector<std::string>& pieces) {
    std::fflush(stdout);
    char path[] = "/tmp/test_run_out_XXXXXX";
    int fd = mkstemp(path);
    int saved = dup(1);
    dup2(fd, 1);
    TextOut out;
    for (const std::string& p : pieces) out.write(p);
    out.finish();
    std::fflush(stdout);
    dup2(saved, 1);
    close(saved);
    std::string result;
    char buf[256];
    lseek(fd, 0, SEEK_SET);
    for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) result.append(buf, n);
    close(fd);
    unlink(path);
    return result;
}

static void test_text_out() {
    const std::string rep = "\xEF\xBF\xBD";  // U+FFFD
    CHECK(text_out({"h\xC3", "\xA9llo"}) == "h\xC3\xA9llo", "a character split across pieces is joined");
    CHECK(text_out({"\xF0\x9F", "\xA4", "\x96!"}) == "\xF0\x9F\xA4\x96!", "a 4-byte character in three pieces");
    CHECK(text_out({"\xC3", "x"}) == rep + "x", "an interrupted character becomes U+FFFD");
    CHECK(text_out({"ok\xE2\x82"}) == "ok" + rep, "an unfinished character at the end becomes U+FFFD");
    CHECK(text_out({"\x1b[31mred"}) == "[31mred", "escape bytes are dropped");
    CHECK(text_out({"a\tb\nc"}) == "a\tb\nc", "whitespace is kept");
    CHECK(text_out({"\xE0\x80\x80"}) == rep + rep + rep, "an overlong encoding is malformed");
    CHECK(text_out({"\xED\xA0\x80"}) == rep + rep + rep, "a surrogate is malformed");
}

// ---------------------------------------------------------------------------
// Sampler

// xorshift64* written from its definition with 128-bit arithmetic, as an
// independent check of random_u32.
static uint32_t xorshift_reference(unsigned __int128& s) {
    const unsigned __int128 mask = ((unsigned __int128)1 << 64) - 1;
    s ^= s >> 12;
    s = (s ^ (s << 25)) & mask;
    s ^= s >> 27;
    return (uint32_t)(((s * 0x2545F4914F6CDD1Dull) & mask) >> 32);
}

static void test_rng() {
    for (uint64_t seed : {1ull, 42ull, 0xFFFFFFFFFFFFFFFFull, 1700000000ull}) {
        uint64_t s = seed;
        unsigned __int128 r = seed;
        int mismatches = 0;
        for (int i = 0; i < 10000; i++) mismatches += random_u32(&s) != xorshift_reference(r);
        CHECK(mismatches == 0, "seed %llu: %d outputs differ from the reference", (unsigned long long)seed, mismatches);
    }
    uint64_t s = 7;
    double sum = 0, lo = 1, hi = 0;
    const int n = 100000;
    for (int i = 0; i < n; i++) {
        float f = random_f32(&s);
        sum += f, lo = std::min(lo, (double)f), hi = std::max(hi, (double)f);
    }
    CHECK(lo >= 0 && hi < 1, "random_f32 in [0, 1): saw [%g, %g]", lo, hi);
    // the mean of n uniforms has standard deviation sqrt(1/12/n)
    CHECK(std::fabs(sum / n - 0.5) < 5 * std::sqrt(1.0 / 12 / n), "random_f32 mean %g", sum / n);
}

// Top-p as specified, without the cutoff shortcut: sort everything by
// probability (ids ascending on ties), keep the shortest prefix whose sum
// exceeds topp (all if none does), pick where coin * prefix-sum falls.
static int topp_reference(const std::vector<float>& p, float topp, float coin) {
    std::vector<int> order(p.size());
    for (size_t i = 0; i < p.size(); i++) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    float cum = 0;
    size_t last = order.size() - 1;
    for (size_t i = 0; i < order.size(); i++) {
        cum += p[order[i]];
        if (cum > topp) { last = i; break; }
    }
    float cdf = 0;
    for (size_t i = 0; i <= last; i++) {
        cdf += p[order[i]];
        if (coin * cum < cdf) return order[i];
    }
    return order[last];
}

static void test_sampler() {
    float tie[] = {0.1f, 3.0f, -1.0f, 3.0f};
    CHECK(sample_argmax(tie, 4) == 1, "argmax takes the lowest id on ties");
    float p[] = {0.25f, 0.5f, 0.25f};
    CHECK(sample_mult(p, 3, 0.0f) == 0 && sample_mult(p, 3, 0.3f) == 1 && sample_mult(p, 3, 0.8f) == 2,
          "sample_mult walks the cumulative distribution");
    float short_sum[] = {0.25f, 0.25f, 0.25f};  // sums to 0.75: a coin above falls back
    CHECK(sample_mult(short_sum, 3, 0.9f) == 2, "sample_mult falls back to the last id");

    std::vector<std::pair<float, int>> cand;
    int mismatches = 0, trials = 0;
    for (int n : {2, 3, 10, 100, 1000}) {
        for (float topp : {0.1f, 0.5f, 0.9f, 0.99f}) {
            std::vector<float> x = random_floats(n, -4, 4);
            // many equal probabilities, so the order among ties matters
            if (n >= 10)
                for (float& v : x) v = std::round(v * 2) / 2;
            softmax(x.data(), n);
            for (int k = 0; k < 200; k++) {
                const float coin = k / 200.0f;
                trials++;
                mismatches += sample_topp(x.data(), n, topp, cand, coin) != topp_reference(x, topp, coin);
            }
        }
    }
    CHECK(mismatches == 0, "top-p differs from the reference in %d of %d draws", mismatches, trials);

    // temperature 0 never draws; temperature > 0 draws exactly once per sample
    std::vector<float> logits = random_floats(50, -2, 2);
    Sampler greedy{0.0f, 0.9f, 5, {}}, hot{0.8f, 0.9f, 5, {}};
    std::vector<float> l1 = logits, l2 = logits;
    sample(greedy, l1.data(), 50);
    sample(hot, l2.data(), 50);
    uint64_t once = 5;
    random_u32(&once);
    CHECK(greedy.rng_state == 5 && hot.rng_state == once, "random draws per sample: 0 greedy, 1 otherwise");
}

// The fused passes equal separate matmuls (and the gate after them) to the bit:
// q, k, v in one loop over all their tiles; w1 and w3 with SwiGLU tile by tile.
static void test_fused_matmuls() {
    for (int n : {5, 16, 33})
        for (int dq : {3, 8, 17})
            for (int dkv : {1, 4, 6})
                for (int nb : {1, 3, 6}) {
                    const std::vector<float> x = random_floats((size_t)nb * n, -1, 1);
                    const std::vector<float> wq = as_panels(random_floats((size_t)dq * n, -1, 1).data(), n, dq, 0);
                    const std::vector<float> wk = as_panels(random_floats((size_t)dkv * n, -1, 1).data(), n, dkv, 0);
                    const std::vector<float> wv = as_panels(random_floats((size_t)dkv * n, -1, 1).data(), n, dkv, 0);
                    const std::vector<float> w3 = as_panels(random_floats((size_t)dq * n, -1, 1).data(), n, dq, 0);
                    std::vector<float> q(nb * dq), k(nb * dkv), v(nb * dkv), q2(q), k2(k), v2(v), xt(kBlock * n);
                    float* t = xt.data();
                    matmul_qkv(q.data(), k.data(), v.data(), x.data(), wq.data(), wk.data(), wv.data(), n, dq, dkv, nb, t);
                    matmul(q2.data(), x.data(), wq.data(), n, dq, nb, t);
                    matmul(k2.data(), x.data(), wk.data(), n, dkv, nb, t);
                    matmul(v2.data(), x.data(), wv.data(), n, dkv, nb, t);
                    CHECK(q == q2 && k == k2 && v == v2, "matmul_qkv n=%d dq=%d dkv=%d nb=%d", n, dq, dkv, nb);

                    std::vector<float> h(nb * dq), h3(nb * dq), g1(nb * dq), g3(nb * dq);
                    matmul_swiglu(h.data(), h3.data(), x.data(), wq.data(), w3.data(), n, dq, nb, t);
                    matmul(g1.data(), x.data(), wq.data(), n, dq, nb, t);
                    matmul(g3.data(), x.data(), w3.data(), n, dq, nb, t);
                    swiglu(g1.data(), g3.data(), nb * dq);
                    CHECK(h == g1, "matmul_swiglu n=%d d=%d nb=%d", n, dq, nb);
                }
}

// The int8 KV cache of a subnormal head (quantize_group): the scale max / 127
// rounds to a few ulps, x / scale reaches 128, and the stored value must stay
// in [-127, 127] with its sign (an unclamped cast is undefined; on x86 it
// stores -128). Ties round to even, as export.py rounds the weights.
static void test_quantize_group() {
    Config c{};
    c.n_kv_heads = 1, c.n_heads = 1, c.dim = 16, c.n_layers = 1;
    KVCache kv = make_kv_cache(c, 1, true);
    for (float tiny : {1.8e-43f, 3e-44f, 1e-45f, 1e-30f}) {
        std::vector<float> k(16);
        for (int i = 0; i < 16; i++) k[i] = tiny * (i % 2 ? -1.0f : 1.0f) * (float)(16 - i) / 16;
        store_kv(kv, c, 1, 0, 0, 1, k.data(), k.data());
        bool ok = true;
        for (int i = 0; i < 16; i++) ok = ok && kv.key8[i] != -128 && kv.key8[i] * k[i] >= 0 && kv.value8[i] * k[i] >= 0;
        CHECK(ok && kv.key8[0] == (kv.key_scale[0] > 0 ? 127 : 0), "the KV cache of a subnormal head of max %g", tiny);
    }
    // scale 1: 2.5 and -0.5 are ties, rounded to even
    const float x[4] = {127.0f, 2.5f, -0.5f, 3.5f};
    int8_t q[4];
    CHECK(quantize_group(q, x, 4) == 1.0f && q[1] == 2 && q[2] == 0 && q[3] == 4, "ties to even: %d %d %d", q[1], q[2],
          q[3]);
}

// word_end, the byte-level split, moves past i for every text and every class
// table, even one a crafted tokenizer.bin could hold before load_byte_level
// refused it (U+0020 not white space): a split that stood still or went back
// would loop or read before the text.
static void test_word_end_advances() {
    const uint32_t alphabet[] = {' ', 'a', '1', '\n', '\r', '!', '\'', 's', 0xE9};
    std::uniform_int_distribution<int> pick(0, 8), cls(kOther, kSpace), len(1, 7);
    int stuck = 0, cases = 0;
    for (Split split : {kLlama3Split, kGpt2Split})
        for (int table = 0; table < 200; table++) {
            Tokenizer t;
            t.split = split;
            for (uint32_t c : alphabet) if (c < 128) t.ascii_class[c] = (uint8_t)cls(rng);
            for (int text = 0; text < 50; text++) {
                std::vector<uint32_t> cp(len(rng));
                for (uint32_t& c : cp) c = alphabet[pick(rng)];
                for (size_t i = 0; i < cp.size(); i++, cases++) {
                    const size_t e = word_end(t, cp.data(), i, cp.size());
                    stuck += e <= i || e > cp.size();
                }
            }
        }
    CHECK(stuck == 0, "word_end stood still or left the text in %d of %d cases", stuck, cases);
}

// The memory limit: the machine's RAM, or a container's cgroup limit when
// smaller (v2's memory.max, v1's memory/memory.limit_in_bytes); "max" and v1's
// huge "no limit" number leave the RAM.
static void test_memory_limit() {
    char dir[] = "/tmp/test_run_cgroup_XXXXXX";
    if (!mkdtemp(dir)) std::abort();
    const std::string root = dir, v2 = root + "/memory.max", v1dir = root + "/memory",
                      v1 = v1dir + "/memory.limit_in_bytes";
    const double ram = (double)sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGE_SIZE);
    const auto put = [](const std::string& path, const char* text) {
        std::FILE* f = std::fopen(path.c_str(), "w");
        std::fputs(text, f);
        std::fclose(f);
    };
    CHECK(memory_limit(dir) == ram, "no cgroup files: the machine's RAM");
    put(v2, "max\n");
    CHECK(memory_limit(dir) == ram, "memory.max 'max': the machine's RAM");
    put(v2, "1000000\n");
    CHECK(memory_limit(dir) == 1e6, "memory.max 1000000: %g", memory_limit(dir));
    unlink(v2.c_str());
    mkdir(v1dir.c_str(), 0700);
    put(v1, "9223372036854771712\n");
    CHECK(memory_limit(dir) == ram, "cgroup v1 without a limit: the machine's RAM");
    put(v1, "2000000\n");
    CHECK(memory_limit(dir) == 2e6, "cgroup v1 limit 2000000: %g", memory_limit(dir));
    unlink(v1.c_str());
    rmdir(v1dir.c_str());
    rmdir(dir);
}

// The owning types move but do not copy: a copy of a Tokenizer would keep
// string_views into the original's pieces.
static_assert(!std::is_copy_constructible_v<Tokenizer> && !std::is_copy_assignable_v<Tokenizer>);
static_assert(std::is_move_constructible_v<Tokenizer> && !std::is_copy_constructible_v<MappedFile>);

int main() {
    test_rmsnorm();
    test_softmax();
    test_pack_panels();
    test_matmul();
    test_fused_matmuls();
    test_rope();
    test_attention();
    test_tokenizer();
    test_word_end_advances();
    test_quantize_group();
    test_text_out();
    test_rng();
    test_sampler();
    test_memory_limit();
    return finish();
}
