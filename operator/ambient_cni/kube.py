"""Thin helpers over the Kubernetes client, shared by every component.

Objects stay plain dicts in the API's JSON form, which is what the pure
modules take.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration

MERGE_PATCH = "application/merge-patch+json"

Obj = dict[str, Any]


def new_api_client(kubeconfig: Path | None = None, *, pool_size: int | None = None) -> ApiClient:
    """A client from `kubeconfig`, or in-cluster, or from $KUBECONFIG / ~/.kube/config.
    `pool_size`: connections kept for reuse (default: the client's, 5 per CPU), at least as
    many as threads calling at once, or each call beyond it pays a new TLS handshake."""
    if kubeconfig is None:
        try:
            kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
            configuration = Configuration.get_default_copy()
            if pool_size is not None:
                configuration.connection_pool_maxsize = pool_size
            return ApiClient(configuration)
        except kube_config.ConfigException:
            pass
    configuration = Configuration()
    if pool_size is not None:
        configuration.connection_pool_maxsize = pool_size
    client: ApiClient = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig) if kubeconfig else None, client_configuration=configuration
    )
    return client


def as_body(data: Obj | list[Obj]) -> Any:
    """Pass a JSON-shaped dict (or a JSON patch's list) as a request body.

    The generated client serialises dicts unchanged; its signatures ask for
    models, whose round trip would reformat timestamps and drop unknown fields.
    """
    return data


def in_cluster_server(env: Mapping[str, str]) -> str | None:
    """The API server as client-go's in-cluster config finds it: where
    KUBERNETES_SERVICE_HOST/PORT say (the kubelet sets them in every pod); None outside one."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def decode(data: bytes | str) -> Any:
    """JSON from the API server: orjson, which decodes a page of pods faster than the
    standard library (a large list is most of a restart); the standard library for what
    orjson is stricter about than Python (NaN, a lone surrogate), which the API server does
    not send. Integers are exact to 64 bits, all the API server holds."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def raw(response: Any) -> Obj:
    """Decode a `_preload_content=False` response."""
    data: Obj = decode(response.data)
    return data


def discard(response: Any) -> None:
    """Read an unpreloaded answer to its end, so its connection goes back to the pool: left
    unread, it is not reused, and each next request pays a new TLS handshake."""
    _ = response.data
