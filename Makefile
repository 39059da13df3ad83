# Build, test and benchmark run.cpp (fp32) and runq.cpp (int8).
#   make run        build ./run and ./runq (portable), then tell a story with the project's
#                   own model (committed in models/: models/README.md); PROMPT=... STEPS=...
#   make            ./run and ./runq with OpenMP, tuned for this CPU (same as `make runomp`)
#   make test       build every variant and run all tests (installs test packages if missing)
#   make unit       the unit tests alone (kernels against their references): the quick loop
#   make lesson     diff run.cpp runq.cpp without the fast-path sections: the quantization lesson
#   make runref     ./run and ./runq with every matmul its plain reference: the same output bytes
#   make bench      fp32 against int8: tok/s, GB/s and the machine's memory bandwidth
#   make bench-kernels  one matmul (int8, int4, then fp32): what unrolling, threads and SIMD each buy
#   make quality    fp32 / int8 / int4 / int4 + AWQ: perplexity, size and speed
#   make check-model  retrain the own model with train.py and compare it with models/
#   make check-model-if-changed  the same, if what it depends on changed since the last one (CI)
# As in llama2.c, run / runfast / runomp / debug all write ./run (and ./runq).

CXX   ?= g++
CLANG ?= clang++

# Python with torch: `python3` if it has it, else Debian's /usr/bin/python3 (where apt installs it).
PYTHON ?= $(or $(shell for p in python3 /usr/bin/python3; do $$p -c "import torch" 2>/dev/null && { echo $$p; break; }; done),/usr/bin/python3)

# -std=c++17: the language level; -Wall -Wextra: all the usual warnings.
# -ffp-contract=off: never fuse a * b + c behind our back (g++ does by default, clang++
# within an expression), so every build for one instruction set rounds alike; the
# fused multiply-adds the kernels want are written out (madd in run.cpp).
WARN  = -std=c++17 -Wall -Wextra -ffp-contract=off
# Without -fopenmp the omp pragmas are ignored on purpose: do not warn about them.
NOOMP = -Wno-unknown-pragmas
# -O3: full optimisation, including the vectorizer that maps matmul's lanes onto SIMD.
# -march=native: use every instruction this CPU has (AVX2/AVX-512 FMA); the binary may not run elsewhere.
# No -ffast-math (llama2.c's -Ofast): it would let the compiler drop NaN checks and
# change results between builds.
OPT   = -O3
NATIVE = -march=native
# -fopenmp: parallel rows in matmul and heads in attention. OMP_NUM_THREADS picks the count.
OMP   = -fopenmp
# -g -O1: debuggable but not glacial; sanitizers catch out-of-bounds reads and undefined behaviour,
# including float-to-int casts out of range (not part of g++'s "undefined").
SAN   = -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all

# The sentencepiece model tokenizer.bin is made from: your downloaded Llama 2 tokenizer.model,
# else the copy in ../shared/models.
TOKENIZER_MODEL ?= $(firstword $(wildcard tokenizer.model ../shared/models/llama2/tokenizer.model))

# make run: the model, its tokenizer, the prompt and how many positions to run
MODEL  ?= models/tinystories.bin
TOK    ?= models/tinystories-tok.bin
PROMPT ?= Once upon a time
STEPS  ?= 256

.PHONY: all run runfast runomp runref debug lesson test unit e2e bench bench-kernels quality check-model check-model-if-changed fuzz clean
all: runomp

run:                    # portable: any x86-64 or ARM, one thread; then a story
	$(CXX) $(WARN) $(NOOMP) $(OPT) -o run run.cpp
	$(CXX) $(WARN) $(NOOMP) $(OPT) -o runq runq.cpp
	./run $(MODEL) -z $(TOK) -n $(STEPS) -i "$(PROMPT)"
runfast:                # this CPU's full instruction set, one thread
	$(CXX) $(WARN) $(NOOMP) $(OPT) $(NATIVE) -o run run.cpp
	$(CXX) $(WARN) $(NOOMP) $(OPT) $(NATIVE) -o runq runq.cpp
runomp:                 # this CPU, all cores
	$(CXX) $(WARN) $(OPT) $(NATIVE) $(OMP) -o run run.cpp
	$(CXX) $(WARN) $(OPT) $(NATIVE) $(OMP) -o runq runq.cpp
debug:                  # address + undefined-behaviour sanitizers
	$(CXX) $(WARN) $(NOOMP) $(SAN) -o run run.cpp
	$(CXX) $(WARN) $(NOOMP) $(SAN) -o runq runq.cpp
# -DMATMUL_REFERENCE: matmul is matmul_reference (the plain loops; run reads the rows in
# place, no panels). The fast kernels compute the same sums in the same order, so the
# text and the logits are the fast build's to the bit (make test compares them).
runref:                 # the fast paths switched off: slower, the same bytes
	$(CXX) $(WARN) $(NOOMP) $(OPT) -DMATMUL_REFERENCE -o run run.cpp
	$(CXX) $(WARN) $(NOOMP) $(OPT) -DMATMUL_REFERENCE -o runq runq.cpp
lesson:                 # what quantization changes: the diff of the two engines' lesson sections
	@$(PYTHON) tests/lesson.py

tokenizer.bin: export.py exporter/tokenizers.py $(TOKENIZER_MODEL)
	@test -n "$(TOKENIZER_MODEL)" || { echo "no tokenizer.model: download Llama 2's and put it here" >&2; exit 1; }
	$(PYTHON) export.py --tokenizer $(TOKENIZER_MODEL) -o $@

# The project's own model is committed (models/tinystories*.bin, made by train.py:
# models/README.md). Its held-out text is cut from ../shared's sample when a test needs it.
models/tinystories-val.txt: train.py
	$(PYTHON) train.py --val-only --out-dir models

# Retrains the model (12-23 minutes on two cores) and compares it with the
# committed one: the bytes (equal on a machine like the one that made it), and the
# validation loss against the model card's (within the tolerance the card derives).
check-model: build/.deps-train
	@mkdir -p build/retrain
	$(PYTHON) train.py --out-dir build/retrain | tee build/retrain/train.log
	$(PYTHON) tests/check_model.py build/retrain
	sha256sum $(MODEL_INPUTS) > models/inputs.sha256  # what this check saw (commit it)

# What the retrained model depends on: the recipe, the code train.py imports, the
# data, and the committed files and card it is compared with. CI retrains only when
# one of them differs from what the last passing check-model saw (models/inputs.sha256),
# as a CI path filter would: the retrain is two thirds of CI's time.
MODEL_INPUTS = train.py model.py export.py $(sort $(wildcard exporter/*.py)) tests/check_model.py \
               models/tinystories.bin models/tinystories-tok.bin models/README.md \
               ../shared/models/tinystories/tinystories_sample_2MiB.txt
check-model-if-changed:
	@if sha256sum --quiet --check models/inputs.sha256 2>/dev/null && \
	    [ "$$(cut -d' ' -f3 models/inputs.sha256 | tr '\n' ' ')" = "$(MODEL_INPUTS) " ]; then \
	    echo "check-model: nothing it depends on changed since the retrain models/inputs.sha256 records; not retrained"; \
	else $(MAKE) check-model; fi

build/.deps-train: tests/install-deps.sh
	@mkdir -p build
	PYTHON="$(PYTHON)" sh tests/install-deps.sh train && touch $@

# ---------------------------------------------------------------------------
# Tests. Every variant is built with -Werror: the engine must be warning-free
# with g++ and clang++, with and without OpenMP. Test binaries live in build/.

VARIANTS = gcc gcc-omp clang clang-omp debug arm
CXX_gcc       = $(CXX)   $(WARN) -Werror $(NOOMP) $(OPT)
CXX_gcc-omp   = $(CXX)   $(WARN) -Werror $(OPT) $(NATIVE) $(OMP)
CXX_clang     = $(CLANG) $(WARN) -Werror $(NOOMP) $(OPT) $(NATIVE)
CXX_clang-omp = $(CLANG) $(WARN) -Werror $(OPT) $(OMP)
CXX_debug     = $(CXX)   $(WARN) -Werror $(NOOMP) $(SAN)
# the reference build (make runref), compared with gcc's bytes: the same flags but -D
CXX_ref       = $(CXX)   $(WARN) -Werror $(NOOMP) $(OPT) -DMATMUL_REFERENCE
# ARM: cross-compiled for 64-bit ARM with the dot-product instructions, linked
# statically and run under qemu's user-mode emulation (build/X-arm is a wrapper).
CXX_arm       = aarch64-linux-gnu-g++ $(WARN) -Werror $(NOOMP) $(OPT) -march=armv8.2-a+dotprod -static

# The unit tests also build for two older x86 instruction sets, so the AVX2-only and
# AVX-512-without-VNNI kernel branches are compiled and run on a newer CPU as well.
UNIT_VARIANTS = $(VARIANTS) haswell skx
CXX_haswell   = $(CXX)   $(WARN) -Werror $(NOOMP) $(OPT) -march=haswell
CXX_skx       = $(CXX)   $(WARN) -Werror $(NOOMP) $(OPT) -march=skylake-avx512

ARM_WRAPPERS = build/run-arm build/runq-arm build/test_run-arm build/test_runq-arm
$(ARM_WRAPPERS): %: %.elf
	printf '#!/bin/sh\nexec qemu-aarch64 "$$0.elf" "$$@"\n' > $@ && chmod +x $@
build/run-arm.elf: run.cpp | build/.deps
	$(CXX_arm) -o $@ run.cpp
build/runq-arm.elf: runq.cpp | build/.deps
	$(CXX_arm) -o $@ runq.cpp
build/test_run-arm.elf: tests/test_run.cpp tests/check.h run.cpp | build/.deps
	$(CXX_arm) -o $@ tests/test_run.cpp
build/test_runq-arm.elf: tests/test_runq.cpp tests/check.h runq.cpp | build/.deps
	$(CXX_arm) -o $@ tests/test_runq.cpp

# (| build/.deps: install clang++ and friends first, even under make -j)
build/run-%: run.cpp | build/.deps
	$(CXX_$*) -o $@ run.cpp
build/runq-%: runq.cpp | build/.deps
	$(CXX_$*) -o $@ runq.cpp
build/test_run-%: tests/test_run.cpp tests/check.h run.cpp | build/.deps
	$(CXX_$*) -o $@ tests/test_run.cpp
build/test_runq-%: tests/test_runq.cpp tests/check.h runq.cpp | build/.deps
	$(CXX_$*) -o $@ tests/test_runq.cpp
build/tokenize_many: tests/tokenize_many.cpp run.cpp | build/.deps
	$(CXX_gcc) -o $@ tests/tokenize_many.cpp

build/.deps: tests/install-deps.sh
	@mkdir -p build
	PYTHON="$(PYTHON)" sh tests/install-deps.sh && touch $@

# The tests' JavaScript references (tests/npm/package.json says which), pinned by the
# lock file, installed into build/npm, never into the engine. npm install, not npm ci:
# the lock lacks the optional builds for other platforms (CUDA, Vulkan, ARM, macOS,
# Windows) that the registry here does not serve, and --omit=optional skips them. No
# install scripts: node-llama-cpp's would look for a GPU build; its prebuilt CPU one is enough.
build/npm/.installed: tests/npm/package.json tests/npm/package-lock.json | build/.deps
	@mkdir -p build/npm
	cp tests/npm/package.json tests/npm/package-lock.json build/npm/
	cd build/npm && npm install --omit=optional --ignore-scripts --no-audit --no-fund
	@touch $@

unit: $(UNIT_VARIANTS:%=build/test_run-%) $(UNIT_VARIANTS:%=build/test_runq-%)
	@for v in $(UNIT_VARIANTS); do for t in test_run test_runq; do \
	    echo "== $$t $$v"; ./build/$$t-$$v || exit 1; done; done

# Variants that target one instruction set and so must give the same bits
# (comma-separated groups): the portable x86-64 ones, and the native ones.
SAME_ISA = gcc,clang-omp,debug gcc-omp,clang

# pytest's workers (pytest-xdist): one per core. Most tests run one single-threaded
# engine at a time, so one worker would leave the other cores idle.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

e2e: build/.deps build/npm/.installed models/tinystories-val.txt $(VARIANTS:%=build/run-%) $(VARIANTS:%=build/runq-%) \
     build/tokenize_many build/run-ref build/runq-ref
	RUN_BINARIES="$(VARIANTS:%=build/run-%)" RUNQ_BINARIES="$(VARIANTS:%=build/runq-%)" SAME_ISA="$(SAME_ISA)" \
	    $(PYTHON) -m pytest -q -n $(JOBS) --durations=10 tests

test: build/.deps unit e2e build/bench_kernels build/bench_kernels_f32 build/bandwidth  # the benchmarks must at least build
	$(MAKE) fuzz FUZZ_LIMIT="-runs=30000 -seed=1"  # each fuzz target briefly and reproducibly

# ---------------------------------------------------------------------------

build/bandwidth: bench/bandwidth.cpp
	@mkdir -p build
	$(CXX) $(WARN) $(OPT) $(NATIVE) $(OMP) -o $@ bench/bandwidth.cpp

bench: build/.deps runomp tokenizer.bin build/bandwidth
	$(PYTHON) bench/bench.py

# fp32, int8, int4 and int4 + AWQ: held-out perplexity, file size and decode speed, for
# stories260K, the project's own model and MODEL (with TOK) if it is another one
quality: build/.deps runomp
	$(PYTHON) bench/quality.py --model $(MODEL) --tokenizer $(TOK)

build/bench_kernels: bench/kernels.cpp bench/timing.h runq.cpp
	@mkdir -p build
	$(CXX) $(WARN) $(OPT) $(NATIVE) $(OMP) -o $@ bench/kernels.cpp

build/bench_kernels_f32: bench/kernels_f32.cpp bench/timing.h run.cpp
	@mkdir -p build
	$(CXX) $(WARN) $(OPT) $(NATIVE) $(OMP) -o $@ bench/kernels_f32.cpp

bench-kernels: build/bench_kernels build/bench_kernels_f32  # one matmul (int8, int4, fp32), technique by technique
	./build/bench_kernels
	./build/bench_kernels_f32

# ---------------------------------------------------------------------------
# Fuzzing (tests/fuzz.cpp): libFuzzer with AddressSanitizer + UBSan, one binary
# per input kind, seeded with small valid files. make fuzz FUZZ_SECONDS=600;
# make test runs a fixed number of inputs from a fixed seed, so CI is reproducible.

FUZZ_TARGETS = checkpoint checkpoint-q8 tokenizer encode encode-bpe cli
FUZZ_SECONDS ?= 60
FUZZ_LIMIT ?= -max_total_time=$(FUZZ_SECONDS)
# -fsanitize=fuzzer: libFuzzer's main and coverage instrumentation (clang only)
FUZZ_CXX = $(CLANG) $(WARN) -Werror -Wno-unknown-pragmas -g -O1 -fsanitize=fuzzer,address,undefined \
           -fno-sanitize-recover=all
FUZZ_FLAGS_checkpoint    = -DFUZZ_CHECKPOINT
FUZZ_FLAGS_checkpoint-q8 = -DFUZZ_CHECKPOINT -DQUANTIZED
FUZZ_FLAGS_tokenizer     = -DFUZZ_TOKENIZER
FUZZ_FLAGS_encode        = -DFUZZ_ENCODE -DTOKENIZER_PATH='"$(abspath ../shared/models/stories260K/tok512.bin)"'
FUZZ_FLAGS_encode-bpe    = -DFUZZ_ENCODE -DTOKENIZER_PATH='"$(abspath build/fuzz/seeds/tokenizer/bpe512.bin)"'
FUZZ_FLAGS_cli           = -DFUZZ_CLI

build/fuzz-%: tests/fuzz.cpp run.cpp runq.cpp | build/.deps
	$(FUZZ_CXX) $(FUZZ_FLAGS_$*) -o $@ tests/fuzz.cpp

build/fuzz/seeds: tests/fuzz_seeds.py | build/.deps
	$(PYTHON) tests/fuzz_seeds.py $@

# Each target runs FUZZ_SECONDS; its corpus grows in build/fuzz/corpus/<target>,
# and a crashing input is saved as build/fuzz/crash-<target>-* (then turn it into a test).
fuzz: $(FUZZ_TARGETS:%=build/fuzz-%) build/fuzz/seeds
	@for t in $(FUZZ_TARGETS); do mkdir -p build/fuzz/corpus/$$t; \
	    echo "== fuzz $$t ($(FUZZ_LIMIT))"; \
	    ./build/fuzz-$$t $(FUZZ_LIMIT) -max_len=65536 -rss_limit_mb=4096 -timeout=20 \
	        -print_final_stats=1 -artifact_prefix=build/fuzz/crash-$$t- \
	        build/fuzz/corpus/$$t build/fuzz/seeds/$$t > build/fuzz/$$t.log 2>&1; rc=$$?; \
	    grep -E '^(stat::number_of_executed_units|Done|==[0-9]+==|SUMMARY|artifact_prefix)' build/fuzz/$$t.log; \
	    test $$rc -eq 0 || { tail -40 build/fuzz/$$t.log; exit 1; }; done

clean:
	rm -rf run runq build tokenizer.bin models/tinystories-val.txt
