# The paper_assets code location: Dagster's Helm chart runs it as a user deployment (gRPC code server), and the
# K8sRunLauncher / k8s_job_executor start runs and steps from the same image.
#   docker build -t REGISTRY/paper-assets:0.1.0 .                       # CUDA build of torch (PyPI's default)
#   docker build --build-arg TORCH_SPEC="torch==2.13.0" \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t REGISTRY/paper-assets:0.1.0-cpu .
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DAGSTER_DISABLE_TELEMETRY=1 \
    PAPER_ASSETS_LOCAL_HOME=/tmp/paper-assets

WORKDIR /opt/paper_assets
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install --no-cache-dir "$TORCH_SPEC"; fi
COPY pyproject.toml setup.py README.md workspace.yaml ./
COPY paper_assets ./paper_assets
RUN pip install --no-cache-dir ".[k8s,s3]"

EXPOSE 3030
# The Helm chart passes its own dagsterApiGrpcArgs; this default serves the same module.
CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", "-m", "paper_assets.definitions"]
