#!/usr/bin/env bash
# The engine's fp32 linear kernel (speculation/csrc/linear_f32.c) is built with the system's C
# compiler on first use: Debian's gcc, installed here when missing and we may (root with
# apt-get). Without one the engine runs on torch's kernels (slower) and its kernel tests skip.
set -u
if command -v "${CC:-cc}" >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's gcc for the engine's fp32 linear kernel (apt-get)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null \
    || echo "warning: could not install gcc; fp32 linear layers will run on torch's kernels" >&2
else
  echo "warning: no C compiler and no root apt-get; fp32 linear layers will run on torch's kernels" >&2
fi
exit 0
