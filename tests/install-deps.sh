#!/bin/sh
# Installs what `make test` needs when it is missing, from Debian's packages:
# PyTorch, NumPy, pytest and sentencepiece for $PYTHON, clang++ with its OpenMP
# and libFuzzer runtimes, valgrind, and the ARM cross-compiler with qemu to run
# what it builds.
set -e
PYTHON=${PYTHON:-/usr/bin/python3}
if $PYTHON -c 'import torch, numpy, pytest, sentencepiece' 2>/dev/null &&
   command -v clang++ >/dev/null && echo 'int main(){}' | clang++ -fopenmp -x c++ - -o /dev/null 2>/dev/null &&
   echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, long) { return 0; }' |
       clang++ -fsanitize=fuzzer -x c++ - -o /dev/null 2>/dev/null &&
   command -v valgrind >/dev/null &&
   command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then
    exit 0
fi
PKGS="python3-torch python3-numpy python3-pytest python3-sentencepiece clang libomp-dev libclang-rt-14-dev valgrind g++-aarch64-linux-gnu qemu-user"
if ! command -v apt-get >/dev/null; then
    echo "missing test dependencies; install the equivalents of: $PKGS" >&2
    exit 1
fi
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing test dependencies: $PKGS" >&2
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y $PKGS
