# GPU image: SGLang's release image (CUDA, NCCL, torch, transformers, SGLang) + megatron-core
# + transformer-engine compiled against that image's torch (+ apex, optional) + srft_mcore.
# Every version comes from requirements/gpu.txt (tests/test_gpu_pins.py keeps the two in step).
# Build:  docker build -t srft_mcore .                 (with apex: --build-arg WITH_APEX=1)
# Run:    docker run --gpus all --ipc=host -v /data:/data srft_mcore \
#           bash examples/srft_qwen7b_tp2pp1.sh
# The CPU development environment does not use this file (see scripts/setup_env.sh).
FROM lmsysorg/sglang:v0.5.19-cu129

# apex adds the fused masked-softmax kernels of the local layer spec; the TE spec needs none
ARG WITH_APEX=0
# parallel compile jobs for transformer-engine and apex
ARG MAX_JOBS=8

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NVTE_FRAMEWORK=pytorch \
    MAX_JOBS=${MAX_JOBS}

WORKDIR /workspace/srft_mcore
COPY requirements/gpu.txt requirements/gpu.txt

# 1) freeze the image's torch stack: every later pip call gets it as constraints, so a
#    package that wants another torch, transformers or CUDA library fails the build instead
#    of replacing them (which would break SGLang and the extensions built below)
RUN pip list --format=freeze --exclude-editable \
      | grep -iE '^(torch|torchvision|torchaudio|triton|transformers|tokenizers|sgl-kernel|sglang-kernel|flashinfer[a-z0-9_-]*|nvidia-[a-z0-9_-]+)==' \
      > /tmp/image-pins.txt \
    && grep -q '^torch==' /tmp/image-pins.txt

# 2) megatron-core and the rest, at requirements/gpu.txt's versions
RUN pip install --no-cache-dir -c /tmp/image-pins.txt -c requirements/gpu.txt \
      megatron-core psutil datasets math-verify matplotlib tensorboard pytest pybind11 ninja

# 3) transformer-engine, its torch extension compiled against the image's torch
RUN pip install --no-cache-dir --no-build-isolation -c /tmp/image-pins.txt -c requirements/gpu.txt \
      "transformer-engine[pytorch]"

# 4) apex (optional), at the commit requirements/gpu.txt names
RUN if [ "$WITH_APEX" = "1" ]; then \
      APEX_SRC=$(sed -n 's/^# apex: //p' requirements/gpu.txt) \
      && test -n "$APEX_SRC" \
      && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 NVCC_APPEND_FLAGS="--threads 4" \
         pip install --no-cache-dir --no-build-isolation -c /tmp/image-pins.txt \
           -c requirements/gpu.txt --config-settings "--build-option=--cpp_ext --cuda_ext" \
           "apex @ git+${APEX_SRC}"; \
    fi

COPY setup.py README.md pytest.ini ./
COPY srft_mcore ./srft_mcore
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests
RUN pip install --no-cache-dir --no-deps -c requirements/gpu.txt -e . && srft-doctor env

CMD ["bash"]
