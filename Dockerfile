# GPU image: NGC PyTorch (CUDA, NCCL, transformer-engine, apex) + megatron-core + SGLang.
# Build:  docker build -t srft_mcore .
# Run:    docker run --gpus all --ipc=host -v /data:/data srft_mcore \
#           bash examples/srft_qwen7b_tp2pp1.sh
# The CPU development environment does not use this file (see scripts/setup_env.sh).
ARG BASE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/srft_mcore
# the base image's torch, transformer-engine and apex stay as they are; sglang brings its own
# CUDA kernels (sgl-kernel), so no CPU shims are installed here
RUN pip install --no-cache-dir "megatron-core>=0.16" psutil "sglang[srt]" sglang-router \
        transformers datasets safetensors pyyaml math-verify tqdm matplotlib tensorboard pytest

COPY setup.py README.md ./
COPY srft_mcore ./srft_mcore
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests
COPY pytest.ini ./
RUN pip install --no-cache-dir --no-deps -e . && srft-doctor env

CMD ["bash"]
