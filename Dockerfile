# splitserve: one image for every service (gateway, prefill, decode, colocated worker).
#
#   docker build -t splitserve .                                  # CPU (torch CPU wheel)
#   docker build -t splitserve:gpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       --build-arg EXTRAS=ucx,gpu .                              # NVIDIA GPUs (CUDA torch + Triton)
#
# The entrypoint is the `splitserve` CLI: `docker run splitserve gateway --port 8000 ...`.
# Without --model, services build the tiny demo checkpoint into $SPLITSERVE_CACHE (mount a volume
# there so the services of a stack share one copy).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=ucx

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPLITSERVE_CACHE=/cache \
    HF_HUB_OFFLINE=1 \
    UCX_TLS=tcp,self,sm \
    UCX_WARN_UNUSED_ENV_VARS=n

# torch first, from its own index, so resolving the project never pulls a different torch build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/splitserve
COPY . .
RUN pip install ".[${EXTRAS}]" \
    && useradd --create-home --uid 1000 splitserve \
    && mkdir -p /cache && chown splitserve /cache

USER splitserve
VOLUME ["/cache"]
# gateway HTTP, prefill gRPC, decode gRPC / colocated worker gRPC
EXPOSE 8000 50051 50052

ENTRYPOINT ["splitserve"]
CMD ["up", "--host", "0.0.0.0"]
