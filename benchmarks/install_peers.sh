#!/bin/sh
# Installs the benchmark peers into the Python running this script (default: python3):
# llama-cpp-python built from source for this host, its source distribution unpacked under
# $PEERS_DIR (benchmarks/peers.py finds convert_hf_to_gguf.py there), onnxruntime-genai with
# the onnx_ir its model builder needs, and sentencepiece for convert_hf_to_gguf.py.
#
#     sh benchmarks/install_peers.sh [PYTHON]        # about 35 minutes on 2 cores
#
# On CPUs with AMX, llama.cpp built with -DGGML_NATIVE=ON takes its AMX path and crashes
# (segmentation fault) on Q8_0 and Q4_0 files; there it is built for AVX-512 without AMX.
set -eu
PYTHON=${1:-python3}
VERSION=0.3.36
PEERS_DIR=${PEERS_DIR:-/opt/peers}

if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"
else
    CMAKE_ARGS="-DGGML_NATIVE=ON"
fi
export CMAKE_ARGS="$CMAKE_ARGS -DLLAVA_BUILD=OFF"  # no multimodal library: not needed, saves build time
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)

mkdir -p "$PEERS_DIR"
"$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$PEERS_DIR"
tar xzf "$PEERS_DIR/llama_cpp_python-$VERSION.tar.gz" -C "$PEERS_DIR"
echo "CMAKE_ARGS=$CMAKE_ARGS"
nice -n 10 "$PYTHON" -m pip install --no-cache-dir "$PEERS_DIR/llama_cpp_python-$VERSION.tar.gz"
"$PYTHON" -m pip install "onnxruntime-genai>=0.18" onnx_ir sentencepiece accelerate
"$PYTHON" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
