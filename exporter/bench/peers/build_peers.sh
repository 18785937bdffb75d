#!/usr/bin/env bash
# One-time set-up of the peers for `make bench-peers`, all under build/cache/peers/ (never
# committed, never imported by runtime/):
#   * llama.cpp: llama-cpp-python from its sdist, compiled here (-DGGML_NATIVE=ON) into its own
#     venv (venv/); the sdist's vendor/llama.cpp also gives the GGUF converter (peers/convert.py);
#   * ONNX Runtime GenAI: the onnxruntime-genai wheel, pip --target genai-pkgs/ without its
#     dependencies: it runs on the project venv's onnxruntime (>= 1.31 as it asks) and its model
#     builder on the project venv's torch/transformers.
#
# AMX workaround: on some Intel CPUs a native build dies with SIGILL in ggml's AMX int8 kernel on
# the first q8_0 evaluation. We always compile with -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 in
# both C and C++ flags (harmless where AMX is absent) and record in build.json whether the CPU
# advertises AMX and which flags the build used. PEERS_AMX=keep builds without the workaround.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${PEERS_DIR:-build/cache/peers}"
VENV="$ROOT/venv"
SRC="$ROOT/src"
STAMP="$ROOT/llama-$VERSION.built"
mkdir -p "$SRC"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# the converter's own requirement (it runs with the project's torch; see peers/convert.py)
[ -d "$ROOT/convert-deps/sentencepiece" ] || "$VENV/bin/pip" install -q --target "$ROOT/convert-deps" "sentencepiece>=0.1.98,<0.3.0"
[ -d "$ROOT/genai-pkgs/onnxruntime_genai" ] || "$VENV/bin/pip" install -q --no-deps --target "$ROOT/genai-pkgs" "onnxruntime-genai==${ONNXRUNTIME_GENAI_VERSION:-0.18.0}"
SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
if [ -f "$STAMP" ]; then echo "llama-cpp-python $VERSION already built ($STAMP)"; exit 0; fi
[ -f "$SDIST" ] || "$VENV/bin/pip" download -q "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$SRC"
[ -d "$SRC/llama_cpp_python-$VERSION" ] || tar xzf "$SDIST" -C "$SRC"

CPU_AMX=$(grep -o -w 'amx_[a-z0-9]*' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ' || true)
GCC_NATIVE_AMX=$(gcc -march=native -Q --help=target 2>/dev/null | awk '/-mamx-/ && /enabled/ {print $1}' | tr '\n' ' ' || true)
FLAGS=""
if [ "$(uname -m)" = "x86_64" ] && [ "${PEERS_AMX:-}" != "keep" ]; then
  FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# llama-cpp-python's build reads CMAKE_ARGS with shell-like quoting
export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \"-DCMAKE_C_FLAGS=$FLAGS\" \"-DCMAKE_CXX_FLAGS=$FLAGS\""
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
echo "building llama-cpp-python $VERSION: CMAKE_ARGS=$CMAKE_ARGS (cpu amx: ${CPU_AMX:-none}; gcc native amx: ${GCC_NATIVE_AMX:-none})"
START=$(date +%s)
if [ "$("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" = "$VERSION" ] \
   && [ -f "$ROOT/install.log" ] && grep -qF "CMAKE_ARGS=$CMAKE_ARGS" "$ROOT/install.log"; then
  echo "llama-cpp-python $VERSION is installed with these flags (install.log); recording the build only"
  SECONDS_TAKEN=-1
else
  echo "CMAKE_ARGS=$CMAKE_ARGS" > "$ROOT/install.log"
  nice -n 15 "$VENV/bin/pip" install -q --force-reinstall "$SDIST" >> "$ROOT/install.log" 2>&1 \
    || { tail -40 "$ROOT/install.log"; exit 1; }
  SECONDS_TAKEN=$(( $(date +%s) - START ))
fi
# evidence of the build actually used: AMX tile instructions in the CPU backend (0 with the workaround)
LIB=$(ls "$VENV"/lib/python3*/site-packages/llama_cpp/lib/libggml-cpu.so 2>/dev/null | head -1)
AMX_INSNS=""
if command -v objdump >/dev/null 2>&1 && [ -n "$LIB" ]; then
  AMX_INSNS=$(objdump -d "$LIB" | grep -cE 'ldtilecfg|tdpbssd|tdpbf16ps|tileloadd' || true)
fi
"$VENV/bin/python" - "$ROOT/build.json" "$VERSION" "$CMAKE_ARGS" "$FLAGS" "$CPU_AMX" "$GCC_NATIVE_AMX" "$SECONDS_TAKEN" "$AMX_INSNS" <<'PY'
import json, sys
out, version, cmake_args, flags, cpu_amx, gcc_amx, seconds, amx_insns = sys.argv[1:]
json.dump({"llama_cpp_python": version, "cmake_args": cmake_args, "amx_workaround_flags": flags,
           "cpu_amx_flags": cpu_amx.split(), "gcc_native_amx": gcc_amx.split(),
           "amx_instructions_in_libggml_cpu": int(amx_insns or 0) if amx_insns.isdigit() else None,
           "build_seconds": int(seconds) if int(seconds) >= 0 else None}, open(out, "w"), indent=1)
PY
touch "$STAMP"
echo "llama-cpp-python $VERSION ready (build.json)"
