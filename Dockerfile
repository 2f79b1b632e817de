# One image for every command: `ambient-cni controller` (runs as the non-root default user),
# `ambient-cni agent` and `ambient-cni install-cni` (the chart runs them as root with the
# capabilities they need), and the istio-cni plugin binary that install-cni puts on nodes.
# Debian's own Python, so Debian's python3-nftables (libnftables' binding) works as it is.
# `make image` builds it without a Docker engine (buildah; see README "Installing with Helm").
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG GO_IMAGE=golang:1.26-bookworm

FROM ${DEBIAN_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
# The venv sees Debian's python3-nftables alone, through a link. What nothing imports at run
# time goes: pip, setuptools, and the Kubernetes client's asyncio half (68 MB; the operator
# uses its synchronous client, kopf its own).
RUN python3 -m venv /opt/ambient-cni \
    && /opt/ambient-cni/bin/pip install --no-cache-dir /src \
    && ln -s /usr/lib/python3/dist-packages/nftables \
        "$(/opt/ambient-cni/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/nftables" \
    && rm -rf /opt/ambient-cni/lib/python3*/site-packages/pip /opt/ambient-cni/bin/pip* \
        /opt/ambient-cni/lib/python3*/site-packages/setuptools \
        /opt/ambient-cni/lib/python3*/site-packages/kubernetes/aio

# The istio-cni plugin: a static Go binary that install-cni copies onto the node.
FROM ${GO_IMAGE} AS plugin
WORKDIR /src/cni-plugin
COPY cni-plugin ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/istio-cni .

FROM ${DEBIAN_IMAGE}
# iptables ships both the nft and the legacy flavours (iptables-nft-*, iptables-legacy-*);
# the agent picks the one the node already uses. Versions are the release's own:
# Debian replaces pinned versions on every point release, so pins would break builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 iptables ipset nftables iproute2 python3-nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/ambient-cni /opt/ambient-cni
COPY --from=plugin /out/istio-cni /opt/ambient-cni/bin/istio-cni
ENV PATH=/opt/ambient-cni/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["ambient-cni"]
CMD ["controller"]
