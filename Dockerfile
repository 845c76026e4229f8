# syntax=docker/dockerfile:1
# The training job on an NVIDIA GPU: `docker compose up` (or `make up`) builds and runs it.
# The volume is the interface: runs at /runs, the repository at /repo (read-only), base models at /models
# (read-only), the spec at /config/job.yaml.
ARG BASE_IMAGE=nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE}

# The Python the tests run on (3.11): the base image's own if it has one, else a standalone build that uv fetches.
ARG PYTHON_VERSION=3.11
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib
COPY --from=uv /uv /usr/local/bin/uv
RUN uv venv --python "${PYTHON_VERSION}" --allow-existing /opt/venv

# Dependencies first, in their own layer: a change to the code rebuilds in seconds. The versions are the pins the
# tests use; torch==2.13.0 from PyPI is its CUDA build.
# TORCH_INDEX_URL (the CPU variant sets https://download.pytorch.org/whl/cpu) takes torch from that index instead.
ARG TORCH_INDEX_URL=""
# GPU-only extras (requirements-cuda.txt: Liger Kernel, for train.liger) go in without their dependencies: their one,
# triton, comes pinned with CUDA torch. The CPU variant (TORCH_INDEX_URL set) has no triton and leaves them out.
COPY requirements.txt requirements-cuda.txt /app/
RUN uv pip install --python /opt/venv/bin/python -r /app/requirements.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
    && if [ -z "$TORCH_INDEX_URL" ]; then \
        uv pip install --python /opt/venv/bin/python --no-deps -r /app/requirements-cuda.txt; \
    fi

# llama.cpp's GGUF converter for `job export --format gguf`: its files only (nothing is built), where job export
# looks for it (this Python's prefix/share/llama.cpp). The image has uv rather than pip, so pip runs as a uv tool.
COPY requirements-gguf.txt /app/
COPY scripts/llama-cpp-converter.sh /app/scripts/
RUN /app/scripts/llama-cpp-converter.sh /opt/venv/share/llama.cpp uv tool run --from pip==25.3 pip

COPY pyproject.toml README.md /app/
COPY job /app/job
RUN uv pip install --python /opt/venv/bin/python --no-deps /app

# A user of its own: the job never runs as root. /runs is created here so that a new named volume takes its owner.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin job \
    && mkdir -p /runs /repo /models /config \
    && chown job:job /runs
COPY --chown=job:job examples/default.yaml /config/job.yaml
USER 10001:10001
WORKDIR /runs
VOLUME ["/runs"]

# The job checkpoints and exits 75 on SIGTERM; compose's stop_grace_period gives it the time to.
STOPSIGNAL SIGTERM
# Healthy while the training loop's heartbeat is fresh (run.heartbeat_timeout) or the run is complete.
HEALTHCHECK --interval=60s --timeout=30s --start-period=15m --retries=3 \
    CMD ["python", "-m", "job", "health", "--spec", "/config/job.yaml", "--set", "run.output_dir=/runs"]
ENTRYPOINT ["python", "-m", "job"]
# Inside the container the repository and the run volume are always at /repo and /runs, whatever the spec says.
CMD ["run", "--spec", "/config/job.yaml", "--set", "data.repo=/repo", "--set", "run.output_dir=/runs"]
