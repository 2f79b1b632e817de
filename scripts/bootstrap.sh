#!/usr/bin/env bash
# Installs everything ambient-cni needs, idempotently: Debian packages, the
# Python venv (.venv) with the project and its dev tools, and the Go-built
# control plane binaries (cached under ~/.cache/ambient-cni). Safe to re-run;
# each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# -- Debian packages: the kernel tools the sandbox and the dataplane drive ------
DEB_PACKAGES=(iproute2 iptables ipset nftables python3-nftables)
# ... and the image's: made (mmdebstrap), built (buildah) and run (podman, runc) without
# a Docker engine. Their configuration and store live under ~/.cache/ambient-cni/containers.
IMAGE_PACKAGES=(mmdebstrap buildah podman runc)
missing=()
for pkg in "${DEB_PACKAGES[@]}" "${IMAGE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "installing ${missing[*]} needs root (run as root, or install them first)"
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# -- Python: a venv in .venv, reinstalled when either pyproject.toml changes --------
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" --version 2>&1); ambient-cni needs Python >= 3.11 (set PYTHON=...)"
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv with $("$PYTHON" --version)"
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        [[ $(id -u) -eq 0 ]] || die "$PYTHON has no venv module; install python3-venv"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf .venv && "$PYTHON" -m venv .venv
    fi
fi
stamp=".venv/.ambient-cni-$(cat pyproject.toml sandbox/pyproject.toml | sha256sum | cut -c1-16)"
if [[ ! -e $stamp ]]; then
    say "installing ambient-cni, its sandbox (sandbox/) and its dev tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]' -e ./sandbox
    rm -f .venv/.ambient-cni-* && touch "$stamp"
fi
# libnftables' own Python binding (Debian's python3-nftables) is built for Debian's Python;
# it is pure Python over ctypes, so the venv imports it through a link to its package.
NFT_BINDING=/usr/lib/python3/dist-packages/nftables
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
[[ -d $NFT_BINDING ]] || die "python3-nftables is installed but $NFT_BINDING is missing"
[[ -L $site_packages/nftables ]] || ln -sfn "$NFT_BINDING" "$site_packages/nftables"

# -- Go: the machine's toolchain builds the control plane (GOTOOLCHAIN=local) -------
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
    export PATH="/usr/local/go/bin:$PATH"
fi
command -v go >/dev/null || die "no Go toolchain on PATH; the sandbox builds its control plane with Go >= 1.26"
need_go=$(sed -n 's/^go \([0-9.]*\)$/\1/p' tools/gobin/go.mod)
have_go=$(go env GOVERSION | sed 's/^go//')
[[ $(printf '%s\n%s\n' "$need_go" "$have_go" | sort -V | head -1) == "$need_go" ]] \
    || die "Go $have_go is older than the $need_go that tools/gobin/go.mod needs"

# Builds etcd, kube-apiserver, kube-controller-manager, kubectl and helm once
# (about 12 minutes on 2 cores with empty Go caches); a cache hit is instant.
.venv/bin/ambient-cni sandbox build >/dev/null
say "ready"
