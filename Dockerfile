# One image for every command: `ambient-cni controller` (runs as the non-root
# default user), `ambient-cni agent` and `ambient-cni install-cni` (the chart runs
# them as root with the capabilities they need), and the istio-cni plugin binary. tests/e2e/test_image.py lints this file with hadolint
# and runs its install steps in a clean virtualenv, as no Docker engine runs there.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG GO_IMAGE=golang:1.24-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
# libnftables' Python binding comes from Debian (python3-nftables, installed below); it is
# pure Python over ctypes, so the venv imports it through a link to Debian's package.
RUN python -m venv /opt/ambient-cni \
    && /opt/ambient-cni/bin/pip install --no-cache-dir /src \
    && ln -s /usr/lib/python3/dist-packages/nftables \
        "$(/opt/ambient-cni/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/nftables"

# The istio-cni plugin: a static Go binary that install-cni copies onto the node.
FROM ${GO_IMAGE} AS plugin
WORKDIR /src/cni-plugin
COPY cni-plugin ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/istio-cni .

FROM ${PYTHON_IMAGE}
# iptables ships both the nft and the legacy flavours (iptables-nft-*, iptables-legacy-*);
# the agent picks the one the node already uses. Versions are the release's own:
# Debian replaces pinned versions on every point release, so pins would break builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ipset nftables iproute2 python3-nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/ambient-cni /opt/ambient-cni
COPY --from=plugin /out/istio-cni /opt/ambient-cni/bin/istio-cni
ENV PATH=/opt/ambient-cni/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["ambient-cni"]
CMD ["controller"]
