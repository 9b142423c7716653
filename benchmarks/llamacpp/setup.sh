#!/usr/bin/env bash
# The engine benchmark's own set-up step for its llama.cpp anchor (not a project dependency):
# a separate venv with llama-cpp-python built from source on this machine, so its kernels match
# this CPU. The benchmark runs it as a subprocess (benchmarks/llamacpp/worker.py) on the same
# GGUF file the project's default model is loaded from.
#
#   benchmarks/llamacpp/setup.sh            # builds benchmarks/llamacpp/.venv (5-15 min on 2 cores)
#
# LLAMA_CPP_VERSION overrides the pinned release; CMAKE_ARGS passes build options through
# (e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF" where a native build crashes, as one with AMX did on a Xeon).
set -euo pipefail
cd "$(dirname "$0")"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already built in benchmarks/llamacpp/.venv"
  exit 0
fi
test -x .venv/bin/python || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
echo "building llama-cpp-python $VERSION from source (CMAKE_ARGS='${CMAKE_ARGS:-}') ..."
.venv/bin/pip install -q --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'built:', llama_cpp.llama_print_system_info().decode())"
