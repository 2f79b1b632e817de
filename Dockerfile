# One image for both commands: `ambient-cni controller` (runs as the non-root
# default user) and `ambient-cni agent` (the chart runs it as root with the
# capabilities it needs). tests/e2e/test_image.py lints this file with hadolint
# and runs its install steps in a clean virtualenv, as no Docker engine runs there.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

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

FROM ${PYTHON_IMAGE}
# iptables ships both the nft and the legacy flavours (iptables-nft-*, iptables-legacy-*);
# the agent picks the one the node already uses. Versions are the release's own:
# Debian replaces pinned versions on every point release, so pins would break builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ipset nftables iproute2 python3-nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/ambient-cni /opt/ambient-cni
ENV PATH=/opt/ambient-cni/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["ambient-cni"]
CMD ["controller"]
