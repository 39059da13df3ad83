#!/bin/sh
# Installs what the Makefile needs when it is missing, from Debian's packages.
#   sh tests/install-deps.sh train   train.py: PyTorch and NumPy for $PYTHON, and OpenBLAS
#                                    (Debian's PyTorch multiplies matrices ~35x faster with it)
#   sh tests/install-deps.sh         make test: also pytest (and pytest-xdist, to run tests on
#                                    every core) and sentencepiece, clang++ with its
#                                    OpenMP and libFuzzer runtimes, valgrind, GNU time, the ARM
#                                    cross-compiler with qemu to run what it builds, and node
#                                    with npm (the tests' JavaScript references)
set -e
PYTHON=${PYTHON:-/usr/bin/python3}
TRAIN_PKGS="python3-torch python3-numpy libopenblas0-pthread"
PKGS="$TRAIN_PKGS python3-pytest python3-pytest-xdist python3-sentencepiece clang libomp-dev libclang-rt-14-dev valgrind time g++-aarch64-linux-gnu qemu-user"
# Debian's npm conflicts with a NodeSource nodejs (which bundles npm): only when npm is missing
command -v npm >/dev/null || PKGS="$PKGS nodejs npm"

has_training() {
    $PYTHON -c 'import torch, numpy' 2>/dev/null &&
    { ! command -v dpkg >/dev/null || dpkg -s libopenblas0-pthread >/dev/null 2>&1; }
}
has_testing() {
    $PYTHON -c 'import pytest, xdist, sentencepiece' 2>/dev/null &&
    command -v clang++ >/dev/null && echo 'int main(){}' | clang++ -fopenmp -x c++ - -o /dev/null 2>/dev/null &&
    echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, long) { return 0; }' |
        clang++ -fsanitize=fuzzer -x c++ - -o /dev/null 2>/dev/null &&
    command -v valgrind >/dev/null && test -x /usr/bin/time &&
    command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null &&
    command -v node >/dev/null && command -v npm >/dev/null
}

if [ "${1:-}" = train ]; then
    has_training && exit 0
    PKGS=$TRAIN_PKGS
else
    has_training && has_testing && exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "missing dependencies; install the equivalents of: $PKGS" >&2
    exit 1
fi
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing: $PKGS" >&2
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y $PKGS
