"""Where the plugin reads from: the API server, with the user's kubeconfig and context as
kubectl would use them. Read-only; every failure becomes a SourceError a person can act on."""

from __future__ import annotations

import datetime
import email.utils
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kubernetes import config as kube_config
from kubernetes.client import (
    ApiClient,
    CoordinationV1Api,
    CoreV1Api,
    CustomObjectsApi,
)
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from ambient_cni.api import names
from ambient_cni.selection import PodView, pod_view

from .objects import ControllerInfo, NodeObject, controller_info, node_object

T = TypeVar("T")


class SourceError(Exception):
    """The question could not be answered: no cluster, no permission, no such object."""


class ClusterSource(Protocol):
    def node_configs(self) -> list[NodeObject]: ...
    def node_config(self, node: str) -> NodeObject | None: ...
    def node_names(self) -> list[str]: ...
    def pods(self) -> list[PodView]: ...
    def pod(self, namespace: str, name: str) -> PodView | None: ...
    def namespace_labels(self, namespace: str) -> dict[str, str] | None: ...
    def all_namespace_labels(self) -> dict[str, dict[str, str]]: ...
    def controller(self, namespace: str) -> ControllerInfo: ...


class Kubeconfig:
    """The user's kubeconfig: $KUBECONFIG (a list of files) or ~/.kube/config, or --kubeconfig;
    its current context or --context."""

    def __init__(self, path: Path | None, context: str | None):
        self.path = str(path) if path else None
        self.context = context

    def client(self) -> ApiClient:
        try:
            api: ApiClient = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=self.path, context=self.context
            )
        except (kube_config.ConfigException, OSError) as exc:
            raise SourceError(f"cannot use the kubeconfig: {exc}") from exc
        return api

    def namespace(self) -> str:
        """The context's namespace, "default" when it names none (as kubectl)."""
        try:
            contexts, current = kube_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                self.path
            )
        except (kube_config.ConfigException, OSError) as exc:
            raise SourceError(f"cannot use the kubeconfig: {exc}") from exc
        chosen = current
        if self.context is not None:
            chosen = next((c for c in contexts if c.get("name") == self.context), None)
            if chosen is None:
                raise SourceError(f"context {self.context!r} is not in the kubeconfig")
        return str((chosen or {}).get("context", {}).get("namespace") or "default")


# Seconds to connect, and to wait for an answer: an unreachable API server is an error
# within moments, not after the operating system's TCP timeout.
REQUEST_TIMEOUT = (5.0, 30.0)


def _raw(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.data)
    return data


def _server_time(response: Any) -> datetime.datetime | None:
    try:
        return email.utils.parsedate_to_datetime(response.headers["Date"])
    except (KeyError, TypeError, ValueError):
        return None


class KubeSource:
    def __init__(self, api: ApiClient):
        self.api = api
        self.core = CoreV1Api(api)
        self.custom = CustomObjectsApi(api)
        self.coordination = CoordinationV1Api(api)
        self.server = str(api.configuration.host)

    def _response(self, what: str, request: Callable[[], Any], *, missing_ok: bool) -> Any:
        try:
            return request()
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise SourceError(f"cannot {what}: {_api_words(exc)}") from exc
        except HTTPError as exc:
            raise SourceError(f"cannot reach the API server at {self.server}: {exc}") from exc

    def _call(self, what: str, request: Callable[[], Any], *, missing_ok: bool = False) -> Any:
        response = self._response(what, request, missing_ok=missing_ok)
        return None if response is None else _raw(response)

    def _list_node_configs(self, limit: int = 0) -> dict[str, Any]:
        listed = self._call(
            "list AmbientNodeConfigs",
            lambda: self.custom.list_cluster_custom_object(
                names.GROUP,
                names.VERSION,
                names.PLURAL,
                limit=limit,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
            missing_ok=True,
        )
        if listed is None:
            raise SourceError(
                f"the AmbientNodeConfig CRD ({names.CRD_NAME}) is not installed in this cluster"
            )
        return dict(listed)

    def node_configs(self) -> list[NodeObject]:
        return [node_object(item) for item in self._list_node_configs().get("items") or []]

    def node_config(self, node: str) -> NodeObject | None:
        found = self._call(
            f"read AmbientNodeConfig {node}",
            lambda: self.custom.get_cluster_custom_object(
                names.GROUP,
                names.VERSION,
                names.PLURAL,
                node,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
            missing_ok=True,
        )
        if found is None:
            self._list_node_configs(1)  # no such object, or no such resource at all?
            return None
        return node_object(found)

    def node_names(self) -> list[str]:
        listed = self._call(
            "list nodes",
            lambda: self.core.list_node(_preload_content=False, _request_timeout=REQUEST_TIMEOUT),
        )
        return [str(item["metadata"]["name"]) for item in listed.get("items") or []]

    def pods(self) -> list[PodView]:
        listed = self._call(
            "list pods",
            lambda: self.core.list_pod_for_all_namespaces(
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        return [pod_view(item) for item in listed.get("items") or []]

    def pod(self, namespace: str, name: str) -> PodView | None:
        found = self._call(
            f"read pod {namespace}/{name}",
            lambda: self.core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            missing_ok=True,
        )
        return pod_view(found) if found is not None else None

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        found = self._call(
            f"read namespace {namespace}",
            lambda: self.core.read_namespace(
                namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
            missing_ok=True,
        )
        return dict(found["metadata"].get("labels") or {}) if found is not None else None

    def all_namespace_labels(self) -> dict[str, dict[str, str]]:
        listed = self._call(
            "list namespaces",
            lambda: self.core.list_namespace(
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        return {
            str(item["metadata"]["name"]): dict(item["metadata"].get("labels") or {})
            for item in listed.get("items") or []
        }

    def controller(self, namespace: str) -> ControllerInfo:
        """The controller's Lease; one that cannot be read is said, not an error (it only
        tells how the controller selects, and users may not be allowed to read it)."""
        where = f"{namespace}/{names.CONTROLLER_LEASE}"
        try:
            response = self._response(
                f"read the controller's Lease {where}",
                lambda: self.coordination.read_namespaced_lease(
                    names.CONTROLLER_LEASE,
                    namespace,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
                missing_ok=True,
            )
        except SourceError as exc:
            if "forbidden" not in str(exc):
                raise
            return ControllerInfo(found=False, problem=f"its Lease {where} is not readable ({exc})")
        if response is None:
            return ControllerInfo(found=False, problem=f"no Lease {where}")
        return controller_info(_raw(response), _server_time(response))


def _api_words(exc: ApiException) -> str:
    message = ""
    try:
        message = str(json.loads(exc.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    if exc.status == 401:
        return "unauthorized: the kubeconfig's credentials were refused"
    if exc.status == 403:
        return f"forbidden: {message or exc.reason}"
    return f"HTTP {exc.status} {exc.reason}" + (f": {message}" if message else "")
