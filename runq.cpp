// runq.cpp: the same engine as run.cpp over quantized checkpoints: int8
// (version 2, "Q8_0") or int4 (version 3) weights in groups, every group_size
// consecutive values of a row sharing one float scale. Activations are
// quantized to int8 in the same groups. A token still flows top to bottom:
//
//   checkpoint -> forward pass -> tokenizer -> sampler -> generate / chat -> CLI
//
// `make lesson` is the quantization lesson: the diff of the two files without
// their fast paths. Only the weights, the run state's int8 activation buffers,
// the matmul and the forward pass differ; every other section is the same line
// for line (tests/test_shared_code.py).
//
// Build: `make runq` (see Makefile). Run: ./runq model-q8.bin -z tokenizer.bin -i "Once"
// C++17, the standard library, POSIX mmap, optional OpenMP pragmas and SIMD intrinsics.

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iostream>
#include <memory>
#include <queue>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__SSE2__)  // every x86-64; AVX2 / AVX-512 paths are chosen inside
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

constexpr const char* kProgram = "runq";  // for the usage text
constexpr bool kDefaultKvInt8 = true;    // -k: int8 (what it costs in perplexity: docs/quality.md)

// ----------------------------------------------------------------------------
// Errors: every problem a user can cause ends here, as one line on stderr and
// exit status 1. Nothing throws past main().

struct FatalError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] __attribute__((format(printf, 1, 2))) static void fatal(const char* fmt, ...) {
    char msg[1024];
    std::va_list args;
    va_start(args, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, args);
    va_end(args);
#ifdef RUN_FATAL_THROWS  // the fuzz targets (tests/fuzz.cpp) catch it and go on
    throw FatalError(msg);
#endif
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", msg);
    std::exit(1);
}

// ----------------------------------------------------------------------------
// Memory: a read-only memory-mapped file (move-only; unmaps itself), and heap
// buffers that free themselves.

class MappedFile {
public:
    MappedFile() = default;
    // populate: map every page now (for a file read in place), else each page
    // as it is first read (a file mostly copied once, or read only in part).
    explicit MappedFile(const char* path, bool populate = true) {
        int fd = open(path, O_RDONLY | O_NONBLOCK);  // a FIFO must not block the open
        if (fd < 0) fatal("cannot open %s: %s", path, std::strerror(errno));
        struct stat st;
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
            close(fd);
            fatal("%s is not a regular file", path);
        }
        if (st.st_size == 0) {
            close(fd);
            fatal("%s is empty", path);
        }
        size_ = (size_t)st.st_size;
        // MAP_POPULATE maps every page now, in one call, instead of a page fault
        // at a time in the first forward pass (which would count in the prompt's speed).
        int flags = MAP_PRIVATE;
#ifdef MAP_POPULATE
        if (populate) flags |= MAP_POPULATE;
#endif
        void* p = mmap(nullptr, size_, PROT_READ, flags, fd, 0);
        close(fd);  // the mapping keeps the file alive
        if (p == MAP_FAILED) fatal("cannot map %s: %s", path, std::strerror(errno));
        data_ = static_cast<const uint8_t*>(p);
    }
    MappedFile(MappedFile&& o) noexcept { *this = std::move(o); }
    MappedFile& operator=(MappedFile&& o) noexcept {
        std::swap(data_, o.data_);
        std::swap(size_, o.size_);
        return *this;
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    ~MappedFile() {
        if (data_) munmap(const_cast<uint8_t*>(data_), size_);
    }
    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    // Unmaps the whole pages of [p, p + bytes), a part of the mapping, from this
    // process, not from the file: the next read of one maps it again from the
    // page cache. For a part whose contents were copied elsewhere.
    void release(const void* p, size_t bytes) const {
#ifdef MADV_DONTNEED
        const uintptr_t page = (uintptr_t)sysconf(_SC_PAGE_SIZE), a = (uintptr_t)p;
        const uintptr_t first = (a + page - 1) / page * page, last = (a + bytes) / page * page;
        if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
#endif
    }

private:
    const uint8_t* data_ = nullptr;
    size_t size_ = 0;
};

// calloc'd, so a large KV cache costs nothing until it is written
struct FreeDeleter { void operator()(void* p) const { std::free(p); } };
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;
using Int8Buffer = std::unique_ptr<int8_t[], FreeDeleter>;
static void* alloc_zeroed(uint64_t n, size_t size) {
    void* p = std::calloc(n, size);
    if (!p) fatal("out of memory allocating %llu x %zu bytes", (unsigned long long)n, size);
    return p;
}
static FloatBuffer alloc_floats(uint64_t n) { return FloatBuffer(static_cast<float*>(alloc_zeroed(n, sizeof(float)))); }
static Int8Buffer alloc_int8(uint64_t n) { return Int8Buffer(static_cast<int8_t*>(alloc_zeroed(n, 1))); }

// Reads a little-endian scalar at a byte offset. memcpy because fields such as
// version 2's group_size sit at unaligned offsets.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the file formats are little-endian");
template <typename T>
static T read_at(const uint8_t* p, size_t offset) {
    T v;
    std::memcpy(&v, p + offset, sizeof v);
    return v;
}

// 64-bit size arithmetic that refuses to wrap: a hostile header must not make a
// huge model look small.
static uint64_t mul_ck(uint64_t a, uint64_t b) {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) fatal("checkpoint sizes overflow 64 bits");
    return r;
}
static uint64_t add_ck(uint64_t a, uint64_t b) {
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r)) fatal("checkpoint sizes overflow 64 bits");
    return r;
}

// The threads a parallel loop runs on, and which one this is: per-thread
// scratch is threads() rows, indexed by thread_id().
static int threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// The memory this process may use, in bytes: the machine's RAM, or less if a
// container's cgroup limits it (v2's memory.max, v1's memory.limit_in_bytes,
// under cgroup_root; "max" or a huge number means no limit).
static double memory_limit(const char* cgroup_root) {
    double limit = (double)sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGE_SIZE);
    for (const char* file : {"memory.max", "memory/memory.limit_in_bytes"}) {
        const std::string path = std::string(cgroup_root) + "/" + file;
        if (std::FILE* f = std::fopen(path.c_str(), "r")) {
            double bytes;
            if (std::fscanf(f, "%lf", &bytes) == 1 && bytes > 0) limit = limit > 0 ? std::min(limit, bytes) : bytes;
            std::fclose(f);
        }
    }
    return limit;
}

// What a run allocates (the run state, mostly the KV cache; run's copy of the
// matrices) must fit in the memory this process may use once filled: refused up
// front, naming what and what to do about it.
static void check_fits_in_memory(uint64_t bytes, const std::string& what, const char* advice) {
    const double gb = bytes / 1e9, ram = memory_limit("/sys/fs/cgroup") / 1e9;
    if (ram > 0 && gb > ram)
        fatal("%s needs %.1f GB, more than the %.1f GB this process may use: %s", what.c_str(), gb, ram, advice);
}

// ----------------------------------------------------------------------------
// Checkpoint header: the model's shape, read from any version (0, 1, 2, 3) and
// validated before a single size is computed from it.

constexpr uint32_t kMagic = 0x616b3432;    // "ak42" in hex; on disk the bytes "24ka"
constexpr size_t kHeaderBytes = 256;       // versions 1, 2 and 3
constexpr size_t kLegacyHeaderBytes = 28;  // version 0: seven int32
constexpr int kBos = 1, kEos = 2;

// Llama 3.1's RoPE scaling (Hugging Face's rope_type "llama3"): the
// frequencies whose wavelength exceeds original_context / low_freq_factor are
// divided by factor, those below original_context / high_freq_factor kept, and
// those between blended (scaled_frequency). kind 0: no scaling.
struct RopeScaling {
    int kind;               // 0 none, 1 llama3 (offset 72)
    float factor;           // offset 76
    float low_freq_factor;  // offset 80
    float high_freq_factor; // offset 84
    int original_context;   // original_max_position_embeddings (offset 88)
};

struct Config {
    int dim;           // transformer width
    int hidden_dim;    // feed-forward width
    int n_layers;
    int n_heads;       // query heads
    int n_kv_heads;    // key/value heads (< n_heads: grouped-query attention)
    int vocab_size;
    int seq_len;       // maximum context
    bool shared_classifier;  // classifier == token embedding
    float rope_theta;  // RoPE base (header offset 64; 0 in the file = 10000)
    float norm_eps;    // RMSNorm epsilon (header offset 68; 0 in the file = 1e-5)
    RopeScaling rope_scaling;  // Llama 3.1's, or none (header offsets 72-91)
    int version;       // 0 (legacy), 1 (fp32), 2 (int8) or 3 (int4)
    int group_size;    // versions 2 and 3: values per quantization scale (offset 37)
    int int8_tensors;  // version 3: bit 0 the token embedding, bit 1 the classifier in int8 (offset 92)
    size_t header_bytes;
    int head_size() const { return dim / n_heads; }
    int kv_dim() const { return dim / n_heads * n_kv_heads; }
};

// What is wrong with a header, in words, or "" if nothing is. The caps are far
// above any Llama model and keep every size product below 2^63.
static std::string config_problem(const Config& c) {
    char msg[256];
    const auto say = [&](const char* fmt, auto... args) {
        std::snprintf(msg, sizeof msg, fmt, args...);
        return std::string(msg);
    };
    struct Field { const char* name; int value, cap; };
    const Field fields[] = {
        {"dim", c.dim, 1 << 16},          {"hidden_dim", c.hidden_dim, 1 << 18},
        {"n_layers", c.n_layers, 1 << 10}, {"n_heads", c.n_heads, 1 << 10},
        {"n_kv_heads", c.n_kv_heads, 1 << 10}, {"vocab_size", c.vocab_size, 1 << 21},
        {"seq_len", c.seq_len, 1 << 20},
    };
    for (const Field& f : fields)
        if (f.value <= 0 || f.value > f.cap) return say("%s = %d (must be in 1..%d)", f.name, f.value, f.cap);
    if (c.dim % c.n_heads != 0) return say("dim %d is not divisible by n_heads %d", c.dim, c.n_heads);
    if (c.head_size() % 2 != 0) return say("head size %d is odd (RoPE rotates pairs)", c.head_size());
    if (c.n_heads % c.n_kv_heads != 0)
        return say("n_heads %d is not divisible by n_kv_heads %d", c.n_heads, c.n_kv_heads);
    if (c.vocab_size < 3) return say("vocab_size %d < 3 (needs <unk>, BOS, EOS)", c.vocab_size);
    if (!(c.rope_theta > 0.0f && std::isfinite(c.rope_theta))) return say("rope_theta %g", c.rope_theta);
    if (!(c.norm_eps > 0.0f && std::isfinite(c.norm_eps))) return say("norm_eps %g", c.norm_eps);
    const RopeScaling& r = c.rope_scaling;
    if (r.kind != 0 && r.kind != 1) return say("rope scaling kind %d (0 none, 1 llama3)", r.kind);
    if (r.kind == 1 && !(r.factor >= 1.0f && std::isfinite(r.factor) && r.low_freq_factor > 0.0f &&
                         r.high_freq_factor > r.low_freq_factor && std::isfinite(r.high_freq_factor) &&
                         r.original_context > 0))
        return say("rope scaling factor %g, frequency factors %g and %g, original context %d (needs factor >= 1, "
                   "0 < low < high, context > 0)", r.factor, r.low_freq_factor, r.high_freq_factor, r.original_context);
    if (c.int8_tensors != 0 && (c.version != 3 || (c.int8_tensors & ~3) != 0 || (c.shared_classifier && c.int8_tensors & 2)))
        return say("int8 tensor flags %d (version 3 only: bit 0 embedding, bit 1 unshared classifier)", c.int8_tensors);
    return "";
}

// Files people mistake for checkpoints, by their first bytes: what the error
// message says (what the file is, and the export.py flag that converts it), or
// nullptr. Asked only about files whose header is not valid: a version 0 file
// with dim 640 starts with the bytes 80 02 00 00, as a pickle does.
static const char* foreign_format(const uint8_t* data, size_t size) {
    if (size >= 4 && std::memcmp(data, "GGUF", 4) == 0) return "a GGUF file (llama.cpp): convert it with export.py --gguf";
    if (size >= 4 && std::memcmp(data, "PK\3\4", 4) == 0)
        return "a zip archive (a PyTorch .pt/.pth file?): convert it with export.py --checkpoint";
    if (size >= 2 && data[0] == 0x80 && data[1] >= 2 && data[1] <= 5)
        return "a Python pickle: convert it with export.py --checkpoint";
    // safetensors: an 8-byte little-endian JSON length, then the JSON object
    if (size >= 9 && data[8] == '{' && read_at<uint64_t>(data, 0) <= size - 8)
        return "a safetensors file: convert its Hugging Face directory with export.py --hf";
    return nullptr;
}

// Versioned files start with the magic; legacy files start straight with dim.
static Config read_config(const MappedFile& f, const char* path) {
    const uint8_t* data = f.data();
    const size_t size = f.size();
    const auto refuse_foreign = [&] {
        if (const char* kind = foreign_format(data, size))
            fatal("%s is not a llama2.c checkpoint but %s", path, kind);
    };
    Config c{};
    int32_t h[7];
    if (size >= 4 && read_at<uint32_t>(data, 0) == kMagic) {
        if (size < kHeaderBytes) fatal("%s: truncated header (%zu bytes)", path, size);
        c.version = read_at<int32_t>(data, 4);
        if (c.version < 1 || c.version > 3)
            fatal("%s: unsupported checkpoint version %d", path, c.version);
        for (int i = 0; i < 7; i++) h[i] = read_at<int32_t>(data, 8 + 4 * i);
        c.vocab_size = h[5];
        const uint8_t shared = data[36];
        if (shared > 1) fatal("%s: bad header: shared_classifier = %d (must be 0 or 1)", path, shared);
        c.shared_classifier = shared == 1;
        if (c.version >= 2) c.group_size = read_at<int32_t>(data, 37);
        c.rope_theta = read_at<float>(data, 64);
        c.norm_eps = read_at<float>(data, 68);
        c.rope_scaling = {read_at<int32_t>(data, 72), read_at<float>(data, 76), read_at<float>(data, 80),
                          read_at<float>(data, 84), read_at<int32_t>(data, 88)};
        c.int8_tensors = read_at<int32_t>(data, 92);
        c.header_bytes = kHeaderBytes;
    } else {
        if (size < kLegacyHeaderBytes) {
            refuse_foreign();
            fatal("%s: truncated header (%zu bytes)", path, size);
        }
        for (int i = 0; i < 7; i++) h[i] = read_at<int32_t>(data, 4 * i);
        // the sign of vocab_size says whether the classifier is shared
        c.shared_classifier = h[5] > 0;
        c.vocab_size = h[5] == INT32_MIN ? 0 : std::abs(h[5]);
        c.version = 0;
        c.header_bytes = kLegacyHeaderBytes;
    }
    c.dim = h[0], c.hidden_dim = h[1], c.n_layers = h[2], c.n_heads = h[3];
    c.n_kv_heads = h[4], c.seq_len = h[6];
    if (c.rope_theta == 0.0f) c.rope_theta = 10000.0f;
    if (c.norm_eps == 0.0f) c.norm_eps = 1e-5f;
    const std::string problem = config_problem(c);
    if (problem.empty()) return c;
    if (c.version == 0) refuse_foreign();
    fatal("%s: bad header: %s", path, problem.c_str());
}

// The file must be exactly as long as its header says: no more, no less.
static void check_file_size(uint64_t expected, size_t size, const char* path) {
    if (expected != size)
        fatal("%s: file is %zu bytes but its header describes %llu bytes", path, size,
              (unsigned long long)expected);
}

// A RoPE frequency under the model's scaling (RopeScaling): unchanged, divided
// by factor, or between the two, weighted by where its wavelength falls.
static double scaled_frequency(double freq, const RopeScaling& r) {
    if (r.kind != 1) return freq;
    const double pi = 3.14159265358979323846, wavelength = 2 * pi / freq, old = r.original_context;
    if (wavelength < old / r.high_freq_factor) return freq;
    if (wavelength > old / r.low_freq_factor) return freq / r.factor;
    const double smooth = (old / wavelength - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    return (1 - smooth) * freq / r.factor + smooth * freq;
}

// RoPE angle for position p, pair i: p * freq_i with freq_i = theta^(-2i / head_size)
// (scaled for Llama 3.1), as cos and sin tables (positions, head_size / 2).
// Computed once in double, so long contexts do not accumulate float error in p * freq.
static void fill_rope_tables(float* cos, float* sin, const Config& c, int positions) {
    const int half = c.head_size() / 2;
    for (int i = 0; i < half; i++) {
        const double freq = scaled_frequency(std::pow((double)c.rope_theta, -2.0 * i / c.head_size()), c.rope_scaling);
        for (int p = 0; p < positions; p++) {
            cos[(size_t)p * half + i] = (float)std::cos(p * freq);
            sin[(size_t)p * half + i] = (float)std::sin(p * freq);
        }
    }
}

// ----------------------------------------------------------------------------
// Weights: int8 (version 2) or int4 (version 3) tensors quantized in groups,
// used in place in the mapping.

// QuantizedTensor: a matrix whose rows (n values each) are cut into groups of
// group_size consecutive values, the last group of a row shorter when
// group_size does not divide n; each group has one float scale, value ~ q * s.
// Symmetric: s = max|v| / qmax and q = round(v / s), qmax = 127 for 8 bits
// (version 2 weights, and every activation) and 7 for 4 bits (version 3).
// 8 bits: one int8 per value. 4 bits: two values per byte, low nibble first,
// two's complement in [-8, 7]; each row starts on a byte, (n + 1) / 2 bytes.
// Weights point into the (read-only) mapping; activations into run-state buffers.
struct QuantizedTensor {
    int8_t* q;       // 8 bits: (rows, n) values; 4 bits: (rows, (n + 1) / 2) bytes
    float* s;        // (rows, groups(n)) scales
    int group_size;  // a property of the tensor, not of the program
    int bits = 8;    // 8 or 4
    int32_t* offsets = nullptr;  // activations: (rows, groups(n)) -128 * sum(q) per group (see rows4_i8)
    int groups(int n) const { return (n + group_size - 1) / group_size; }
    size_t row_bytes(int n) const { return bits == 4 ? (n + 1) / 2 : n; }
    // row i of a matrix with n columns, as a tensor of its own
    QuantizedTensor row(size_t i, int n) const {
        return {q + i * row_bytes(n), s + i * groups(n), group_size, bits,
                offsets ? offsets + i * groups(n) : nullptr};
    }
};

// Value j of a 4-bit row: its nibble, sign-extended.
static inline int nibble(const int8_t* row, int j) {
    const int v = ((uint8_t)row[j / 2] >> (4 * (j % 2))) & 15;
    return v >= 8 ? v - 16 : v;
}

// Matrix: one matrix of weights, (rows, n).
using Matrix = QuantizedTensor;

struct TransformerWeights {
    Matrix token_embedding;           // (vocab_size, dim)
    const float* rms_att;             // (layer, dim)
    const float* rms_ffn;             // (layer, dim)
    const float* rms_final;           // (dim,)
    std::vector<Matrix> wq;           // layer x (dim, dim)        rows are outputs
    std::vector<Matrix> wk;           // layer x (kv_dim, dim)
    std::vector<Matrix> wv;           // layer x (kv_dim, dim)
    std::vector<Matrix> wo;           // layer x (dim, dim)
    std::vector<Matrix> w1;           // layer x (hidden_dim, dim)
    std::vector<Matrix> w2;           // layer x (dim, hidden_dim)
    std::vector<Matrix> w3;           // layer x (hidden_dim, dim)
    Matrix wcls;                      // (vocab_size, dim)
};

struct Checkpoint {
    Config config;
    TransformerWeights w;
    MappedFile file;  // the weights point into this mapping
    std::vector<std::vector<float>> moved_scales;  // scales that sat at unaligned offsets
};

// Hands out the mapping's consecutive arrays in file order: fp32 vectors, then
// quantized tensors, each its rows' values followed by their float scales.
// Scales land at unaligned offsets once a tensor's value bytes are not a
// multiple of 4 (possible when dim is not); those few are copied out.
struct WeightCursor {
    const uint8_t* p;
    QuantizedTensor shape;  // group size and bits of every tensor
    std::vector<std::vector<float>>& moved_scales;

    const float* floats(uint64_t n) {
        const float* r = reinterpret_cast<const float*>(p);
        p += n * sizeof(float);
        return r;
    }
    QuantizedTensor quantized(uint64_t rows, int n, int bits = 0) {  // bits: 0 = shape's
        QuantizedTensor t = shape;
        if (bits) t.bits = bits;
        t.q = const_cast<int8_t*>(reinterpret_cast<const int8_t*>(p));
        p += rows * t.row_bytes(n);
        const uint64_t scales = rows * t.groups(n);
        if (reinterpret_cast<uintptr_t>(p) % alignof(float) == 0) {
            t.s = const_cast<float*>(reinterpret_cast<const float*>(p));
        } else {
            moved_scales.emplace_back(scales);
            std::memcpy(moved_scales.back().data(), p, scales * sizeof(float));
            t.s = moved_scales.back().data();
        }
        p += scales * sizeof(float);
        return t;
    }
    std::vector<Matrix> layers(int n_layers, uint64_t rows, int n) {
        std::vector<Matrix> v;
        for (int l = 0; l < n_layers; l++) v.push_back(quantized(rows, n));
        return v;
    }
};

// The largest group size version 3 allows: a group is unpacked on the stack.
constexpr int kMaxGroup4 = 256;

static Checkpoint load_checkpoint(const char* path) {
    Checkpoint ck;
    ck.file = MappedFile(path);
    const Config& c = ck.config = read_config(ck.file, path);
    if (c.version < 2)
        fatal("%s: is a version %d (fp32) checkpoint: run it with run, or convert it with "
              "export.py --version 2 (int8) or 3 (int4)", path, c.version);
    const int gs = c.group_size;
    const QuantizedTensor shape{nullptr, nullptr, gs, c.version == 3 ? 4 : 8};
    // Version 2 (llama2.c's layout) has no short groups: group_size divides every row.
    if (c.version == 2 && (gs <= 0 || c.dim % gs != 0 || c.hidden_dim % gs != 0))
        fatal("%s: group_size %d does not divide both dim %d and hidden_dim %d; re-export it: "
              "python3 export.py OUT.bin --version 2 --bin <fp32 checkpoint>",
              path, gs, c.dim, c.hidden_dim);
    if (c.version == 3 && (gs <= 0 || gs > kMaxGroup4))
        fatal("%s: group_size %d is not in 1..%d", path, gs, kMaxGroup4);
    // version 3 may keep the embedding and classifier in int8 (a GGUF q4_0 file's q8_0 output, exactly)
    const int emb_bits = c.int8_tensors & 1 ? 8 : shape.bits, cls_bits = c.int8_tensors & 2 ? 8 : shape.bits;
    if (c.int8_tensors && c.dim % gs != 0)
        fatal("%s: int8 tensors need group_size %d to divide dim %d", path, gs, c.dim);

    // The exact size the header promises, in bytes.
    const uint64_t L = c.n_layers, dim = c.dim, hid = c.hidden_dim, kv = c.kv_dim();
    const uint64_t vocab = c.vocab_size;
    auto quantized = [&](uint64_t rows, int n, int bits = 0) {
        const uint64_t values = bits == 8 ? n : shape.row_bytes(n);
        return mul_ck(rows, add_ck(values, mul_ck(shape.groups(n), sizeof(float))));
    };
    uint64_t n = add_ck(c.header_bytes, mul_ck(add_ck(mul_ck(L, 2 * dim), dim), sizeof(float)));  // norms
    n = add_ck(n, quantized(vocab, c.dim, emb_bits));                                   // token_embedding
    n = add_ck(n, mul_ck(L, add_ck(mul_ck(2, quantized(dim, c.dim)), mul_ck(2, quantized(kv, c.dim)))));  // wq wk wv wo
    n = add_ck(n, mul_ck(L, add_ck(mul_ck(2, quantized(hid, c.dim)), quantized(dim, c.hidden_dim))));  // w1 w2 w3
    if (!c.shared_classifier) n = add_ck(n, quantized(vocab, c.dim, cls_bits));        // wcls
    check_file_size(n, ck.file.size(), path);

    TransformerWeights& w = ck.w;
    WeightCursor cur{ck.file.data() + c.header_bytes, shape, ck.moved_scales};
    w.rms_att = cur.floats(L * dim);
    w.rms_ffn = cur.floats(L * dim);
    w.rms_final = cur.floats(dim);
    w.token_embedding = cur.quantized(vocab, c.dim, emb_bits);
    w.wq = cur.layers(L, dim, c.dim);
    w.wk = cur.layers(L, kv, c.dim);
    w.wv = cur.layers(L, kv, c.dim);
    w.wo = cur.layers(L, dim, c.dim);
    w.w1 = cur.layers(L, hid, c.dim);
    w.w2 = cur.layers(L, dim, c.hidden_dim);
    w.w3 = cur.layers(L, hid, c.dim);
    w.wcls = c.shared_classifier ? w.token_embedding : cur.quantized(vocab, c.dim, cls_bits);
    return ck;
}

// ----------------------------------------------------------------------------
// KV cache: every layer's keys and values for the positions read so far, the
// memory each new token's attention reads in full. `-k f32` keeps floats;
// `-k int8` keeps int8 values with one float scale per position and kv head
// (the head's head_size values are the group), a quarter of the bytes.
// A position is quantized once, when attention stores it (keys after RoPE),
// and never again.

// Head-major: a kv head's keys for positions 0, 1, 2, ... are contiguous, so
// attention streams them (position-major rows would be read with a stride).
struct KVCache {
    bool int8 = false;
    FloatBuffer key, value;              // f32:  (layer, n_kv_heads, positions, head_size)
    Int8Buffer key8, value8;             // int8: (layer, n_kv_heads, positions, head_size)
    FloatBuffer key_scale, value_scale;  // int8: (layer, n_kv_heads, positions)
    size_t head(const Config& c, int positions, int l, int g) const {  // the first (position 0) row of l, g
        return (size_t)l * c.n_kv_heads * positions + (size_t)g * positions;
    }
};

static uint64_t kv_cache_bytes(const Config& c, int positions, bool int8) {
    const uint64_t rows = mul_ck(c.n_layers, positions);  // one row per layer and position
    const uint64_t row = int8 ? c.kv_dim() + (uint64_t)c.n_kv_heads * sizeof(float) : c.kv_dim() * sizeof(float);
    return mul_ck(2 * rows, row);  // keys and values
}

static KVCache make_kv_cache(const Config& c, int positions, bool int8) {
    const uint64_t n = mul_ck(mul_ck(c.n_layers, positions), c.kv_dim());
    const uint64_t scales = mul_ck(mul_ck(c.n_layers, positions), c.n_kv_heads);
    KVCache kv;
    kv.int8 = int8;
    if (int8) {
        kv.key8 = alloc_int8(n), kv.value8 = alloc_int8(n);
        kv.key_scale = alloc_floats(scales), kv.value_scale = alloc_floats(scales);
    } else {
        kv.key = alloc_floats(n), kv.value = alloc_floats(n);
    }
    return kv;
}

// Symmetric int8 of n values sharing one scale: scale = max|x| / 127,
// q = round(x / scale) (ties to even, as export.py rounds the weights), so x is
// within half a step, scale / 2, of q * scale. Returns the scale (0 for an
// all-zero group). The clamp is for subnormal groups, whose scale is rounded
// so coarsely that x / scale can reach 128 (and (int8_t)128.0f is undefined).
// A NaN or infinity makes the scale NaN (and q 0): it must reach the logits,
// where check_logits stops the run, not vanish in the rounding.
// The KV cache and the queries use it, and runq's matmul inputs (quantize).
static float quantize_group(int8_t* q, const float* x, int n) {
    float amax = 0;
    bool finite = true;
    for (int i = 0; i < n; i++) amax = std::max(amax, std::fabs(x[i])), finite = finite && std::isfinite(x[i]);
    const float scale = finite ? amax / 127.0f : NAN;
    for (int i = 0; i < n; i++)
        q[i] = finite && scale > 0 ? (int8_t)std::clamp(std::nearbyint(x[i] / scale), -127.0f, 127.0f) : 0;
    return scale;
}

// Writes the keys and values of positions pos .. pos + n - 1 of layer l (k and
// v: (n, kv_dim), keys already rotated) into the cache.
static void store_kv(KVCache& kv, const Config& c, int positions, int l, int pos, int n, const float* k,
                     const float* v) {
    const int head_size = c.head_size();
    for (int b = 0; b < n; b++)
        for (int g = 0; g < c.n_kv_heads; g++) {
            const size_t row = kv.head(c, positions, l, g) + pos + b, from = ((size_t)b * c.n_kv_heads + g) * head_size;
            if (kv.int8) {
                kv.key_scale[row] = quantize_group(kv.key8.get() + row * head_size, k + from, head_size);
                kv.value_scale[row] = quantize_group(kv.value8.get() + row * head_size, v + from, head_size);
            } else {
                std::memcpy(kv.key.get() + row * head_size, k + from, head_size * sizeof(float));
                std::memcpy(kv.value.get() + row * head_size, v + from, head_size * sizeof(float));
            }
        }
}

// ----------------------------------------------------------------------------
// Run state: the activations of a block of up to kBlock positions, and the KV
// cache. Allocated once; forward() allocates nothing.

// Prompt tokens per pass over the weights: each weight row, once in cache,
// serves the whole block, so reading a prompt costs far less memory traffic
// per token than generating does. 192 is four of run's prompt kernel's passes
// of 48 tokens; a 131-token prompt read in one block rather than two was 13%
// faster in run, 3-10% in runq.
constexpr int kBlock = 192;

// Storage for activation rows in int8: a matmul's input is quantized here, in
// the weights' groups (so a row of n values has t.groups(n) scales).
struct QuantizedBuffer {
    std::vector<int8_t> q;
    std::vector<float> s;
    std::vector<int32_t> offsets;
    QuantizedTensor t{};  // points into q, s and offsets (which keep their storage when moved)
    QuantizedBuffer() = default;
    QuantizedBuffer(int rows, int n, int group_size)
        : q((size_t)rows * n), s((size_t)rows * ((n + group_size - 1) / group_size)), offsets(s.size()),
          t{q.data(), s.data(), group_size, 8, offsets.data()} {}
    QuantizedBuffer(QuantizedBuffer&&) = default;
    QuantizedBuffer& operator=(QuantizedBuffer&&) = default;
    QuantizedBuffer(const QuantizedBuffer&) = delete;  // a copy's t would point into the original
    QuantizedBuffer& operator=(const QuantizedBuffer&) = delete;
};

struct RunState {
    FloatBuffer x;            // (block, dim) the residual stream
    FloatBuffer xb, xb2;      // (block, dim) scratch
    FloatBuffer hb, hb2;      // (block, hidden_dim) feed-forward scratch
    QuantizedBuffer xq;       // (block, dim) int8 input of the dim-wide matmuls
    QuantizedBuffer hq;       // (block, hidden_dim) int8 input of w2
    FloatBuffer q;            // (block, dim) queries
    FloatBuffer k, v;         // (block, kv_dim) the block's keys and values, until attention stores them
    Int8Buffer q8;            // (block, dim) int8 queries, for an int8 KV cache
    FloatBuffer q_scale;      // (block, n_heads) their scales
    FloatBuffer att;          // (threads, positions) attention scores, one row per thread
    FloatBuffer logits;       // (block, vocab_size)
    KVCache kv;               // (layer, positions, kv_dim) keys and values
    FloatBuffer rope_cos;     // (positions, head_size / 2)
    FloatBuffer rope_sin;     // (positions, head_size / 2)
    int positions;            // the context this run can fill: -n, at most seq_len
};

// Sized for `positions` (-n), not the model's whole seq_len, and refused up
// front if it could not fit in this machine's memory once filled.
static RunState make_run_state(const Config& c, int positions, bool kv_int8) {
    const uint64_t half = c.head_size() / 2, att = mul_ck(threads(), positions);
    const uint64_t dim = kBlock * c.dim, hidden = kBlock * c.hidden_dim, logits = kBlock * c.vocab_size;
    const uint64_t kv = kBlock * c.kv_dim(), heads = kBlock * c.n_heads;
    const uint64_t floats = 5 * dim + 2 * hidden + 2 * kv + heads + att + logits + 2 * positions * half;
    check_fits_in_memory(add_ck(floats * sizeof(float) + dim, kv_cache_bytes(c, positions, kv_int8)),
                         "the KV cache for " + std::to_string(positions) + " positions", "ask for fewer with -n");
    RunState s{alloc_floats(dim), alloc_floats(dim), alloc_floats(dim),
               alloc_floats(hidden), alloc_floats(hidden),
               QuantizedBuffer(kBlock, c.dim, c.group_size), QuantizedBuffer(kBlock, c.hidden_dim, c.group_size),
               alloc_floats(dim), alloc_floats(kv), alloc_floats(kv), alloc_int8(dim), alloc_floats(heads),
               alloc_floats(att), alloc_floats(logits), make_kv_cache(c, positions, kv_int8),
               alloc_floats(positions * half), alloc_floats(positions * half), positions};
    fill_rope_tables(s.rope_cos.get(), s.rope_sin.get(), c, positions);
    return s;
}

// ----------------------------------------------------------------------------
// Kernels shared by both engines. Each has its contract and error bound in a
// banner; the unit tests (tests/test_run.cpp) check the bounds against
// double-precision references over odd sizes. u = 2^-24 is the float unit roundoff.

// The clock for the speed report, and a stopwatch that adds the time until
// the end of its scope to a total (forward's time in matmuls and attention).
static double now_seconds() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}
// The threads the parallel loops use: OMP_NUM_THREADS, else one per core; 1
// in a build without OpenMP.
struct Stopwatch {
    double& total;
    const double start = now_seconds();
    ~Stopwatch() { total += now_seconds() - start; }
};

// a * b + c: one rounding where the CPU has a fused multiply-add, else two.
// Written out because the Makefile turns off the compiler's own fusing
// (-ffp-contract=off): left to itself, g++ fuses a * b + c in one inlined copy of
// a loop and not in another, and clang++ only within one expression, so results
// would depend on the compiler and the call site. g++ announces the
// instruction with FP_FAST_FMAF, clang++ only with __FMA__.
#if defined(FP_FAST_FMAF) || defined(__FMA__)
#define HAS_FMA 1
#endif
static inline float madd(float a, float b, float c) {
#ifdef HAS_FMA
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
}
// head_dot_i8: a . b over n int8 values (an int8 cache's q . k), exact in
// int32 (|sum| <= n 127^2 < 2^31 for any head size). A plain loop: compilers
// turn it into widening multiply-adds (vpmaddwd; vpdpwssd with VNNI).
static inline int32_t head_dot_i8(const int8_t* a, const int8_t* b, int n) {
    int32_t sum = 0;
    for (int j = 0; j < n; j++) sum += (int32_t)a[j] * b[j];
    return sum;
}

// Attention's two vector kernels (defined in Vector helpers, after the command
// line): the sums of plain loops, in a fixed order, 16 lanes at a time.
// dot: a . b over n floats, in 16 lanes (j % 16) added up at the end, then the
// last n % 16 products. Error: |out - exact| <= n u sum_j |a[j] b[j]|.
static inline float dot(const float* a, const float* b, int n);
// weighted_sum: out[i] = sum over t = 0..T-1 of p[t] * scale_t * v_t[i], i < n,
// where v_t = v + t * stride (floats, or int8 with one scale per position:
// scale_t = scales[t * scale_stride]; none for floats), each out[i] in t order
// with one madd per term (p[t] * scale_t rounded first).
template <typename V>
static void weighted_sum(float* out, const float* p, int T, const V* v, size_t stride, int n,
                         const float* scales = nullptr, size_t scale_stride = 0);

// Weights with NaN or infinity in them make every later token garbage: stop
// at the first position whose logits (rows of vocab) are not all finite.
static void check_logits(const float* logits, int vocab, int first_pos, int rows) {
    for (int b = 0; b < rows; b++)
        for (int i = 0; i < vocab; i++)
            if (!std::isfinite(logits[(size_t)b * vocab + i]))
                fatal("position %d: the logits are not finite (NaN or infinity in the weights?)", first_pos + b);
}

// rmsnorm: o[i] = w[i] * x[i] / sqrt(mean(x^2) + eps). o may alias x.
// Error: |o - exact| <= (n/2 + 6) u |exact| (the sum of squares has relative
// error <= n u, and the inverse square root halves it).
static void rmsnorm(float* o, const float* x, const float* w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) o[i] = w[i] * (scale * x[i]);
}

// softmax in place, shifted by the max so exp never overflows.
// Error per element: relative (|x[i] - max| + n + 4) u.
static void softmax(float* x, int n) {
    float max_val = x[0];
    for (int i = 1; i < n; i++) max_val = std::max(max_val, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = std::exp(x[i] - max_val);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

// rope: rotate each consecutive pair (v[2i], v[2i+1]) of each head of v by the
// angle in (cos, sin)[i]. v holds n_heads heads of head_size floats.
// Error: |v' - exact| <= 3 u (|v[2i]| + |v[2i+1]|) per element.
static void rope(float* v, int n_heads, int head_size, const float* cos, const float* sin) {
    for (int h = 0; h < n_heads; h++) {
        float* head = v + h * head_size;
        for (int i = 0; i < head_size / 2; i++) {
            const float a = head[2 * i], b = head[2 * i + 1];
            head[2 * i] = a * cos[i] - b * sin[i];
            head[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    }
}

// attention for layer l, for the n tokens at positions pos .. pos + n - 1 whose
// queries are in s.q and whose keys and values are in s.k and s.v. Rotates the
// queries and those keys, stores the keys and values in the cache, then for
// token b, query head h, over positions t <= pos + b (causal):
//   s.xb[b, h] = softmax(q_bh . k_t / sqrt(head_size)) @ v_t
// Query head h reads kv head h / (n_heads / n_kv_heads): grouped-query attention.
// With an int8 cache the query head is quantized too (one scale, as a key), so
// q . k is an exact int32 sum times the two scales, and each value is scaled
// as it is summed: the f32 computation on the dequantized query, keys and
// values, with 3 more roundings per score and one per value term.
// (token, head) pairs run in parallel; each is computed whole by one thread.
static void attention(RunState& s, const Config& c, int l, int pos, int n) {
    const int head_size = c.head_size(), half = head_size / 2, kv_dim = c.kv_dim();
    const int kv_mul = c.n_heads / c.n_kv_heads;
    for (int b = 0; b < n; b++) {
        const float* cos = s.rope_cos.get() + (size_t)(pos + b) * half;
        const float* sin = s.rope_sin.get() + (size_t)(pos + b) * half;
        rope(s.q.get() + (size_t)b * c.dim, c.n_heads, head_size, cos, sin);
        rope(s.k.get() + (size_t)b * kv_dim, c.n_kv_heads, head_size, cos, sin);
    }
    KVCache& kv = s.kv;
    store_kv(kv, c, s.positions, l, pos, n, s.k.get(), s.v.get());
    if (kv.int8)  // (token, head) rows of head_size, like the cache's
        for (int bh = 0; bh < n * c.n_heads; bh++)
            s.q_scale[bh] = quantize_group(s.q8.get() + (size_t)bh * head_size, s.q.get() + (size_t)bh * head_size,
                                           head_size);

    const float inv_sqrt = 1.0f / std::sqrt((float)head_size);
    // (one pair at a time to each thread in turn: later tokens see more positions)
    #pragma omp parallel for schedule(static, 1)
    for (int bh = 0; bh < n * c.n_heads; bh++) {
        const int b = bh / c.n_heads, h = bh % c.n_heads, last = pos + b;
        const size_t row = kv.head(c, s.positions, l, h / kv_mul);  // position 0 of the kv head it reads
        float* att = s.att.get() + (size_t)thread_id() * s.positions;  // this thread's scores
        float* out = s.xb.get() + (size_t)bh * head_size;
        if (!kv.int8) {
            const float* qh = s.q.get() + (size_t)bh * head_size;
            const float* k = kv.key.get() + row * head_size;
            for (int t = 0; t <= last; t++) att[t] = dot(qh, k + (size_t)t * head_size, head_size) * inv_sqrt;
            softmax(att, last + 1);
            weighted_sum(out, att, last + 1, kv.value.get() + row * head_size, head_size, head_size);
        } else {
            const int8_t* qh = s.q8.get() + (size_t)bh * head_size;
            const int8_t* k = kv.key8.get() + row * head_size;
            const float* ks = kv.key_scale.get() + row;
            const float qs = s.q_scale[bh] * inv_sqrt;
            for (int t = 0; t <= last; t++)
                att[t] = (float)head_dot_i8(qh, k + (size_t)t * head_size, head_size) * (qs * ks[t]);
            softmax(att, last + 1);
            weighted_sum(out, att, last + 1, kv.value8.get() + row * head_size, head_size, head_size,
                         kv.value_scale.get() + row, 1);
        }
    }
}

// SwiGLU's gate: a[i] = silu(a[i]) * b[i], silu(x) = x * sigmoid(x).
static void swiglu(float* a, const float* b, int n) {
    for (int i = 0; i < n; i++) a[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
}

// The residual connection: x += y.
static void accum(float* x, const float* y, int n) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}

// ----------------------------------------------------------------------------
// Matmul: W (d, n) @ x (nb, n) -> out (nb, d), the loop that takes nearly all the
// time, on int8. The activations are quantized first, so each group's dot
// product is exact integer arithmetic, scaled once by the two groups' scales.

// quantize: rows of n floats -> qx (8 bits), group by group (quantize_group),
// the last group of a row shorter when group_size does not divide n. With
// qx.offsets, also each group's -128 * sum(q), for the VNNI kernels, which add
// 128 to every weight.
// Error: |q * s - x| <= s / 2 + |x| u per element, s = max|group| / 127.
static void quantize(QuantizedTensor& qx, const float* x, int rows, int n) {
    const int gs = qx.group_size, groups = qx.groups(n);
    for (size_t r = 0; r < (size_t)rows; r++)
        for (int g = 0; g < groups; g++) {
            const int len = std::min(gs, n - g * gs);
            int8_t* q = qx.q + r * n + g * gs;
            qx.s[r * groups + g] = quantize_group(q, x + r * n + g * gs, len);
            if (!qx.offsets) continue;
            int32_t sum = 0;
            for (int i = 0; i < len; i++) sum += q[i];
            qx.offsets[r * groups + g] = -128 * sum;
        }
}

// dequantize: one row of n values (8 or 4 bits) -> x[j] = q[j] * s[j / group_size].
static void dequantize(const QuantizedTensor& qx, float* x, int n) {
    for (int j = 0; j < n; j++) x[j] = (qx.bits == 4 ? nibble(qx.q, j) : qx.q[j]) * qx.s[j / qx.group_size];
}

// The float side of one group, shared by both matmuls so that they round
// alike (madd: an explicit fused multiply-add where the CPU has one).
static inline float add_group(float acc, int32_t dot, float sx, float sw) {
    return madd((float)dot * sx, sw, acc);
}

// rows_reference: rows r0 .. r1 - 1 of matmul_reference.
static void rows_reference(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb,
                           int r0, int r1) {
    const int gs = w.group_size, groups = w.groups(n);
    for (int b = 0; b < nb; b++)
        for (int i = r0; i < r1; i++) {
            const QuantizedTensor xb = x.row(b, n), wi = w.row(i, n);
            float acc = 0.0f;
            for (int g = 0; g < groups; g++) {
                int32_t dot = 0;
                for (int j = g * gs; j < std::min(n, (g + 1) * gs); j++)
                    dot += (int32_t)xb.q[j] * (w.bits == 4 ? nibble(wi.q, j) : wi.q[j]);
                acc = add_group(acc, dot, xb.s[g], wi.s[g]);
            }
            out[(size_t)b * d + i] = acc;
        }
}
// matmul_reference: out[b, i] = sum over groups g of dot(x_bg, w_ig) * sx_bg * sw_ig
// for each of the nb tokens b: the plain loops, kept as the specification of
// matmul: each group's dot product exact, the groups added in order by
// add_group. The fast kernels compute these very sums, so their results are
// the reference's to the bit (the tests check). Weights of 8 or 4 bits; groups as in quantize.
[[maybe_unused]] static void matmul_reference(float* out, const QuantizedTensor& x, const QuantizedTensor& w,
                                              int n, int d, int nb) {
    rows_reference(out, x, w, n, d, nb, 0, d);
}

// Threads share a matrix's rows out in tiles: tile t is rows kTile t .. kTile t
// + kTile - 1, fewer in the last. A row is computed by one thread whole, so a
// result does not depend on the thread count.
constexpr int kTile = 16;  // rows per tile
static inline int tiles(int d) { return (d + kTile - 1) / kTile; }

// matmul_tile: tile t of W (d, n) @ x (nb, n) -> out (nb, d), the reference's
// sums to the bit, by the fast kernels (in Fast matmul, after the command line;
// x and w quantized with the same group size, which divides n in version 2).
// Error against the exact product of the dequantized values: the dot products
// are exact; the float side adds (groups + 2) u sum_g |dot_g sx_g sw_g| per output.
#ifdef MATMUL_REFERENCE  // make runref: every matmul is the reference
static void matmul_tile(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb, int t) {
    rows_reference(out, x, w, n, d, nb, kTile * t, std::min(d, kTile * (t + 1)));
}
#else
static void matmul_tile(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb, int t);
#endif

// matmul: W (d, n) @ x (nb, n) -> out (nb, d). Tiles are split across
// threads, rows never, so a result does not depend on the thread count.
static void matmul(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb) {
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles(d); t++) matmul_tile(out, x, w, n, d, nb, t);
}

// matmul_qkv: q, k, v = Wq x, Wk x, Wv x (dq, dkv and dkv rows, n columns, nb
// tokens): the three matrices' tiles in one parallel loop, so the threads
// start and meet once instead of three times.
static void matmul_qkv(float* q, float* k, float* v, const QuantizedTensor& x, const QuantizedTensor& wq, const QuantizedTensor& wk, const QuantizedTensor& wv, int n, int dq,
                       int dkv, int nb) {
    const int tq = tiles(dq), tkv = tiles(dkv);
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < tq + 2 * tkv; t++) {
        if (t < tq) matmul_tile(q, x, wq, n, dq, nb, t);
        else if (t < tq + tkv) matmul_tile(k, x, wk, n, dkv, nb, t - tq);
        else matmul_tile(v, x, wv, n, dkv, nb, t - tq - tkv);
    }
}

// matmul_swiglu: h = silu(W1 x) * (W3 x) (d rows each, nb tokens; h3 is
// scratch for W3 x): both matrices tile by tile in one parallel loop, the gate
// applied while the tile is in cache.
static void matmul_swiglu(float* h, float* h3, const QuantizedTensor& x, const QuantizedTensor& w1, const QuantizedTensor& w3, int n, int d, int nb) {
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles(d); t++) {
        matmul_tile(h, x, w1, n, d, nb, t);
        matmul_tile(h3, x, w3, n, d, nb, t);
        const int i = kTile * t, rows = std::min(kTile, d - i);
        for (int b = 0; b < nb; b++) swiglu(h + (size_t)b * d + i, h3 + (size_t)b * d + i, rows);
    }
}

// ----------------------------------------------------------------------------
// The forward pass: a block of tokens at their positions in, logits out.

struct Transformer {
    Checkpoint checkpoint;
    RunState state;
    double matmul_seconds = 0, attention_seconds = 0;  // time spent in forward's parts, for the speed report
    const Config& config() const { return checkpoint.config; }
};

// forward: the n <= kBlock tokens at positions pos .. pos + n - 1 in; logits
// out, for the last token, or for all n (rows of vocab_size) if all_logits.
static float* forward(Transformer& tr, const int* tokens, int n, int pos, bool all_logits) {
    const Config& c = tr.checkpoint.config;
    const TransformerWeights& w = tr.checkpoint.w;
    RunState& s = tr.state;
    const size_t dim = c.dim, kv_dim = c.kv_dim(), hidden = c.hidden_dim;
    float* x = s.x.get();
    if (n < 1 || n > kBlock || pos < 0 || pos + n > s.positions)  // the KV cache holds s.positions
        fatal("forward: positions %d..%d are outside the context of %d", pos, pos + n - 1, s.positions);
    QuantizedTensor& xq = s.xq.t;

    // x = self.tok_embeddings(tokens): dequantize just these rows of the table
    const QuantizedTensor& e = w.token_embedding;
    for (int b = 0; b < n; b++)
        dequantize(e.row(tokens[b], dim), x + b * dim, dim);

    for (size_t l = 0; l < (size_t)c.n_layers; l++) {
        // h = self.attention_norm(x)
        for (int b = 0; b < n; b++) rmsnorm(s.xb.get() + b * dim, x + b * dim, w.rms_att + l * dim, dim, c.norm_eps);

        // q, k, v = wq(h), wk(h), wv(h) on the int8 h; attention stores k and v in the cache
        float* k = s.k.get();
        float* v = s.v.get();
        quantize(xq, s.xb.get(), n, dim);
        {
            Stopwatch clock{tr.matmul_seconds};
            matmul_qkv(s.q.get(), k, v, xq, w.wq[l], w.wk[l], w.wv[l], dim, dim, kv_dim, n);
        }

        // q, k = apply_rope(q, k); out = softmax(q @ k.T / sqrt(head_size), causal) @ v
        {
            Stopwatch clock{tr.attention_seconds};
            attention(s, c, l, pos, n);
        }

        // x = x + self.attention.wo(out)
        quantize(xq, s.xb.get(), n, dim);
        {
            Stopwatch clock{tr.matmul_seconds};
            matmul(s.xb2.get(), xq, w.wo[l], dim, dim, n);
        }
        accum(x, s.xb2.get(), n * dim);

        // h = self.ffn_norm(x); x = x + w2(silu(w1(h)) * w3(h))
        for (int b = 0; b < n; b++) rmsnorm(s.xb.get() + b * dim, x + b * dim, w.rms_ffn + l * dim, dim, c.norm_eps);
        quantize(xq, s.xb.get(), n, dim);
        {
            Stopwatch clock{tr.matmul_seconds};
            matmul_swiglu(s.hb.get(), s.hb2.get(), xq, w.w1[l], w.w3[l], dim, hidden, n);
        }
        quantize(s.hq.t, s.hb.get(), n, hidden);
        {
            Stopwatch clock{tr.matmul_seconds};
            matmul(s.xb.get(), s.hq.t, w.w2[l], hidden, dim, n);
        }
        accum(x, s.xb.get(), n * dim);
    }

    // logits = self.output(self.norm(x)), for the tokens whose logits are wanted
    const int first = all_logits ? 0 : n - 1;
    for (int b = first; b < n; b++) rmsnorm(x + b * dim, x + b * dim, w.rms_final, dim, c.norm_eps);
    quantize(xq, x + first * dim, n - first, dim);
    {
        Stopwatch clock{tr.matmul_seconds};
        matmul(s.logits.get(), xq, w.wcls, dim, c.vocab_size, n - first);
    }
    check_logits(s.logits.get(), c.vocab_size, first == n - 1 ? pos + n - 1 : pos, n - first);
    return s.logits.get();
}

// ----------------------------------------------------------------------------
// Tokenizer: llama2.c's tokenizer.bin, a SentencePiece BPE vocabulary with
// U+2581 already turned into ' '. Ids 0, 1, 2 are <unk>, BOS, EOS; when the
// vocabulary has byte-fallback pieces they are "<0x00>".."<0xFF>" at ids 3..258.
// A byte-level BPE (GPT-2's scheme: Llama 3, SmolLM2) stores its pieces as raw
// bytes and adds a block after them (docs/file-formats.md, "tokenizer.bin"): its BOS and
// EOS ids, the special tokens, the merges in rank order, the regex that splits
// text into words, and the Unicode classes that regex needs.

enum CharClass { kOther, kLetter, kNumber, kSpace };  // \p{L}, \p{N}, \s
enum Split { kSentencePiece, kLlama3Split, kGpt2Split, kGpt2DigitsSplit };

struct Tokenizer {
    std::vector<std::string> vocab;    // id -> piece
    std::vector<float> scores;         // id -> merge priority (higher first)
    std::unordered_map<std::string_view, int> ids;  // piece -> id, normal pieces only
    bool byte_fallback = false;        // ids 3..258 are the 256 byte pieces
    int bos = kBos;                    // put before a prompt; -1: none
    std::vector<int> eos{kEos};        // any of these ends a text
    // byte-level BPE only
    Split split = kSentencePiece;      // how text is cut into words before merging
    bool ignore_merges = false;        // a word that is a piece is that piece (Llama 3)
    std::vector<bool> special;         // id -> a control token: never made from text
    std::unordered_map<uint64_t, std::pair<int, int>> merges;  // left << 32 | right -> (rank, id)
    std::vector<uint32_t> range_first, range_last;  // sorted code point ranges ...
    std::vector<uint8_t> range_class;               // ... and their CharClass
    uint8_t ascii_class[128] = {};
    int byte_id[256] = {};             // byte -> its one-byte piece
    Tokenizer() = default;
    Tokenizer(Tokenizer&&) = default;  // a moved vector keeps its strings where they are
    Tokenizer& operator=(Tokenizer&&) = default;
    Tokenizer(const Tokenizer&) = delete;  // a copy's ids would point into the original's vocab
    Tokenizer& operator=(const Tokenizer&) = delete;
};

// The byte-level BPE's parts (in Byte-level BPE, after the command line): the
// block after its pieces, read and checked; and the text cut into words and
// bytes, the symbols encode merges.
static void load_byte_level(Tokenizer& t, const uint8_t* p, size_t size, size_t off, const char* path);
static void byte_level_symbols(const Tokenizer& t, std::string_view text, std::vector<int>& sym,
                               std::vector<char>& word_start);

static Tokenizer load_tokenizer(const char* path, int vocab_size) {
    MappedFile f(path);
    const uint8_t* p = f.data();
    const size_t size = f.size();
    if (size < 4) fatal("%s: truncated tokenizer header", path);
    const int32_t max_len = read_at<int32_t>(p, 0);
    if (max_len <= 0 || max_len > (1 << 20))
        fatal("%s: bad tokenizer header: max_token_length = %d", path, max_len);

    Tokenizer t;
    t.vocab.reserve(vocab_size);
    t.scores.reserve(vocab_size);
    size_t off = 4;
    for (int i = 0; i < vocab_size; i++) {
        if (size - off < 8)
            fatal("%s: ends after %d of the model's %d tokens", path, i, vocab_size);
        const float score = read_at<float>(p, off);
        const int32_t len = read_at<int32_t>(p, off + 4);
        off += 8;
        if (!std::isfinite(score)) fatal("%s: token %d has score %g", path, i, score);
        if (len <= 0 || len > max_len)
            fatal("%s: token %d has length %d (max_token_length %d)", path, i, len, max_len);
        if (size - off < (size_t)len)
            fatal("%s: token %d runs past the end of the file", path, i);
        t.vocab.emplace_back(reinterpret_cast<const char*>(p + off), len);
        t.scores.push_back(score);
        off += len;
    }
    const bool extended = size - off >= 4 && std::memcmp(p + off, "tokx", 4) == 0;
    if (off != size && !extended)
        fatal("%s: %zu bytes after the model's %d tokens (tokenizer for another model?)", path,
              size - off, vocab_size);

    t.byte_fallback = vocab_size >= 259;
    for (int b = 0; b < 256 && t.byte_fallback; b++) {
        char want[8];
        std::snprintf(want, sizeof want, "<0x%02X>", b);
        t.byte_fallback = t.vocab[b + 3] == want;
    }
    // Only normal pieces take part in lookups and merges, as in SentencePiece:
    // the text "<unk>" or "<0x41>" must not become a special or byte token.
    const int first_normal = t.byte_fallback ? 259 : 3;
    if (extended) {  // byte-level: its own lookup table (all but the special tokens)
        load_byte_level(t, p, size, off + 4, path);
        return t;
    }
    for (int i = first_normal; i < vocab_size; i++) t.ids.emplace(t.vocab[i], i);  // first id wins
    return t;
}

// The UTF-8 character that starts with byte c: its length (0 if no character
// starts with c) and the range its second byte must lie in, which rules out
// overlong forms, surrogates and code points above U+10FFFF.
struct Utf8Lead { int len, lo, hi; };
static Utf8Lead utf8_lead(unsigned char c) {
    if (c < 0x80) return {1, 0, 0};
    if (c >= 0xC2 && c <= 0xDF) return {2, 0x80, 0xBF};
    if (c >= 0xE0 && c <= 0xEF) return {3, c == 0xE0 ? 0xA0 : 0x80, c == 0xED ? 0x9F : 0xBF};
    if (c >= 0xF0 && c <= 0xF4) return {4, c == 0xF0 ? 0x90 : 0x80, c == 0xF4 ? 0x8F : 0xBF};
    return {0, 0, 0};
}

// Length of the UTF-8 character at s[0..n), or 0 if it is not well formed.
static int utf8_char_len(const unsigned char* s, size_t n) {
    const Utf8Lead u = utf8_lead(s[0]);
    if (u.len <= 1) return u.len;
    if ((size_t)u.len > n || s[1] < u.lo || s[1] > u.hi) return 0;
    for (int i = 2; i < u.len; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return u.len;
}

// The UTF-8 character at s[0..n) as a code point, and how many bytes it takes.
// An ill-formed sequence reads as U+FFFD over its longest well-formed start
// (at least one byte), as the WHATWG decoder (TextDecoder) replaces it.
static int utf8_decode(const unsigned char* s, size_t n, uint32_t* cp) {
    const Utf8Lead u = utf8_lead(s[0]);
    *cp = 0xFFFD;
    if (u.len == 1) *cp = s[0];
    if (u.len <= 1) return 1;
    if (n < 2 || s[1] < u.lo || s[1] > u.hi) return 1;
    uint32_t c = s[0] & (0xFF >> (u.len + 1));
    for (int i = 1; i < u.len; i++) {
        if ((size_t)i >= n || (i > 1 && (s[i] & 0xC0) != 0x80)) return i;
        c = c << 6 | (s[i] & 0x3F);
    }
    *cp = c;
    return u.len;
}

// encode: text -> token ids. SentencePiece BPE (with a dummy prefix):
// 1. BOS if asked; " " before non-empty text (SentencePiece's dummy prefix).
// 2. Each UTF-8 character becomes its piece, or its bytes' byte pieces.
// 3. Repeatedly merge the adjacent pair whose concatenation is the
//    highest-scoring piece, leftmost first on ties.
// Byte-level BPE: BOS if the tokenizer has one, the words' bytes
// (byte_level_symbols), and in step 3 the pair of lowest merge rank, never
// across words.
// Step 3 keeps the candidate pairs in a priority queue over a linked list of
// symbols, so it costs O(n log n) rather than a rescan of all pairs per merge.
static std::vector<int> encode(const Tokenizer& t, std::string_view text, bool bos, bool dummy_prefix = true) {
    std::vector<int> tokens;
    if (bos && t.bos >= 0) tokens.push_back(t.bos);
    if (text.empty()) return tokens;

    std::vector<int> sym;          // symbol ids before merging
    std::vector<char> word_start;  // byte-level: no merge joins a symbol to the one before it
    auto push_piece = [&](std::string_view piece) {
        auto it = t.ids.find(piece);
        if (it != t.ids.end()) { sym.push_back(it->second); return; }
        if (!t.byte_fallback)
            fatal("the prompt contains \"%.*s\", which this vocabulary cannot encode",
                  (int)piece.size(), piece.data());
        for (unsigned char b : piece) sym.push_back(b + 3);
    };
    if (t.split != kSentencePiece) {
        byte_level_symbols(t, text, sym, word_start);
    } else {
        if (dummy_prefix) push_piece(" ");
        const auto* s = reinterpret_cast<const unsigned char*>(text.data());
        for (size_t i = 0; i < text.size();) {
            int len = utf8_char_len(s + i, text.size() - i);
            if (len == 0) len = 1;  // a stray byte: goes to byte fallback
            push_piece(text.substr(i, len));
            i += len;
        }
        word_start.assign(sym.size(), 0);
    }

    // Symbols form a doubly linked list; a merge folds right into left.
    const int n = (int)sym.size();
    std::vector<int> prev(n), next(n), version(n, 0);
    for (int i = 0; i < n; i++) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
    struct Pair { double score; int left, right, left_version, right_version, id; };
    // highest score first; on ties the leftmost (positions keep list order)
    auto worse = [](const Pair& a, const Pair& b) {
        return a.score != b.score ? a.score < b.score : a.left > b.left;
    };
    std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> queue(worse);
    std::string buf;
    auto consider = [&](int left, int right) {
        if (left < 0 || right < 0 || word_start[right]) return;
        if (t.split != kSentencePiece) {  // score: minus the merge's rank
            const auto it = t.merges.find((uint64_t)sym[left] << 32 | (uint32_t)sym[right]);
            if (it != t.merges.end())
                queue.push({-(double)it->second.first, left, right, version[left], version[right], it->second.second});
            return;
        }
        buf = t.vocab[sym[left]];
        buf += t.vocab[sym[right]];
        auto it = t.ids.find(buf);
        if (it != t.ids.end())
            queue.push({t.scores[it->second], left, right, version[left], version[right], it->second});
    };
    for (int i = 0; i + 1 < n; i++) consider(i, i + 1);
    while (!queue.empty()) {
        const Pair p = queue.top();
        queue.pop();
        // stale if either side was merged since this pair was queued
        if (version[p.left] != p.left_version || version[p.right] != p.right_version ||
            next[p.left] != p.right)
            continue;
        sym[p.left] = p.id;
        version[p.left]++;
        version[p.right]++;  // the right symbol is gone
        next[p.left] = next[p.right];
        if (next[p.left] >= 0) prev[next[p.left]] = p.left;
        consider(prev[p.left], p.left);
        consider(p.left, next[p.left]);
    }
    for (int i = 0; i >= 0; i = next[i]) tokens.push_back(sym[i]);
    return tokens;
}

// decode: the bytes `token` contributes when it follows `prev`.
static std::string_view decode(const Tokenizer& t, int prev, int token, char* byte) {
    std::string_view piece = t.vocab[token];
    if (t.byte_fallback && token >= 3 && token < 259) {  // "<0xAB>" is the byte 0xAB
        *byte = (char)(token - 3);
        return std::string_view(byte, 1);
    }
    if (t.split != kSentencePiece) return t.special[token] ? std::string_view() : piece;  // control tokens print nothing
    if (prev == kBos && !piece.empty() && piece[0] == ' ') piece.remove_prefix(1);
    return piece;
}

// TextOut writes decoded pieces to stdout so that a terminal never sees a
// broken character: bytes of a multi-byte UTF-8 character are held until the
// character is complete (tokens often split them), malformed sequences become
// U+FFFD, and control bytes other than whitespace are dropped (as llama2.c's
// safe_printf does) so a model cannot emit terminal escape sequences.
class TextOut {
public:
    void write(std::string_view piece) {
        for (char ch : piece) put((unsigned char)ch);
        std::fflush(stdout);
    }
    void finish() {  // an unfinished character at the end is malformed
        if (!pending_.empty()) replace();
        std::fflush(stdout);
    }

private:
    std::string pending_;  // the start of an incomplete character
    Utf8Lead lead_{};      // what its first byte promised
    void replace() { std::fputs("\xEF\xBF\xBD", stdout); pending_.clear(); }
    void put(unsigned char b) {
        if (!pending_.empty()) {
            // the second byte within the lead's range, any later one a continuation byte
            const bool ok = pending_.size() == 1 ? b >= lead_.lo && b <= lead_.hi : (b & 0xC0) == 0x80;
            if (!ok) {
                replace();
                put(b);  // b starts afresh
                return;
            }
            pending_ += (char)b;
            if ((int)pending_.size() == lead_.len) {
                std::fwrite(pending_.data(), 1, pending_.size(), stdout);
                pending_.clear();
            }
        } else if (b < 0x80) {
            if (b >= 0x20 ? b != 0x7F : (b == '\n' || b == '\t' || b == '\r' || b == '\v' || b == '\f'))
                std::fputc(b, stdout);
        } else if ((lead_ = utf8_lead(b)).len > 1) {
            pending_ += (char)b;
        } else {
            std::fputs("\xEF\xBF\xBD", stdout);  // a byte no character starts with
        }
    }
};

// ----------------------------------------------------------------------------
// Sampler: the same rules and random numbers as llama2.c's run.c, so the same
// seed gives the same text in both.

struct Sampler {
    float temperature;  // 0 = greedy
    float topp;         // nucleus threshold; 0 or 1 = off
    uint64_t rng_state;
    std::vector<std::pair<float, int>> candidates;  // (vocab_size,) top-p scratch
};

// xorshift64*: https://en.wikipedia.org/wiki/Xorshift#xorshift*
static uint32_t random_u32(uint64_t* state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float random_f32(uint64_t* state) {  // [0, 1) with 24 random bits
    return (float)(random_u32(state) >> 8) / 16777216.0f;
}

// lowest id on ties
static int sample_argmax(const float* p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (p[i] > p[best]) best = i;
    return best;
}

// walk the cumulative distribution; the last id catches rounding
static int sample_mult(const float* p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (coin < cdf) return i;
    }
    return n - 1;
}

// Nucleus sampling: sample from the smallest set of most likely tokens whose
// probabilities sum past topp. Tokens below (1 - topp) / (n - 1) can never be
// in that set, so they are dropped before the sort.
static int sample_topp(const float* p, int n, float topp, std::vector<std::pair<float, int>>& cand,
                       float coin) {
    const float cutoff = (1.0f - topp) / (n - 1);
    cand.clear();
    for (int i = 0; i < n; i++)
        if (p[i] >= cutoff) cand.push_back({p[i], i});
    // With topp < 1/n the cutoff can drop everything; then the most likely
    // token alone passes topp, and it is the answer.
    if (cand.empty()) return sample_argmax(p, n);
    // most likely first; equal probabilities in id order
    std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    int last = (int)cand.size() - 1;  // rounding may never pass topp: keep all
    float cum = 0.0f;
    for (int i = 0; i < (int)cand.size(); i++) {
        cum += cand[i].first;
        if (cum > topp) { last = i; break; }
    }
    const float r = coin * cum;
    float cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += cand[i].first;
        if (r < cdf) return cand[i].second;
    }
    return cand[last].second;
}

// sample: logits (overwritten) -> token id. Draws one random number unless greedy.
static int sample(Sampler& s, float* logits, int n) {
    if (s.temperature == 0.0f) return sample_argmax(logits, n);
    // softmax(logits / temperature), the maximum subtracted before dividing (as
    // softmax would after): a temperature as small as 1e-45 then gives 0 and
    // -inf, never inf - inf = NaN, and sampling tends to argmax as it should.
    const float mx = *std::max_element(logits, logits + n);
    for (int i = 0; i < n; i++) logits[i] = (logits[i] - mx) / s.temperature;
    softmax(logits, n);
    const float coin = random_f32(&s.rng_state);
    if (s.topp <= 0.0f || s.topp >= 1.0f) return sample_mult(logits, n, coin);
    return sample_topp(logits, n, s.topp, s.candidates, coin);
}

// ----------------------------------------------------------------------------
// Generate and chat

// Test hook (RUN_DUMP_LOGITS=file): a record per position: int32 pos, int32
// input token, float logits[vocab], then int32 the token chosen next (forced
// or sampled; -1 if none). tests/conftest.py reads it.
static void dump_logits(std::FILE* f, int pos, int token, const float* logits, int n) {
    if (!f) return;
    const int32_t head[2] = {pos, token};
    std::fwrite(head, sizeof head, 1, f);
    std::fwrite(logits, sizeof(float), n, f);
}
static void dump_next(std::FILE* f, int32_t next) {
    if (f) std::fwrite(&next, sizeof next, 1, f);
}

// Knobs for the tests, from the environment: RUN_DUMP_LOGITS (above), and
// RUN_BLOCK, the prompt block size (1..kBlock), to show blocking changes nothing.
struct TestHooks {
    std::FILE* dump = nullptr;
    int block = kBlock;
};

// prefill: reads tokens into the context at positions pos, pos + 1, ... in
// blocks, many tokens per pass over the weights, and returns the logits after
// the last one. The test hook makes it compute and dump every position's logits.
static float* prefill(Transformer& tr, const std::vector<int>& tokens, int pos, const TestHooks& hooks) {
    const int vocab = tr.config().vocab_size;
    const bool all = hooks.dump != nullptr;
    float* logits = nullptr;
    // Blocks of about equal size, rounded up to whole vectors of 16 tokens (run's
    // prompt matmul holds 16 tokens in a register): 195 tokens are read as
    // 112 + 83, not as 192 + 3, whose 3 would cost a pass over the weights alone.
    const size_t blocks = std::max<size_t>(1, (tokens.size() + hooks.block - 1) / hooks.block);
    const size_t size = std::min<size_t>(hooks.block, ((tokens.size() + blocks - 1) / blocks + 15) / 16 * 16);
    for (size_t i = 0; i < tokens.size(); i += size) {
        const int n = (int)std::min(tokens.size() - i, size);
        logits = forward(tr, &tokens[i], n, pos + (int)i, all);
        for (int b = 0; all && b < n; b++) {
            dump_logits(hooks.dump, pos + (int)i + b, tokens[i + b], logits + (size_t)b * vocab, vocab);
            if (i + b + 1 < tokens.size()) dump_next(hooks.dump, tokens[i + b + 1]);
        }
        if (all) logits += (size_t)(n - 1) * vocab;  // the last token's row
    }
    return logits;
}

// Echoes the prompt, then samples until `steps` positions, BOS or EOS.
static void generate(Transformer& tr, const Tokenizer& tok, Sampler& sampler,
                     const std::string& prompt, int steps, const TestHooks& hooks) {
    const int vocab = tr.config().vocab_size;
    const std::vector<int> prompt_tokens = encode(tok, prompt, true);
    if (prompt_tokens.empty()) fatal("-i: this tokenizer has no BOS token to start from; give a prompt");
    const int n_prompt = (int)prompt_tokens.size();
    if (n_prompt > steps)
        fatal("the prompt is %d tokens (with BOS) but -n allows %d positions", n_prompt, steps);

    const double start = now_seconds();
    float* logits = prefill(tr, prompt_tokens, 0, hooks);
    const double prompt_done = now_seconds(), prompt_matmul = tr.matmul_seconds, prompt_att = tr.attention_seconds;
    // the prompt is echoed once read: bad weights stop the run before anything is printed
    TextOut out;
    char byte;
    for (int i = 1; i < n_prompt; i++) out.write(decode(tok, prompt_tokens[i - 1], prompt_tokens[i], &byte));

    // Each step samples from the last logits, then runs the new token at `pos`.
    int token = prompt_tokens.back(), generated = 0;
    for (int pos = n_prompt;; pos++) {
        const int next = sample(sampler, logits, vocab);
        generated++;
        dump_next(hooks.dump, next);
        if (next == tok.bos || std::find(tok.eos.begin(), tok.eos.end(), next) != tok.eos.end()) break;
        out.write(decode(tok, token, next, &byte));
        token = next;
        if (pos >= steps) break;
        logits = forward(tr, &token, 1, pos, false);
        dump_logits(hooks.dump, pos, token, logits, vocab);
    }
    out.finish();
    std::fputc('\n', stdout);
    std::fflush(stdout);
    // The prompt's forward passes yield the first new token; each later
    // forward yields one more, so generation speed counts generated - 1.
    const double end = now_seconds(), elapsed = std::max(end - prompt_done, 1e-9);
    std::fprintf(stderr, "prompt: %d tokens, %.1f tok/s; generation: %d tokens, %.1f tok/s (%.0f%% matmuls, %.0f%% attention), %d thread%s\n",
                 n_prompt, n_prompt / std::max(prompt_done - start, 1e-9), generated,
                 std::max(generated - 1, 0) / elapsed, 100 * (tr.matmul_seconds - prompt_matmul) / elapsed,
                 100 * (tr.attention_seconds - prompt_att) / elapsed, threads(), threads() == 1 ? "" : "s");
}

// Perplexity of a text: exp of the mean negative log-likelihood of each token
// given the ones before it. The text is cut into windows of `window` positions,
// BOS then window - 1 tokens, every one of them predicted; each window is read
// in blocks, like a prompt. The standard error comes from the spread of the
// per-token NLLs (and, to first order, exp(mean) times it for the perplexity).
static void perplexity(Transformer& tr, const Tokenizer& tok, std::string_view text, int window) {
    const int vocab = tr.config().vocab_size;
    const std::vector<int> ids = encode(tok, text, false);
    double sum = 0, sum_sq = 0;
    long count = 0, windows = 0;
    const double start = now_seconds();
    std::vector<int> w;
    for (size_t first = 0; first < ids.size(); first += window - 1, windows++) {
        // BOS, then window - 1 tokens; without a BOS the window's first token starts it
        w.clear();
        if (tok.bos >= 0) w.push_back(tok.bos);
        w.insert(w.end(), ids.begin() + first, ids.begin() + std::min(ids.size(), first + window - (tok.bos >= 0)));
        for (size_t i = 0; i + 1 < w.size(); i += kBlock) {
            const int n = (int)std::min(w.size() - 1 - i, (size_t)kBlock);  // inputs whose next token is known
            const float* logits = forward(tr, &w[i], n, (int)i, true);
            for (int b = 0; b < n; b++) {
                const float* z = logits + (size_t)b * vocab;
                const float zmax = *std::max_element(z, z + vocab);
                double sum_exp = 0;
                for (int v = 0; v < vocab; v++) sum_exp += std::exp((double)z[v] - zmax);
                const double nll = zmax + std::log(sum_exp) - z[w[i + b + 1]];
                sum += nll, sum_sq += nll * nll, count++;
            }
        }
    }
    if (count == 0) fatal("-f: the text has no tokens to predict");
    const double mean = sum / count, se = std::sqrt(std::max(sum_sq / count - mean * mean, 0.0) / count);
    std::printf("perplexity %.4f +- %.4f (mean NLL %.5f +- %.5f nats) over %ld tokens\n", std::exp(mean),
                std::exp(mean) * se, mean, se, count);
    std::fprintf(stderr, "perplexity: %ld tokens in %ld windows of up to %d positions, %.1f tok/s\n", count, windows,
                 window, count / std::max(now_seconds() - start, 1e-9));
}

// Reads one line from stdin after printing a label; false at end of input.
static bool read_line(const char* label, std::string& line) {
    std::fputs(label, stdout);
    std::fflush(stdout);
    return static_cast<bool>(std::getline(std::cin, line));
}

// One chat turn as tokens, in the model's template. The control tokens inside a
// template go in as their ids, never as text for the tokenizer to split.
//   llama2: [BOS] [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]   (first turn)
//           [BOS] [INST] {user} [/INST]                                  (later turns)
//   zephyr: [BOS] <|system|>\n{system} [EOS] \n<|user|>\n{user} [EOS] \n<|assistant|>\n
//           later turns start at \n<|user|>, after the answer's EOS. Only the
//           conversation's first text gets SentencePiece's leading space.
//   llama3: <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
//           <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
//           <|start_header_id|>assistant<|end_header_id|>\n\n
//           (one line; later turns start at the user's header; the system part
//           only with a system prompt; {system} and {user} trimmed of white
//           space, as the template's `| trim` does)
// An answer ends at `end` or any of the tokenizer's EOS ids (and, for
// SentencePiece's templates, at BOS); `close` then goes into the context, so
// that the next turn sees a finished answer.
struct ChatTemplate {
    std::string name;
    int close = kEos;
    std::vector<int> end{kBos, kEos};
    int begin = -1, header = -1, header_end = -1;  // llama3's control tokens
};

static int special_id(const Tokenizer& tok, const char* piece) {
    for (int i = 0; i < (int)tok.vocab.size(); i++)
        if (tok.special[i] && tok.vocab[i] == piece) return i;
    fatal("-c llama3: the tokenizer has no %s token", piece);
}

static ChatTemplate chat_template(const Tokenizer& tok, const std::string& name) {
    ChatTemplate t;
    const bool byte_level = tok.split != kSentencePiece;
    t.name = !name.empty() ? name : byte_level ? "llama3" : "llama2";
    if (t.name != "llama3") {
        if (byte_level)
            fatal("-c %s: a SentencePiece template, but the tokenizer is a byte-level BPE (try -c llama3)", t.name.c_str());
        return t;
    }
    if (!byte_level) fatal("-c llama3 needs Llama 3's tokenizer (a byte-level BPE), not a SentencePiece one");
    t.begin = special_id(tok, "<|begin_of_text|>");
    t.header = special_id(tok, "<|start_header_id|>");
    t.header_end = special_id(tok, "<|end_header_id|>");
    t.close = special_id(tok, "<|eot_id|>");
    t.end = tok.eos;
    t.end.push_back(t.close);
    return t;
}

static std::string trimmed(const std::string& s) {
    const char* space = " \t\n\r\v\f";
    const size_t a = s.find_first_not_of(space), b = s.find_last_not_of(space);
    return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

static std::vector<int> render_turn(const Tokenizer& tok, const ChatTemplate& tmpl, bool first,
                                    const std::string& system, const std::string& user) {
    if (tmpl.name == "llama2") {
        if (first && !system.empty())
            return encode(tok, "[INST] <<SYS>>\n" + system + "\n<</SYS>>\n\n" + user + " [/INST]", true);
        return encode(tok, "[INST] " + user + " [/INST]", true);
    }
    std::vector<int> ids;
    auto text = [&](const std::string& s) {
        const bool start = tmpl.name == "zephyr" && first && ids.empty();
        const std::vector<int> t = encode(tok, s, start, start);
        ids.insert(ids.end(), t.begin(), t.end());
    };
    if (tmpl.name == "llama3") {
        auto message = [&](const char* role, const std::string& content) {
            ids.push_back(tmpl.header);
            text(role);
            ids.push_back(tmpl.header_end);
            text("\n\n" + trimmed(content));
            ids.push_back(tmpl.close);
        };
        if (first) ids.push_back(tmpl.begin);
        if (first && !system.empty()) message("system", system);
        message("user", user);
        ids.push_back(tmpl.header);
        text("assistant");
        ids.push_back(tmpl.header_end);
        text("\n\n");
        return ids;
    }
    if (first && !system.empty()) {
        text("<|system|>\n" + system);
        ids.push_back(kEos);
    }
    text((ids.empty() && first ? "" : "\n") + std::string("<|user|>\n") + user);
    ids.push_back(kEos);
    text("\n<|assistant|>\n");
    return ids;
}

static void chat(Transformer& tr, const Tokenizer& tok, Sampler& sampler, const ChatTemplate& tmpl,
                 const std::string& first_user_prompt, const std::string& cli_system_prompt,
                 bool have_system_prompt, int steps, const TestHooks& hooks) {
    const int vocab = tr.config().vocab_size;
    std::string system = cli_system_prompt, user;
    if (!have_system_prompt && !read_line("Enter system prompt (optional): ", system)) {
        std::fputc('\n', stdout);
        return;
    }
    int pos = 0;
    for (int turn = 0;; turn++) {
        if (turn == 0 && !first_user_prompt.empty()) {
            user = first_user_prompt;
        } else if (!read_line("User: ", user)) {
            std::fputc('\n', stdout);
            return;
        }
        const std::vector<int> prompt = render_turn(tok, tmpl, turn == 0, system, user);
        if (pos + (int)prompt.size() > steps) {
            std::fputc('\n', stdout);
            std::fflush(stdout);
            std::fprintf(stderr, "the context is full (%d of %d positions used); ending the chat\n",
                         pos, steps);
            return;
        }
        std::fputs("Assistant: ", stdout);
        float* logits = prefill(tr, prompt, pos, hooks);
        pos += (int)prompt.size();
        TextOut out;
        int token = prompt.back();
        for (;;) {
            const int next = sample(sampler, logits, vocab);
            dump_next(hooks.dump, next);
            if (std::find(tmpl.end.begin(), tmpl.end.end(), next) != tmpl.end.end()) {
                // into the history: the closing token (SentencePiece's templates: EOS, not BOS)
                const int close = tmpl.name == "llama3" || next == kEos ? tmpl.close : -1;
                if (close >= 0 && pos < steps) {
                    dump_logits(hooks.dump, pos, close, forward(tr, &close, 1, pos, false), vocab);
                    dump_next(hooks.dump, -1);
                    pos++;
                }
                break;
            }
            char byte;
            out.write(decode(tok, token, next, &byte));
            token = next;
            if (pos >= steps) {
                out.finish();
                std::fputc('\n', stdout);
                std::fflush(stdout);
                std::fprintf(stderr, "the context is full (%d positions); ending the chat\n", steps);
                return;
            }
            logits = forward(tr, &token, 1, pos, false);
            dump_logits(hooks.dump, pos++, token, logits, vocab);
        }
        out.finish();
        std::fputc('\n', stdout);
    }
}

// ----------------------------------------------------------------------------
// Command line

static void usage(std::FILE* f) {
    std::fprintf(f,
        "Usage:   %s <checkpoint> [options]\n"
        "Example: %s model.bin -n 256 -i \"Once upon a time\"\n"
        "Options:\n"
        "  -t <float>  temperature >= 0, default 1.0 (0 = greedy)\n"
        "  -p <float>  top-p (nucleus) sampling in [0, 1], default 0.9 (0 or 1 = off)\n"
        "  -s <int>    random seed, default 0 = the current time\n"
        "  -n <int>    positions to run, prompt included, default 256 (0 = seq_len)\n"
        "  -i <string> prompt\n"
        "  -z <path>   tokenizer, default tokenizer.bin\n"
        "  -m <mode>   generate | chat | tokenize | perplexity, default generate\n"
        "  -f <path>   text file whose perplexity to measure (-n: window, default seq_len)\n"
        "  -k <type>   KV cache: f32 | int8 (a quarter of the memory), default %s\n"
        "  -y <string> system prompt (chat mode)\n"
        "  -c <name>   chat template: llama2 | zephyr (TinyLlama-Chat and other Zephyr-style models) |\n"
        "              llama3 (Llama 3.x Instruct); default llama3 with a byte-level tokenizer, else llama2\n"
        "  -h, --help  this help\n",
        kProgram, kProgram, kDefaultKvInt8 ? "int8" : "f32");
}

// Strict number parsing: the whole string must be a number in range.
static double parse_number(const char* flag, const char* s, bool integer) {
    errno = 0;
    char* end = nullptr;
    double v = integer ? (double)std::strtoll(s, &end, 10) : std::strtod(s, &end);
    if (*s == '\0' || std::isspace((unsigned char)*s) || *end != '\0' || errno == ERANGE ||
        !std::isfinite(v))
        fatal("%s: '%s' is not a %s", flag, s, integer ? "whole number" : "finite number");
    return v;
}

struct Options {
    const char* checkpoint = nullptr;
    const char* tokenizer = "tokenizer.bin";
    float temperature = 1.0f, topp = 0.9f;
    uint64_t seed = 0;
    int steps = 256;
    bool steps_given = false;
    std::string prompt, system_prompt;
    bool have_system_prompt = false;
    std::string mode = "generate";
    std::string chat_template;  // default: llama2, or llama3 for a byte-level tokenizer
    const char* text_file = nullptr;  // -f, for perplexity
    bool kv_int8 = kDefaultKvInt8;    // -k
};

static Options parse_args(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; i++)
        if (!std::strcmp(argv[i], "-h") || !std::strcmp(argv[i], "--help")) {
            usage(stdout);
            std::exit(0);
        }
    if (argc < 2 || argv[1][0] == '-') {
        fatal("the first argument must be a checkpoint path (see --help)");
    }
    o.checkpoint = argv[1];
    for (int i = 2; i < argc; i += 2) {
        const char* flag = argv[i];
        if (flag[0] != '-' || std::strlen(flag) != 2) fatal("unknown argument '%s' (see --help)", flag);
        if (!std::strchr("tpsnizmycfk", flag[1])) fatal("unknown flag %s (see --help)", flag);
        if (i + 1 >= argc) fatal("%s needs a value", flag);
        const char* val = argv[i + 1];
        switch (flag[1]) {
        case 't': {
            double t = parse_number(flag, val, false);
            if (t < 0 || t > 1e6) fatal("-t: temperature %s is outside [0, 1e6]", val);
            o.temperature = (float)t;
            break;
        }
        case 'p': {
            double p = parse_number(flag, val, false);
            if (p < 0 || p > 1) fatal("-p: top-p %s is outside [0, 1]", val);
            o.topp = (float)p;
            break;
        }
        case 's': {
            // seeds are 64-bit unsigned; strtoull alone would accept "-1"
            errno = 0;
            char* end = nullptr;
            unsigned long long s = std::strtoull(val, &end, 10);
            if (!std::isdigit((unsigned char)val[0]) || *end != '\0' || errno == ERANGE)
                fatal("-s: seed '%s' is not a whole number in 0..2^64-1", val);
            o.seed = s;
            break;
        }
        case 'n': {
            double n = parse_number(flag, val, true);
            if (n < 0 || n > INT32_MAX) fatal("-n: steps %s is outside 0..%d", val, INT32_MAX);
            o.steps = (int)n;
            o.steps_given = true;
            break;
        }
        case 'i': o.prompt = val; break;
        case 'z': o.tokenizer = val; break;
        case 'm':
            o.mode = val;
            if (o.mode != "generate" && o.mode != "chat" && o.mode != "tokenize" && o.mode != "perplexity")
                fatal("-m: mode '%s' is not generate, chat, tokenize or perplexity", val);
            break;
        case 'y': o.system_prompt = val; o.have_system_prompt = true; break;
        case 'f': o.text_file = val; break;
        case 'k':
            if (std::strcmp(val, "f32") && std::strcmp(val, "int8")) fatal("-k: KV cache type '%s' is not f32 or int8", val);
            o.kv_int8 = !std::strcmp(val, "int8");
            break;
        case 'c':
            o.chat_template = val;
            if (o.chat_template != "llama2" && o.chat_template != "zephyr" && o.chat_template != "llama3")
                fatal("-c: chat template '%s' is not llama2, zephyr or llama3", val);
            break;
        }
    }
    return o;
}

#ifndef RUN_NO_MAIN
static int run_main(int argc, char** argv) {
    Options o = parse_args(argc, argv);

    if (o.mode == "tokenize") {  // needs only the vocabulary's size: the header, not the weights
        const Config c = read_config(MappedFile(o.checkpoint, false), o.checkpoint);
        const std::vector<int> ids = encode(load_tokenizer(o.tokenizer, c.vocab_size), o.prompt, true);
        for (size_t i = 0; i < ids.size(); i++) std::printf(i ? " %d" : "%d", ids[i]);
        std::printf("\n");
        return 0;
    }

    Transformer tr{load_checkpoint(o.checkpoint), {}};
    const Config& c = tr.config();
    Tokenizer tok = load_tokenizer(o.tokenizer, c.vocab_size);

    if (o.mode == "perplexity") {
        if (!o.text_file) fatal("-m perplexity needs a text file: -f <path>");
        if (!o.steps_given || o.steps == 0) o.steps = c.seq_len;  // the window: the whole context by default
        if (o.steps < 2) fatal("-n: a perplexity window of %d positions predicts nothing (at least 2)", o.steps);
    }
    if (o.steps == 0) o.steps = c.seq_len;
    if (o.steps > c.seq_len) {
        if (o.steps_given)  // the default 256 is not worth a note on small models
            std::fprintf(stderr, "note: -n %d is more than the model's seq_len; using %d\n", o.steps,
                         c.seq_len);
        o.steps = c.seq_len;
    }
    tr.state = make_run_state(c, o.steps, o.kv_int8);
    const uint64_t seed = o.seed ? o.seed : (uint64_t)std::time(nullptr);
    Sampler sampler{o.temperature, o.topp, seed, {}};
    sampler.candidates.reserve(c.vocab_size);

    TestHooks hooks;
    if (const char* path = std::getenv("RUN_DUMP_LOGITS")) {
        hooks.dump = std::fopen(path, "wb");
        if (!hooks.dump) fatal("RUN_DUMP_LOGITS: cannot write %s: %s", path, std::strerror(errno));
    }
    if (const char* block = std::getenv("RUN_BLOCK")) {
        const double b = parse_number("RUN_BLOCK", block, true);
        if (b < 1 || b > kBlock) fatal("RUN_BLOCK: %s is outside 1..%d", block, kBlock);
        hooks.block = (int)b;
    }

    if (o.mode == "perplexity") {
        const MappedFile text(o.text_file);
        perplexity(tr, tok, std::string_view((const char*)text.data(), text.size()), o.steps);
    } else if (o.mode == "generate")
        generate(tr, tok, sampler, o.prompt, o.steps, hooks);
    else
        chat(tr, tok, sampler, chat_template(tok, o.chat_template), o.prompt, o.system_prompt, o.have_system_prompt,
             o.steps, hooks);
    if (hooks.dump && std::fclose(hooks.dump) != 0) fatal("RUN_DUMP_LOGITS: write failed");
    return 0;
}

// The standard library reports a failed allocation by throwing; say so plainly.
int main(int argc, char** argv) {
    try {
        return run_main(argc, argv);
    } catch (const std::bad_alloc&) {
        fatal("out of memory");
    } catch (const std::exception& e) {
        fatal("%s", e.what());
    }
}
#endif

// ----------------------------------------------------------------------------
// Byte-level BPE: GPT-2's scheme (Llama 3, SmolLM2). The extension block of
// tokenizer.bin read and checked, and the split of text into words by the
// model's regex, using the Unicode classes the block carries.

static CharClass range_class(const Tokenizer& t, uint32_t cp) {
    const auto it = std::upper_bound(t.range_first.begin(), t.range_first.end(), cp);
    if (it == t.range_first.begin()) return kOther;
    const size_t r = it - t.range_first.begin() - 1;
    return cp <= t.range_last[r] ? (CharClass)t.range_class[r] : kOther;
}

static CharClass char_class(const Tokenizer& t, uint32_t cp) {
    return cp < 128 ? (CharClass)t.ascii_class[cp] : range_class(t, cp);
}

// The block after a byte-level BPE's pieces; every count and id is checked
// against the bytes left and the vocabulary before it is used.
static void load_byte_level(Tokenizer& t, const uint8_t* p, size_t size, size_t off, const char* path) {
    const int n = (int)t.vocab.size();
    auto next_int = [&](const char* what) {
        if (size - off < 4) fatal("%s: the byte-level block ends inside %s", path, what);
        const int32_t v = read_at<int32_t>(p, off);
        off += 4;
        return v;
    };
    auto count = [&](const char* what, size_t item_bytes) {
        const int32_t c = next_int(what);
        if (c < 0 || (size_t)c > (size - off) / item_bytes)
            fatal("%s: %s count %d does not fit in the file", path, what, c);
        return c;
    };
    auto id = [&](const char* what) {
        const int32_t v = next_int(what);
        if (v < 0 || v >= n) fatal("%s: %s id %d is not in the vocabulary of %d", path, what, v, n);
        return v;
    };
    const int32_t version = next_int("the header"), kind = next_int("the header");
    const int32_t split = next_int("the header"), flags = next_int("the header");
    if (version != 1 || kind != 1)
        fatal("%s: tokenizer extension version %d kind %d (this build reads version 1 kind 1)", path, version, kind);
    if (split < kLlama3Split || split > kGpt2DigitsSplit) fatal("%s: unknown split kind %d", path, split);
    if (flags & ~1) fatal("%s: unknown tokenizer flags 0x%x", path, flags);
    t.split = (Split)split;
    t.ignore_merges = flags & 1;
    t.bos = next_int("the header");
    if (t.bos < -1 || t.bos >= n) fatal("%s: bos id %d is not in the vocabulary of %d", path, t.bos, n);
    t.eos.resize(count("eos", 4));
    for (int& e : t.eos) e = id("eos");
    t.byte_fallback = false;
    t.special.assign(n, false);
    for (int i = count("special token", 4); i > 0; i--) t.special[id("special token")] = true;

    // normal pieces only: text never turns into a special token
    for (int i = 0; i < n; i++)
        if (!t.special[i]) t.ids.emplace(t.vocab[i], i);
    for (int b = 0; b < 256; b++) {
        const char c = (char)b;
        const auto found = t.ids.find(std::string_view(&c, 1));
        if (found == t.ids.end()) fatal("%s: the byte 0x%02X has no piece of its own", path, b);
        t.byte_id[b] = found->second;
    }
    const int n_merges = count("merge", 8);
    t.merges.reserve(n_merges);
    std::string buf;
    for (int r = 0; r < n_merges; r++) {
        const int left = id("merge"), right = id("merge");
        buf = t.vocab[left];
        buf += t.vocab[right];
        const auto it = t.ids.find(buf);
        if (t.special[left] || t.special[right] || it == t.ids.end())
            fatal("%s: merge %d (%d, %d) does not make a normal piece", path, r, left, right);
        // a repeated pair keeps its last rank, as Hugging Face's map does
        t.merges[(uint64_t)left << 32 | (uint32_t)right] = {r, it->second};
    }
    const int n_ranges = count("Unicode range", 12);
    for (int r = 0; r < n_ranges; r++) {
        const uint32_t first = read_at<uint32_t>(p, off), last = read_at<uint32_t>(p, off + 4);
        const uint32_t cls = read_at<uint32_t>(p, off + 8);
        off += 12;
        if (first > last || last > 0x10FFFF || cls < kLetter || cls > kSpace ||
            (r > 0 && first <= t.range_last.back()))
            fatal("%s: Unicode range %d (%u..%u class %u) is out of order or invalid", path, r, first, last, cls);
        t.range_first.push_back(first), t.range_last.push_back(last), t.range_class.push_back((uint8_t)cls);
    }
    for (uint32_t c = 0; c < 128; c++) t.ascii_class[c] = (uint8_t)range_class(t, c);
    // The splits' \s must hold ASCII's white space: word_end reads " ?" and the
    // newlines by these classes, and a table without them would cut text wrongly.
    for (uint32_t c : {0x9u, 0xAu, 0xBu, 0xCu, 0xDu, 0x20u})
        if (t.ascii_class[c] != kSpace)
            fatal("%s: the Unicode ranges do not class U+%04X as white space (the split needs it)", path, c);
    if (off != size) fatal("%s: %zu bytes after the byte-level block", path, size - off);
}

// Where the word that starts at cp[i] ends (cp[end] is not part of the text),
// by the byte-level BPE's split regex, matched as a regex engine does: the
// first alternative that matches, each as long as it can.
//   Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//            ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   GPT-2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (?i:) folds ASCII case only, as the reference (transformers.js) does.
static size_t word_end(const Tokenizer& t, const uint32_t* cp, size_t i, size_t end) {
    auto cls = [&](size_t k) { return k < end ? (int)char_class(t, cp[k]) : -1; };
    auto newline = [&](size_t k) { return k < end && (cp[k] == '\r' || cp[k] == '\n'); };
    const bool llama3 = t.split == kLlama3Split;
    auto lower = [&](size_t k) { return k >= end ? 0u : llama3 && cp[k] >= 'A' && cp[k] <= 'Z' ? cp[k] + 32 : cp[k]; };
    auto run = [&](size_t k, int c) { while (cls(k) == c) k++; return k; };
    if (cp[i] == '\'') {  // contractions
        const uint32_t a = lower(i + 1), b = lower(i + 2);
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    const size_t after_space = i + (cp[i] == ' ');
    if (llama3) {
        const int c = cls(i);
        const size_t k = i + (c != kLetter && c != kNumber && !newline(i));  // [^\r\n\p{L}\p{N}]?
        if (cls(k) == kLetter) return run(k, kLetter);
        if (c == kNumber) return std::min(run(i, kNumber), i + 3);
        if (cls(after_space) == kOther) {
            size_t e = run(after_space, kOther);
            while (newline(e)) e++;
            return e;
        }
    } else {
        for (int c : {kLetter, kNumber, kOther})
            if (cls(after_space) == c) return run(after_space, c);
    }
    // white space: \s*[\r\n]+ (Llama 3), then \s+(?!\S), then \s+
    const size_t e = run(i, kSpace);
    if (llama3)
        for (size_t k = e; k > i; k--)
            if (newline(k - 1)) return k;  // up to the last newline of the run
    if (e == end || e - i <= 1) return std::max(e, i + 1);  // always past i, whatever the table says
    return e - 1;  // leave one space to start the next word
}

// The byte-level BPE's symbols before merging: the text's words (invalid UTF-8
// read as U+FFFD), each a piece of its own if ignore_merges finds it in the
// vocabulary, else one symbol per byte. word_start marks where merges stop.
static void byte_level_symbols(const Tokenizer& t, std::string_view text, std::vector<int>& sym,
                               std::vector<char>& word_start) {
    std::vector<uint32_t> cp;
    std::vector<size_t> at;  // cp[k]'s first byte in `clean`
    std::string clean;
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    for (size_t i = 0; i < text.size();) {
        uint32_t c;
        const int len = utf8_decode(s + i, text.size() - i, &c);
        at.push_back(clean.size());
        if (c == 0xFFFD) clean += "\xEF\xBF\xBD"; else clean.append(text.substr(i, len));
        cp.push_back(c);
        i += len;
    }
    at.push_back(clean.size());
    auto word = [&](size_t from, size_t to) {  // code points [from, to)
        const std::string_view w(clean.data() + at[from], at[to] - at[from]);
        const auto it = t.ignore_merges ? t.ids.find(w) : t.ids.end();
        if (it != t.ids.end()) {
            sym.push_back(it->second), word_start.push_back(1);
            return;
        }
        for (size_t k = 0; k < w.size(); k++) sym.push_back(t.byte_id[(unsigned char)w[k]]), word_start.push_back(k == 0);
    };
    const size_t n = cp.size();
    for (size_t i = 0; i < n;) {
        size_t end = n;  // the split's text: all of it, or (SmolLM2) up to the next ASCII digit
        if (t.split == kGpt2DigitsSplit) {
            if (cp[i] >= '0' && cp[i] <= '9') {
                word(i, i + 1);
                i++;
                continue;
            }
            end = i;
            while (end < n && !(cp[end] >= '0' && cp[end] <= '9')) end++;
        }
        while (i < end) {
            const size_t e = word_end(t, cp.data(), i, end);
            word(i, e);
            i = e;
        }
    }
}

// ----------------------------------------------------------------------------
// Vector helpers: the SIMD plumbing behind dot, weighted_sum and the fast
// matmuls, a section a first reading can skip. f32x16 is sixteen floats the compiler
// maps onto the target's registers; f32xW is one register of them.

// Sixteen floats as one value (GCC/clang vector extension): the compiler maps
// it onto whatever SIMD registers the target has (one AVX-512 register, two
// AVX, four SSE or NEON) and its arithmetic onto their lanes.
typedef float f32x16 __attribute__((vector_size(64)));
static inline void load16(f32x16& v, const float* p) {
    std::memcpy(&v, p, sizeof v);  // an unaligned load (by reference: no vector crosses a call ABI)
}
// The sum of v's 16 lanes, halving the vector four times: a chain of four
// dependent adds where adding lane by lane would be sixteen.
static inline float hsum16(const f32x16& v) {
    float a[16];
    std::memcpy(a, &v, sizeof a);
    for (int half = 8; half >= 1; half /= 2)
        for (int k = 0; k < half; k++) a[k] += a[k + half];
    return a[0];
}

// The target's own vector: W floats (16 with AVX-512, 8 with AVX, 4 with SSE or
// NEON). Kernels that must stay in registers work on these; f32x16 is 16 / W of them.
#if defined(__AVX512F__)
constexpr int kW = 16;
#define TRANSPOSE_LANES(F, s) F(s, 0), F(s, 1), F(s, 2), F(s, 3), F(s, 4), F(s, 5), F(s, 6), F(s, 7), \
    F(s, 8), F(s, 9), F(s, 10), F(s, 11), F(s, 12), F(s, 13), F(s, 14), F(s, 15)
#elif defined(__AVX__)
constexpr int kW = 8;
#define TRANSPOSE_LANES(F, s) F(s, 0), F(s, 1), F(s, 2), F(s, 3), F(s, 4), F(s, 5), F(s, 6), F(s, 7)
#else
constexpr int kW = 4;
#define TRANSPOSE_LANES(F, s) F(s, 0), F(s, 1), F(s, 2), F(s, 3)
#endif
typedef float f32xW __attribute__((vector_size(4 * kW)));

// madd on each lane of a W-float vector: one instruction with a fused
// multiply-add. (Left to std::fma lane by lane, g++ 12 emits scalar ones.)
static inline void maddW(f32xW& acc, const f32xW& a, const f32xW& b) {
#if defined(__AVX512F__)
    acc = (f32xW)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif defined(__FMA__)
    acc = (f32xW)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#elif defined(__ARM_FEATURE_FMA)
    acc = (f32xW)vfmaq_f32((float32x4_t)acc, (float32x4_t)a, (float32x4_t)b);
#elif defined(HAS_FMA)
    for (int k = 0; k < kW; k++) acc[k] = std::fma(a[k], b[k], acc[k]);
#else
    acc += a * b;
#endif
}
// madd on each of sixteen lanes: maddW on each W-float part.
static inline void madd16(f32x16& acc, const f32x16& a, const f32x16& b) {
    typedef f32xW __attribute__((may_alias)) part;  // may alias the f32x16 it is part of
    const part *pa = reinterpret_cast<const part*>(&a), *pb = reinterpret_cast<const part*>(&b);
    part* pc = reinterpret_cast<part*>(&acc);
    for (int h = 0; h < 16 / kW; h++) maddW(pc[h], pa[h], pb[h]);
}

// transpose16: r[c] lane k <- r[k] lane c, a 16 x 16 block turned over in
// registers. It works on W-float vectors (a shuffle wider than the registers,
// compilers spill to memory lane by lane): each W x W block turns over in log2(W) rounds,
// each swapping the off-diagonal halves of pairs of vectors (swap_halves, one
// permute per vector), then the blocks trade places. 64 permutes with AVX-512.
#define TRANSPOSE_LO(s, l) (((l) & (s)) ? kW + (l) - (s) : (l))  // a's lanes, b's low half moved up
#define TRANSPOSE_HI(s, l) (((l) & (s)) ? kW + (l) : (l) + (s))  // a's high half moved down, b's lanes
template <int S>
static inline void swap_halves(f32xW (&r)[kW]) {
    if constexpr (S >= 1) {
        for (int block = 0; block < kW; block += 2 * S)
            for (int i = block; i < block + S; i++) {  // pairs (i, i + S)
                const f32xW a = r[i], b = r[i + S];
                r[i] = __builtin_shufflevector(a, b, TRANSPOSE_LANES(TRANSPOSE_LO, S));
                r[i + S] = __builtin_shufflevector(a, b, TRANSPOSE_LANES(TRANSPOSE_HI, S));
            }
        swap_halves<S / 2>(r);
    }
}
[[maybe_unused]] static inline void transpose16(f32x16 (&r)[16]) {  // (runq: AVX-512 builds only)
    constexpr int B = 16 / kW;
    f32xW v[B][B][kW];  // [block row][block column][row in the block]
    for (int i = 0; i < 16; i++)
        for (int c = 0; c < B; c++) std::memcpy(&v[i / kW][c][i % kW], (const float*)&r[i] + c * kW, sizeof(f32xW));
    for (int bi = 0; bi < B; bi++)
        for (int bj = 0; bj < B; bj++) swap_halves<kW / 2>(v[bi][bj]);
    for (int i = 0; i < 16; i++)  // row i of the result: block column i / kW of every block row
        for (int c = 0; c < B; c++) std::memcpy((float*)&r[i] + c * kW, &v[c][i / kW][i % kW], sizeof(f32xW));
}

// dot: a . b over n floats (attention's scores). The sum runs in 16
// independent lanes (a single running sum would serialize on the add latency),
// added up at the end by hsum16, then the last n % 16 products.
// Error: |out - exact| <= n u sum_j |a[j] b[j]| (no term sees more than n roundings).
static inline float dot(const float* a, const float* b, int n) {
    f32x16 lane = {};
    for (int j = 0; j + 16 <= n; j += 16) {
        f32x16 aj, bj;
        load16(aj, a + j);
        load16(bj, b + j);
        madd16(lane, aj, bj);
    }
    float tail = 0.0f;
    for (int j = n / 16 * 16; j < n; j++) tail = madd(a[j], b[j], tail);
    return hsum16(lane) + tail;
}

// 16 int8 values as floats (exactly: every int8 is a float). GCC 12 turns the
// portable loop into 4-wide pieces through the stack, hence the two forms.
// (maskz forms: GCC 12 warns that the plain ones read an uninitialized value.)
static inline void load16(f32x16& v, const int8_t* p) {
#if defined(__AVX512F__)
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m512 f = _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_maskz_cvtepi8_epi32(0xFFFF, b));
    std::memcpy(&v, &f, sizeof v);
#elif defined(__AVX2__)
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
    std::memcpy(&v, &lo, sizeof lo);
    std::memcpy(reinterpret_cast<float*>(&v) + 8, &hi, sizeof hi);
#else
    float f[16];
    for (int k = 0; k < 16; k++) f[k] = p[k];
    std::memcpy(&v, f, sizeof v);
#endif
}

// weighted_sum: out[i] = sum over t = 0..T-1 of p[t] * scale_t * v_t[i], i < n,
// where v_t = v + t * stride (floats, or int8 with one scale per position:
// scale_t = scales[t * scale_stride]; none for floats). Each out[i] adds its
// terms in t order with one multiply-add each (p[t] * scale_t rounded first),
// as the plain loop does; 64 outputs at a time stay in registers while t runs
// (accumulating in memory would wait on a store and a reload per term).
template <typename V>
static void weighted_sum(float* out, const float* p, int T, const V* v, size_t stride, int n, const float* scales,
                         size_t scale_stride) {
    auto weight = [&](int t) { return scales ? p[t] * scales[t * scale_stride] : p[t]; };
    int i0 = 0;
    for (; i0 + 64 <= n; i0 += 64) {
        f32x16 acc[4] = {};
        for (int t = 0; t < T; t++) {
            const f32x16 wv = weight(t) - f32x16{};  // (w - 0: a broadcast)
            f32x16 x;
            for (int c = 0; c < 4; c++) {
                load16(x, v + t * stride + i0 + 16 * c);
                madd16(acc[c], wv, x);
            }
        }
        std::memcpy(out + i0, acc, sizeof acc);
    }
    for (int i = i0; i < n; i++) {  // the last n % 64 outputs: the plain loop
        float sum = 0.0f;
        for (int t = 0; t < T; t++) sum = madd(weight(t), (float)v[t * stride + i], sum);
        out[i] = sum;
    }
}


// ----------------------------------------------------------------------------
// Fast matmul: the kernels behind matmul_tile, a family per instruction set
// (AVX-512 VNNI, AVX-512, AVX2, ARM's dot product, portable), each computing
// matmul_reference's sums exactly (tests/test_runq.cpp checks, bit for bit).

#ifndef MATMUL_REFERENCE
// The integer kernels, each a family of one named function per instruction set
// (_avx512: AVX-512BW, with VNNI where it pays; _avx2; _neon: ARM's dot
// product; _portable: the plain loop, which also finishes what the others
// leave), then the one a build uses. All exact in int32, so every family gives
// the same sums (tests/test_runq.cpp sweeps lengths and starts in every build).

// ---- dot_i8: sum of a[i] * b[i] over n int8 pairs, exact in int32 for n < 2^17:
// each |a[i] b[i]| <= 2^14, so 2^17 products of -128 * -128 would reach 2^31.
// Groups are far shorter (version 2: group_size <= dim <= 2^16; version 3:
// <= 256). x86 widens int8 to int16 and multiply-adds adjacent pairs into int32
// lanes; ARM's dot-product instruction adds four int8 products into each int32
// lane. (AVX-512 VNNI's vpdpbusd does not pay here: see dot_i8_x4.)

static inline int32_t dot_i8_portable(const int8_t* a, const int8_t* b, int n) {
    int32_t sum = 0;
    for (int i = 0; i < n; i++) sum += (int32_t)a[i] * b[i];
    return sum;
}

#if defined(__AVX2__)
// The sum of v's 8 int32 lanes.
static inline int32_t hsum_8(__m256i v) {
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));  // + the other 64-bit half
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));  // + the neighbouring lane
    return _mm_cvtsi128_si32(s4);
}
// 16 values at a time into 8 int32 lanes, from i; returns where it stopped.
static inline int dot_i8_avx2_lanes(__m256i& acc, const int8_t* a, const int8_t* b, int i, int n) {
    for (; i + 16 <= n; i += 16) {
        const __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(a + i)));
        const __m256i vb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(va, vb));
    }
    return i;
}
[[maybe_unused]] static inline int32_t dot_i8_avx2(const int8_t* a, const int8_t* b, int n) {
    __m256i acc = _mm256_setzero_si256();
    const int i = dot_i8_avx2_lanes(acc, a, b, 0, n);
    return hsum_8(acc) + dot_i8_portable(a + i, b + i, n - i);
}
#endif

#if defined(__AVX512BW__)
// Adds the 16 int32 lanes of v pairwise into 8 (maskz extracts: GCC 12 warns
// about the plain ones' undefined source).
static inline __m256i fold_16_to_8(__m512i v) {
    return _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xF, v, 0), _mm512_maskz_extracti64x4_epi64(0xF, v, 1));
}
// Bytes i .. i + 63 of p, zeros past n.
[[maybe_unused]] static inline __m512i load_i8x64(const int8_t* p, int i, int n) {
    return n - i >= 64 ? _mm512_loadu_si512(p + i) : _mm512_maskz_loadu_epi8(~0ULL >> (64 - (n - i)), p + i);
}
// Four int32 vectors' sums, 128-bit block by block: block k of the result is
// [sum of block k of a[0], ... of a[1], ... of a[2], ... of a[3]]. A transpose as
// it adds: interleave a[0]/a[1] and a[2]/a[3] (each block then holds partial
// sums of both), then the pairs. (maskz forms for GCC 12's warnings.)
static inline __m512i sum_lanes4(const __m512i a[4]) {
    const auto pairs = [](__m512i x, __m512i y) {
        return _mm512_add_epi32(_mm512_maskz_unpacklo_epi32(0xFFFF, x, y), _mm512_maskz_unpackhi_epi32(0xFFFF, x, y));
    };
    const __m512i s01 = pairs(a[0], a[1]), s23 = pairs(a[2], a[3]);
    return _mm512_add_epi32(_mm512_maskz_unpacklo_epi64(0xFF, s01, s23), _mm512_maskz_unpackhi_epi64(0xFF, s01, s23));
}
// 32 values at a time into 16 lanes, then AVX2's 16 at a time.
[[maybe_unused]] static inline int32_t dot_i8_avx512(const int8_t* a, const int8_t* b, int n) {
    __m512i acc512 = _mm512_setzero_si512();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512i va = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(a + i)));
        const __m512i vb = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(b + i)));
        acc512 = _mm512_add_epi32(acc512, _mm512_madd_epi16(va, vb));
    }
    __m256i acc = fold_16_to_8(acc512);
    i = dot_i8_avx2_lanes(acc, a, b, i, n);
    return hsum_8(acc) + dot_i8_portable(a + i, b + i, n - i);
}
#endif

#if defined(__ARM_FEATURE_DOTPROD)
[[maybe_unused]] static inline int32_t dot_i8_neon(const int8_t* a, const int8_t* b, int n) {
    int32x4_t acc = vdupq_n_s32(0);
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = vdotq_s32(acc, vld1q_s8(a + i), vld1q_s8(b + i));
    return vaddvq_s32(acc) + dot_i8_portable(a + i, b + i, n - i);
}
#endif

static inline int32_t dot_i8(const int8_t* a, const int8_t* b, int n) {
#if defined(__AVX512BW__)
    return dot_i8_avx512(a, b, n);
#elif defined(__AVX2__)
    return dot_i8_avx2(a, b, n);
#elif defined(__ARM_FEATURE_DOTPROD)
    return dot_i8_neon(a, b, n);
#else
    return dot_i8_portable(a, b, n);
#endif
}

// ---- dot_i8_x4: w . x_t for the four activation rows x_t = x + t * stride (four
// tokens of a prompt block), n int8 each, exact. The weights are loaded once
// for all four and the four horizontal sums share their shuffles.
// With AVX-512 VNNI, vpdpbusd adds four byte products into each int32 lane,
// but multiplies *unsigned* bytes by signed ones: x + 128 is unsigned (x ^ 0x80),
// and sum (x + 128) w = sum x w + 128 sum w, so one more vpdpbusd, of 128s with
// w, gives the offset to subtract, shared by the four tokens. (For a single
// token that extra instruction eats the gain: dot_i8 widens instead.) Masked
// loads read the tail (n % 64) as zeros. With AVX-512BW alone, the weights are
// widened to int16 once for all four. Elsewhere, four dot_i8.

[[maybe_unused]] static inline void dot_i8_x4_rows(const int8_t* w, const int8_t* x, size_t stride, int n, int32_t out[4]) {
    for (int t = 0; t < 4; t++) out[t] = dot_i8(w, x + t * stride, n);
}

#if defined(__AVX512BW__)
// the four tokens' lanes summed into out, then what the loop left (from i)
static inline void dot_i8_x4_finish(const __m512i acc[4], const int8_t* w, const int8_t* x, size_t stride, int i,
                                    int n, int32_t out[4]) {
    // every 128-bit block of sum_lanes4 holds [t0 t1 t2 t3]: add the four blocks
    const __m256i s8 = fold_16_to_8(sum_lanes4(acc));
    _mm_storeu_si128((__m128i*)out, _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1)));
    if (i < n)
        for (int t = 0; t < 4; t++) out[t] += dot_i8(w + i, x + t * stride + i, n - i);
}
[[maybe_unused]] static inline void dot_i8_x4_avx512(const int8_t* w, const int8_t* x, size_t stride, int n, int32_t out[4]) {
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512i vw = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + i)));
        for (int t = 0; t < 4; t++) {
            const __m512i vx = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(x + t * stride + i)));
            acc[t] = _mm512_add_epi32(acc[t], _mm512_madd_epi16(vw, vx));
        }
    }
    dot_i8_x4_finish(acc, w, x, stride, i, n, out);
}
#endif

#if defined(__AVX512VNNI__)
[[maybe_unused]] static inline void dot_i8_x4_vnni(const int8_t* w, const int8_t* x, size_t stride, int n, int32_t out[4]) {
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    const __m512i k128 = _mm512_set1_epi8((char)0x80);
    __m512i offset = _mm512_setzero_si512();
    int i = 0;
    for (; i < n; i += 64) {
        const __m512i vw = load_i8x64(w, i, n);
        offset = _mm512_dpbusd_epi32(offset, k128, vw);
        for (int t = 0; t < 4; t++)
            acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_xor_si512(load_i8x64(x + t * stride, i, n), k128), vw);
    }
    for (int t = 0; t < 4; t++) acc[t] = _mm512_sub_epi32(acc[t], offset);
    dot_i8_x4_finish(acc, w, x, stride, i, n, out);
}
#endif

static inline void dot_i8_x4(const int8_t* w, const int8_t* x, size_t stride, int n, int32_t out[4]) {
#if defined(__AVX512VNNI__)
    dot_i8_x4_vnni(w, x, stride, n, out);
#elif defined(__AVX512BW__)
    dot_i8_x4_avx512(w, x, stride, n, out);
#else
    dot_i8_x4_rows(w, x, stride, n, out);
#endif
}

// ---- unpack4: values first .. first + len - 1 of a 4-bit row -> out as int8, for
// the four-token dot product (dot_i8_x4) to read. nibbles32: the 32 values in
// 16 bytes of a row, in order, as int8: each byte's nibbles split, interleaved
// back (low first) and sign-extended, (v ^ 8) - 8.

static inline const int8_t* unpack4_portable(int8_t* out, const int8_t* row, int first, int len) {
    for (int j = 0; j < len; j++) out[j] = (int8_t)nibble(row, first + j);
    return out;
}

#if defined(__SSE2__)
static inline void nibbles32(const int8_t* bytes, __m128i& v0, __m128i& v1) {
    const __m128i low4 = _mm_set1_epi8(0x0F), k8 = _mm_set1_epi8(8);
    const __m128i b = _mm_loadu_si128((const __m128i*)bytes);
    const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    v0 = _mm_sub_epi8(_mm_xor_si128(_mm_unpacklo_epi8(lo, hi), k8), k8);
    v1 = _mm_sub_epi8(_mm_xor_si128(_mm_unpackhi_epi8(lo, hi), k8), k8);
}
[[maybe_unused]] static inline const int8_t* unpack4_sse2(int8_t* out, const int8_t* row, int first, int len) {
    int j = 0;
    for (; first % 2 == 0 && j + 32 <= len; j += 32) {  // byte-aligned
        __m128i v0, v1;
        nibbles32(row + (first + j) / 2, v0, v1);
        _mm_storeu_si128((__m128i*)(out + j), v0);
        _mm_storeu_si128((__m128i*)(out + j + 16), v1);
    }
    unpack4_portable(out + j, row, first + j, len - j);
    return out;
}
#elif defined(__ARM_NEON)
static inline void nibbles32(const int8_t* bytes, int8x16_t& v0, int8x16_t& v1) {
    const uint8x16_t b = vld1q_u8((const uint8_t*)bytes), lo = vandq_u8(b, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(b, 4);
    const int8x16_t k8 = vdupq_n_s8(8);
    v0 = vsubq_s8(veorq_s8(vreinterpretq_s8_u8(vzip1q_u8(lo, hi)), k8), k8);
    v1 = vsubq_s8(veorq_s8(vreinterpretq_s8_u8(vzip2q_u8(lo, hi)), k8), k8);
}
[[maybe_unused]] static inline const int8_t* unpack4_neon(int8_t* out, const int8_t* row, int first, int len) {
    int j = 0;
    for (; first % 2 == 0 && j + 32 <= len; j += 32) {  // byte-aligned
        int8x16_t v0, v1;
        nibbles32(row + (first + j) / 2, v0, v1);
        vst1q_s8(out + j, v0);
        vst1q_s8(out + j + 16, v1);
    }
    unpack4_portable(out + j, row, first + j, len - j);
    return out;
}
#endif

static inline const int8_t* unpack4(int8_t* out, const int8_t* row, int first, int len) {
#if defined(__SSE2__)
    return unpack4_sse2(out, row, first, len);
#elif defined(__ARM_NEON)
    return unpack4_neon(out, row, first, len);
#else
    return unpack4_portable(out, row, first, len);
#endif
}

// ---- dot_i4: sum of w[j] * x[j] over n values, w being values first .. first + n - 1
// of a 4-bit row; exact. The SIMD paths unpack 32 values in registers (storing
// them for dot_i8 to reload would stall every load on store forwarding), then
// multiply-add like dot_i8; a row that starts mid-byte takes the plain loop.

static inline int32_t dot_i4_portable(const int8_t* row, int first, const int8_t* x, int n) {
    int32_t sum = 0;
    for (int j = 0; j < n; j++) sum += nibble(row, first + j) * x[j];
    return sum;
}

#if defined(__AVX2__)
[[maybe_unused]] static inline int32_t dot_i4_avx2(const int8_t* row, int first, const int8_t* x, int n) {
    __m256i acc = _mm256_setzero_si256();
    int j = 0;
    for (; first % 2 == 0 && j + 32 <= n; j += 32) {
        __m128i v0, v1;
        nibbles32(row + (first + j) / 2, v0, v1);
        const __m256i x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(x + j)));
        const __m256i x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(x + j + 16)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(v0), x0));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(v1), x1));
    }
    return hsum_8(acc) + dot_i4_portable(row, first + j, x + j, n - j);
}
#endif

#if defined(__AVX512BW__)
[[maybe_unused]] static inline int32_t dot_i4_avx512(const int8_t* row, int first, const int8_t* x, int n) {
    __m512i acc = _mm512_setzero_si512();
    int j = 0;
    for (; first % 2 == 0 && j + 32 <= n; j += 32) {
        __m128i v0, v1;
        nibbles32(row + (first + j) / 2, v0, v1);
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_set_m128i(v1, v0));
        const __m512i xv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(x + j)));
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(w, xv));
    }
    return hsum_8(fold_16_to_8(acc)) + dot_i4_portable(row, first + j, x + j, n - j);
}
#endif

#if defined(__ARM_FEATURE_DOTPROD)
[[maybe_unused]] static inline int32_t dot_i4_neon(const int8_t* row, int first, const int8_t* x, int n) {
    int32x4_t acc = vdupq_n_s32(0);
    int j = 0;
    for (; first % 2 == 0 && j + 32 <= n; j += 32) {
        int8x16_t v0, v1;
        nibbles32(row + (first + j) / 2, v0, v1);
        acc = vdotq_s32(vdotq_s32(acc, v0, vld1q_s8(x + j)), v1, vld1q_s8(x + j + 16));
    }
    return vaddvq_s32(acc) + dot_i4_portable(row, first + j, x + j, n - j);
}
#endif

static inline int32_t dot_i4(const int8_t* row, int first, const int8_t* x, int n) {
#if defined(__AVX512BW__)
    return dot_i4_avx512(row, first, x, n);
#elif defined(__AVX2__)
    return dot_i4_avx2(row, first, x, n);
#elif defined(__ARM_FEATURE_DOTPROD)
    return dot_i4_neon(row, first, x, n);
#else
    return dot_i4_portable(row, first, x, n);
#endif
}

#if defined(__AVX512VNNI__) && defined(HAS_FMA)
// 4-bit weights in groups of kQuad = 32, four groups at a time: 64 bytes of a row hold
// groups g .. g + 3, one per 128-bit block. Split into nibbles and interleaved
// within the block, they give a group's values 0-15 (unpacklo) and 16-31
// (unpackhi), so x's 128 values are gathered to match (X4: a, b). The nibbles
// stay unsigned, v + 8 (the bytes ^ 0x88), for vpdpbusd; the 8 sum(x) this adds
// is taken off by starting from minus8sum, made once per x.
struct X4 {
    __m512i a, b, minus8sum;
};
constexpr int kQuad = 32;            // the group size these kernels take
constexpr int kQuadValues = 4 * kQuad;  // values in four groups: 64 bytes of 4-bit weights
static inline X4 x4_of(const int8_t* x) {
    const __m512i x01 = _mm512_loadu_si512(x), x23 = _mm512_loadu_si512(x + 64), k8 = _mm512_set1_epi8(8);
    X4 v;  // (maskz forms for GCC 12's warnings, as in fold_16_to_8)
    v.a = _mm512_maskz_shuffle_i64x2(0xFF, x01, x23, 0x88);  // x 0-15 of each group
    v.b = _mm512_maskz_shuffle_i64x2(0xFF, x01, x23, 0xDD);  // x 16-31
    v.minus8sum = _mm512_sub_epi32(_mm512_setzero_si512(),
                                   _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), k8, v.a), k8, v.b));
    return v;
}
// Partial sums of the four groups' dot products with x: the four int32 lanes
// of block k add up to group k's, exactly.
static inline __m512i dot_i4_lanes(const int8_t* bytes, const X4& x) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i b = _mm512_xor_si512(_mm512_loadu_si512(bytes), _mm512_set1_epi8((char)0x88));
    const __m512i lo = _mm512_and_si512(b, low4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(x.minus8sum, _mm512_unpacklo_epi8(lo, hi), x.a),
                               _mm512_unpackhi_epi8(lo, hi), x.b);
}
// Block k = [p[0][g + k], p[1][g + k], p[2][g + k], p[3][g + k]]: four pairs'
// scales of groups g .. g + 3, laid out as sum_lanes4 lays out their sums.
static inline __m512 scales4x4(const float* const p[4], int g) {
    __m512 v = _mm512_zextps128_ps512(_mm_loadu_ps(p[0] + g));
    v = _mm512_insertf32x4(v, _mm_loadu_ps(p[1] + g), 1);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(p[2] + g), 2);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(p[3] + g), 3);
    return _mm512_maskz_permutexvar_ps(0xFFFF, _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v);
}
// add_group (above) for four sums at once: lane l of acc takes groups k = 0..3
// in order, from lane l of block k of dots, sx and sw. The same multiply and
// fused multiply-add per lane, so the same result.
static inline __m128 add_groups4(__m128 acc, __m512i dots, __m512 sx, __m512 sw) {
    // (maskz forms for GCC 12's warnings, as in fold_16_to_8)
    const __m512 dx = _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, dots), sx);
    acc = _mm_fmadd_ps(_mm512_maskz_extractf32x4_ps(0xF, dx, 0), _mm512_maskz_extractf32x4_ps(0xF, sw, 0), acc);
    acc = _mm_fmadd_ps(_mm512_maskz_extractf32x4_ps(0xF, dx, 1), _mm512_maskz_extractf32x4_ps(0xF, sw, 1), acc);
    acc = _mm_fmadd_ps(_mm512_maskz_extractf32x4_ps(0xF, dx, 2), _mm512_maskz_extractf32x4_ps(0xF, sw, 2), acc);
    return _mm_fmadd_ps(_mm512_maskz_extractf32x4_ps(0xF, dx, 3), _mm512_maskz_extractf32x4_ps(0xF, sw, 3), acc);
}
#endif

#if defined(__AVX512VNNI__) && defined(HAS_FMA)
// 8-bit weights, one token, the tile's four rows side by side, GS values per
// group (32, or a multiple of 64): groups 0 .. groups - 1 (an even count for
// 32) as matmul_reference sums them, the four rows' running sums in the four
// lanes of the result. Per 64 bytes of x, one vpdpbusd per row adds four byte
// products into each int32 lane; it multiplies unsigned bytes by signed ones,
// so the weights go in as w + 128 (w ^ 0x80, exact for -128 too), and each
// group's dot products get the activations' offset, -128 sum(x_g), added. No
// horizontal sum waits in a row's chain: sum_lanes4 reduces the four rows at
// once, and the group's float step is add_group in four lanes. Each row's next
// bytes kPrefetchRows rows on are asked for into L2 as this one is read.
template <int GS>
static inline __m128 rows4_i8(const QuantizedTensor row[4], const QuantizedTensor ahead[4], const int8_t* x,
                              const float* xs, const int32_t* xo, int groups) {
    static_assert(GS == 32 || GS % 64 == 0, "a group is half a 64-byte load or whole ones");
    constexpr int kLoads = GS == 32 ? 1 : GS / 64, kStep = GS == 32 ? 2 : 1;  // loads per step, groups per step
    const __m512i k128 = _mm512_set1_epi8((char)0x80);
    __m128 acc = _mm_setzero_ps();
    for (int g = 0; g + kStep <= groups; g += kStep) {
        const int8_t* xg = x + (size_t)g * GS;
        __m512i xv[kLoads];
        for (int c = 0; c < kLoads; c++) xv[c] = _mm512_loadu_si512(xg + 64 * c);
        __m512i lanes[4];
        for (int r = 0; r < 4; r++) {
            lanes[r] = _mm512_setzero_si512();
            for (int c = 0; c < kLoads; c++) {
                const int8_t* wq = row[r].q + (size_t)g * GS + 64 * c;
                lanes[r] = _mm512_dpbusd_epi32(lanes[r], _mm512_xor_si512(_mm512_loadu_si512(wq), k128), xv[c]);
                _mm_prefetch((const char*)(ahead[r].q + (size_t)g * GS + 64 * c), _MM_HINT_T1);
            }
            if (g % 16 < kStep) _mm_prefetch((const char*)(ahead[r].s + g), _MM_HINT_T1);
        }
        // block k of sums = [row 0, row 1, row 2, row 3] partial sums of block k
        const __m512i sums = sum_lanes4(lanes);
        const __m128i b0 = _mm512_maskz_extracti32x4_epi32(0xF, sums, 0), b1 = _mm512_maskz_extracti32x4_epi32(0xF, sums, 1),
                      b2 = _mm512_maskz_extracti32x4_epi32(0xF, sums, 2), b3 = _mm512_maskz_extracti32x4_epi32(0xF, sums, 3);
        const auto add_group4 = [&](__m128i dots, int k) {
            const __m128 sw = _mm_set_ps(row[3].s[k], row[2].s[k], row[1].s[k], row[0].s[k]);
            dots = _mm_add_epi32(dots, _mm_set1_epi32(xo[k]));
            acc = _mm_fmadd_ps(_mm_mul_ps(_mm_cvtepi32_ps(dots), _mm_set1_ps(xs[k])), sw, acc);
        };
        if (GS == 32) {  // blocks 0-1 are group g, blocks 2-3 group g + 1
            add_group4(_mm_add_epi32(b0, b1), g);
            add_group4(_mm_add_epi32(b2, b3), g + 1);
        } else {
            add_group4(_mm_add_epi32(_mm_add_epi32(b0, b1), _mm_add_epi32(b2, b3)), g);
        }
    }
    return acc;
}
#endif

#if defined(__AVX512VNNI__) && defined(HAS_FMA)
// gemm16: reading a prompt, rows begin .. begin + 15 (fewer at the matrix's
// end) for nb tokens, matmul_reference's result exactly. GS (32, 64 or 128)
// divides n; 8- or 4-bit weights. The rows are repacked kSlab values at a
// time so that one register holds four consecutive values of each of the 16
// rows, one row per 32-bit lane (transpose16 per 64 values, then in L1 for
// every token). vpdpbusd with four of a token's values broadcast to all lanes
// then adds the next four products of all 16 rows at once, and a group's 16
// dot products come out in the lanes: no horizontal sum at all, and every
// vpdpbusd does 64 useful multiply-adds. Eight tokens' sums stay in registers
// while a slab's weights are read. vpdpbusd multiplies unsigned by signed
// bytes: the repacked weights are w + 128 (w ^ 0x80, exact for -128 too), and
// each (token, group) sum starts from x.offsets = -128 sum(x_g), which takes
// off what the 128 adds. The float side is add_group in 16 lanes.
constexpr int kSlab = 256;     // values per repacked slab: a multiple of every GS taken here
constexpr int kGemmTokens = 8;  // tokens whose sums stay in registers
template <int GS>
static void gemm16(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb, int begin) {
    static_assert(kSlab % GS == 0, "a slab holds whole groups");
    const int groups = n / GS, rows = std::min(16, d - begin);
    alignas(64) int32_t packed[kSlab / 4][16];  // [four values][row]: w + 128, four bytes per lane
    alignas(64) float scales[kSlab / GS][16];   // [group of the slab][row]
    alignas(64) int8_t unpacked[16][kSlab];     // 4-bit rows, unpacked for the gathers
    alignas(64) float acc[kBlock][16];          // [token][row]: the running sums
    int32_t lane_row[16];  // lane r reads row r (the missing rows of the last tile repeat row 0)
    for (int r = 0; r < 16; r++) lane_row[r] = r < rows ? r : 0;
    // (masked gathers and converts: GCC 12 warns about the plain ones' undefined source)
    const __m512i k128 = _mm512_set1_epi8((char)0x80);
    const __m512i rows16 = _mm512_loadu_si512(lane_row);
    const __m512i scale_at = _mm512_mullo_epi32(rows16, _mm512_set1_epi32(groups));
    const float* ws = w.s + (size_t)begin * groups;
    for (int b0 = 0; b0 < nb; b0 += kBlock) {
        const int tokens = std::min(kBlock, nb - b0);
        std::memset(acc, 0, sizeof acc);
        for (int s0 = 0; s0 < n; s0 += kSlab) {
            const int len = std::min(kSlab, n - s0), slab_groups = len / GS, g0 = s0 / GS;
            const int8_t* src[16];  // row r's slab (the missing rows of the last tile repeat row 0)
            for (int r = 0; r < 16; r++) src[r] = w.q + (size_t)(begin + lane_row[r]) * n + s0;
            if (w.bits == 4) {
                for (int r = 0; r < rows; r++) unpack4(unpacked[r], w.row(begin + r, n).q, s0, len);
                for (int r = 0; r < 16; r++) src[r] = unpacked[lane_row[r]];
            }
            for (int j = 0; j < len; j += 64) {  // 64 values of the 16 rows: 16 registers of packed
                const __mmask64 valid = len - j >= 64 ? ~0ULL : ~0ULL >> (64 - (len - j));
                f32x16 four[16];  // [row], then [four values]: transpose16 moves 32-bit lanes, whatever they hold
                for (int r = 0; r < 16; r++) four[r] = (f32x16)_mm512_maskz_loadu_epi8(valid, src[r] + j);
                transpose16(four);
                for (int c = 0; c < std::min(16, (len - j) / 4); c++)
                    _mm512_store_si512(packed[j / 4 + c], _mm512_xor_si512((__m512i)four[c], k128));
            }
            for (int g = 0; g < slab_groups; g++)
                _mm512_store_ps(scales[g], _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, scale_at, ws + g0 + g, 4));
            for (int t0 = 0; t0 < tokens; t0 += kGemmTokens) {
                const int8_t* xq[kGemmTokens];
                const float* xs[kGemmTokens];
                const int32_t* xo[kGemmTokens];
                __m512 sum[kGemmTokens];
                for (int t = 0; t < kGemmTokens; t++) {  // past the last token: repeat it (computed, not kept)
                    const int tt = std::min(t0 + t, tokens - 1);
                    xq[t] = x.q + (size_t)(b0 + tt) * n + s0;
                    xs[t] = x.s + (size_t)(b0 + tt) * groups + g0;
                    xo[t] = x.offsets + (size_t)(b0 + tt) * groups + g0;
                    sum[t] = _mm512_load_ps(acc[tt]);
                }
                for (int g = 0; g < slab_groups; g++) {
                    __m512i dot[kGemmTokens];
                    for (int t = 0; t < kGemmTokens; t++) dot[t] = _mm512_set1_epi32(xo[t][g]);
                    for (int c = g * GS / 4; c < (g + 1) * GS / 4; c++) {
                        const __m512i wv = _mm512_load_si512(packed[c]);
                        for (int t = 0; t < kGemmTokens; t++) {
                            int32_t four;
                            std::memcpy(&four, xq[t] + 4 * c, 4);
                            dot[t] = _mm512_dpbusd_epi32(dot[t], wv, _mm512_set1_epi32(four));
                        }
                    }
                    const __m512 sw = _mm512_load_ps(scales[g]);
                    for (int t = 0; t < kGemmTokens; t++)
                        sum[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, dot[t]), _mm512_set1_ps(xs[t][g])),
                                                 sw, sum[t]);
                }
                for (int t = 0; t < kGemmTokens && t0 + t < tokens; t++) _mm512_store_ps(acc[t0 + t], sum[t]);
            }
        }
        for (int t = 0; t < tokens; t++)
            for (int r = 0; r < rows; r++) out[(size_t)(b0 + t) * d + begin + r] = acc[t][r];
    }
}
#endif

// matmul_rows: rows begin .. end - 1 (a tile: at most four) of
// matmul_reference's result exactly, faster. GS is the group size fixed at
// compile time (so the group's loop unrolls completely), or 0 to read it from
// w. The tile's rows are read from memory once and, while they sit in cache,
// used for all nb tokens (1 when generating, up to kBlock when reading a
// prompt): four tokens at a time row by row, then one token at a time over the
// tile's rows. A row's result does not depend on nb. 4-bit weights: one token's
// dot products unpack them in registers (dot_i4); four tokens' unpack each
// group to int8 once (on the stack: at most kMaxGroup4 values) and take the
// int8 path.
//
// One row at a time or several side by side? A row is one long sequential
// read, which the hardware prefetcher follows well; that is enough when a
// group's work is long (int8, fp32 in run.cpp). A 4-bit group of 32 is only 16
// bytes, and one row's running sum would wait on each group's fused
// multiply-add: there (with AVX-512 VNNI) groups go four at a time for four
// (row, token) pairs, so four running sums advance together, one row with four
// tokens or the tile's four rows with one token. Four rows side by side are
// eight short streams (values and scales) that the prefetcher does not follow,
// so each step asks for the same bytes kPrefetchRows rows on (two tiles) into L2.
#if defined(__AVX512VNNI__) && defined(HAS_FMA)
constexpr int kPrefetchRows = 8;

// The VNNI kernels' share of a tile (matmul_rows' groups 0 .. returned - 1, in
// acc; the rest go group by group). Four tokens of one row: 4-bit groups of
// 32, four at a time.
template <int GS>
static inline int tokens4_vnni(float acc[4], const QuantizedTensor& row, const QuantizedTensor& w, const int8_t* xq,
                               const float* const xs[4], int n) {
    const int quad_groups = GS == kQuad && w.bits == 4 ? 4 * (n / kQuadValues) : 0;  // a multiple of 4
    if (!quad_groups) return 0;
    const float* ws[4] = {row.s, row.s, row.s, row.s};
    __m128 acc4 = _mm_setzero_ps();
    for (int g = 0; g < quad_groups; g += 4) {
        __m512i lanes[4];
        for (int t = 0; t < 4; t++) lanes[t] = dot_i4_lanes(row.q + g * kQuad / 2, x4_of(xq + (size_t)t * n + g * kQuad));
        acc4 = add_groups4(acc4, sum_lanes4(lanes), scales4x4(xs, g), scales4x4(ws, g));
    }
    _mm_storeu_ps(acc, acc4);
    return quad_groups;
}
// One token over the tile's four rows: 8-bit weights by rows4_i8 (whole groups
// of 32, an even count, or of a multiple of 64; activations with offsets), 4-bit
// groups of 32 four at a time; prefetching the rows kPrefetchRows on.
template <int GS>
static inline int rows4_vnni(float acc[4], const QuantizedTensor row[4], const QuantizedTensor& w, int begin, int d,
                             int n, const int8_t* xq, const float* xs, const int32_t* offsets) {
    QuantizedTensor ahead[4];  // the rows to prefetch, clamped to the matrix's last
    for (int r = 0; r < 4; r++) ahead[r] = w.row(std::min(begin + r + kPrefetchRows, d - 1), n);
    if constexpr (GS == 32 || GS % 64 == 0) {
        if (GS != 0 && w.bits == 8 && offsets) {
            const int whole = n / (GS ? GS : 64), g = GS == 32 ? whole / 2 * 2 : whole;  // a short last group: below
            _mm_storeu_ps(acc, rows4_i8<GS ? GS : 64>(row, ahead, xq, xs, offsets, g));
            return g;
        }
    }
    const int quad_groups = GS == kQuad && w.bits == 4 ? 4 * (n / kQuadValues) : 0;
    if (!quad_groups) return 0;
    const float *xs4[4] = {xs, xs, xs, xs}, *ws[4] = {row[0].s, row[1].s, row[2].s, row[3].s};
    __m128 acc4 = _mm_setzero_ps();
    for (int g = 0; g < quad_groups; g += 4) {
        const X4 xg = x4_of(xq + g * kQuad);
        __m512i lanes[4];
        for (int r = 0; r < 4; r++) {
            lanes[r] = dot_i4_lanes(row[r].q + g * kQuad / 2, xg);
            _mm_prefetch((const char*)(ahead[r].q + g * kQuad / 2), _MM_HINT_T1);
            _mm_prefetch((const char*)(ahead[r].s + g), _MM_HINT_T1);
        }
        acc4 = add_groups4(acc4, sum_lanes4(lanes), scales4x4(xs4, g), scales4x4(ws, g));
    }
    _mm_storeu_ps(acc, acc4);
    return quad_groups;
}
#endif

// The groups a build's wider kernels take first (VNNI's above), else none.
template <int GS>
static inline int tokens4_first(float acc[4], const QuantizedTensor& row, const QuantizedTensor& w, const int8_t* xq,
                                const float* const xs[4], int n) {
#if defined(__AVX512VNNI__) && defined(HAS_FMA)
    return tokens4_vnni<GS>(acc, row, w, xq, xs, n);
#else
    (void)acc, (void)row, (void)w, (void)xq, (void)xs, (void)n;
    return 0;
#endif
}
template <int GS>
static inline int rows4_first(float acc[4], const QuantizedTensor row[4], const QuantizedTensor& w, int begin, int d,
                              int n, const int8_t* xq, const float* xs, const int32_t* offsets) {
#if defined(__AVX512VNNI__) && defined(HAS_FMA)
    return rows4_vnni<GS>(acc, row, w, begin, d, n, xq, xs, offsets);
#else
    (void)acc, (void)row, (void)w, (void)begin, (void)d, (void)n, (void)xq, (void)xs, (void)offsets;
    return 0;
#endif
}

// add_groups_x4: add_group for four tokens' dot products of group g with one
// row (scale sw): with AVX-512 and FMA in the four lanes of one register, the
// same multiply and fused multiply-add per lane, so the same sums.
static inline void add_groups_x4(float acc[4], const int32_t dots[4], const float* const xs[4], int g, float sw) {
#if defined(__AVX512BW__) && defined(HAS_FMA)
    const __m128 sx = _mm_set_ps(xs[3][g], xs[2][g], xs[1][g], xs[0][g]);
    const __m128 dx = _mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i*)dots)), sx);
    _mm_storeu_ps(acc, _mm_fmadd_ps(dx, _mm_set1_ps(sw), _mm_loadu_ps(acc)));
#else
    for (int t = 0; t < 4; t++) acc[t] = add_group(acc[t], dots[t], xs[t][g], sw);
#endif
}

template <int GS>
static void matmul_rows(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb,
                        int begin, int end) {
    const int gs = GS ? GS : w.group_size, groups = w.groups(n), rows = end - begin;
    const auto len = [&](int g) { return GS && n % (GS ? GS : 1) == 0 ? GS : std::min(gs, n - g * gs); };
    QuantizedTensor row[4];  // the tile's rows; missing ones repeat the first (computed, never stored)
    for (int r = 0; r < 4; r++) row[r] = w.row(begin + (r < rows ? r : 0), n);
    alignas(64) int8_t unpacked[kMaxGroup4];
    int b = 0;
    for (; b + 4 <= nb; b += 4)  // four tokens of a prompt block, row by row
        for (int r = 0; r < rows; r++) {
            const int8_t* xq = x.q + (size_t)b * n;  // token t at xq + t n
            const float* xs[4];
            for (int t = 0; t < 4; t++) xs[t] = x.s + (size_t)(b + t) * groups;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int g = tokens4_first<GS>(acc, row[r], w, xq, xs, n); g < groups; g++) {
                const int8_t* wg = w.bits == 4 ? unpack4(unpacked, row[r].q, g * gs, len(g)) : row[r].q + g * gs;
                int32_t dots[4];
                dot_i8_x4(wg, xq + g * gs, n, len(g), dots);
                add_groups_x4(acc, dots, xs, g, row[r].s[g]);
            }
            for (int t = 0; t < 4; t++) out[(size_t)(b + t) * d + begin + r] = acc[t];
        }
    for (; b < nb; b++) {  // one token over the tile's rows
        const int8_t* xq = x.q + (size_t)b * n;
        const float* xs = x.s + (size_t)b * groups;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const int g = rows4_first<GS>(acc, row, w, begin, d, n, xq, xs, x.offsets ? x.offsets + (size_t)b * groups : nullptr);
        for (int r = 0; r < rows; r++) {
            for (int k = g; k < groups; k++)
                acc[r] = add_group(acc[r], w.bits == 4 ? dot_i4(row[r].q, k * gs, xq + k * gs, len(k))
                                                       : dot_i8(xq + k * gs, row[r].q + k * gs, len(k)),
                                   xs[k], row[r].s[k]);
            out[(size_t)b * d + begin + r] = acc[r];
        }
    }
}

// tile_rows: a tile, by gemm16 when reading a prompt (with AVX-512 VNNI, whole
// groups of a size it takes, activations with offsets), else four rows at a time.
template <int GS>
static void tile_rows(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb,
                      int begin, int end) {
#if defined(__AVX512VNNI__) && defined(HAS_FMA)
    if constexpr (GS != 0 && kSlab % (GS ? GS : 1) == 0) {
        if (nb >= 4 && n % GS == 0 && x.offsets) return gemm16<GS>(out, x, w, n, d, nb, begin);
    }
#endif
    for (int r = begin; r < end; r += 4) matmul_rows<GS>(out, x, w, n, d, nb, r, std::min(end, r + 4));
}

static void matmul_tile(float* out, const QuantizedTensor& x, const QuantizedTensor& w, int n, int d, int nb,
                        int t) {
    const int begin = kTile * t, end = std::min(d, begin + kTile);
    switch (w.group_size) {
    case 32: tile_rows<32>(out, x, w, n, d, nb, begin, end); break;
    case 64: tile_rows<64>(out, x, w, n, d, nb, begin, end); break;
    case 128: tile_rows<128>(out, x, w, n, d, nb, begin, end); break;
    default: tile_rows<0>(out, x, w, n, d, nb, begin, end); break;
    }
}
#endif  // MATMUL_REFERENCE
