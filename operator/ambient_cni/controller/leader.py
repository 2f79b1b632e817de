"""One active controller: leader election on a coordination.k8s.io Lease.

The leader renews the Lease every RENEW_SECONDS; a candidate takes it over
once it has not been renewed for LEASE_SECONDS. A leader that cannot renew
for LEASE_SECONDS stops (and is restarted by its Deployment), so two
replicas never write at once for longer than that.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client import ApiClient, CoordinationV1Api
from kubernetes.client.exceptions import ApiException

from ambient_cni.kube import as_body, raw

LEASE_SECONDS = 15
RENEW_SECONDS = 2.0
log = logging.getLogger("ambient_cni.controller.leader")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _micro(ts: datetime.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        name: str,
        identity: str,
        annotations: Mapping[str, str] | None = None,
    ):
        """`annotations`: what the holder says of itself on the Lease (its version and how
        it selects pods), replaced by each new holder; `kubectl ambient` reads them."""
        self.coord = CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.annotations = dict(annotations or {})
        self.where = f"{namespace}/{name}"

    def _try(self) -> bool:
        """Take or renew the Lease once; True if we hold it afterwards."""
        now = _now()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _micro(now),
        }
        try:
            lease = raw(
                self.coord.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    "annotations": self.annotations,
                },
                "spec": {**spec, "acquireTime": _micro(now), "leaseTransitions": 0},
            }
            try:
                self.coord.create_namespaced_lease(self.namespace, as_body(body))
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            return True
        current: dict[str, Any] = lease.get("spec") or {}
        holder = current.get("holderIdentity")
        if holder and holder != self.identity and not self._expired(current, now):
            return False
        if holder != self.identity:
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
        lease["spec"] = {**current, **spec}
        meta = lease.setdefault("metadata", {})
        meta["annotations"] = {**(meta.get("annotations") or {}), **self.annotations}
        try:
            # A replace carries resourceVersion: a concurrent writer makes it fail with 409.
            self.coord.replace_namespaced_lease(self.name, self.namespace, as_body(lease))
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    @staticmethod
    def _expired(spec: dict[str, Any], now: datetime.datetime) -> bool:
        renewed = spec.get("renewTime")
        if not renewed:
            return True
        when = datetime.datetime.fromisoformat(str(renewed).replace("Z", "+00:00"))
        duration = int(spec.get("leaseDurationSeconds") or LEASE_SECONDS)
        return now > when + datetime.timedelta(seconds=duration)

    def acquire(self, stop: threading.Event) -> bool:
        """Block until we lead (True) or `stop` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                if self._try():
                    log.info(
                        "leading as %s (lease %s/%s)", self.identity, self.namespace, self.name
                    )
                    return True
            except ApiException as exc:
                if exc.status == 404:  # creating the Lease: its namespace is missing
                    log.error(
                        "cannot take lease %s/%s: namespace %s does not exist "
                        "(create it, or pass --lease-namespace)",
                        self.namespace,
                        self.name,
                        self.namespace,
                    )
                else:
                    log.warning(
                        "lease %s/%s: HTTP %s %s", self.namespace, self.name, exc.status, exc.reason
                    )
            except Exception as exc:  # API unavailable: keep trying
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            if not announced:
                log.info(
                    "waiting for lease %s/%s held by another replica", self.namespace, self.name
                )
                announced = True
            stop.wait(RENEW_SECONDS)
        return False

    def release(self) -> None:
        """Give the Lease up on a clean stop, so a standby takes over at once."""
        try:
            lease = raw(
                self.coord.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            )
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec.pop("holderIdentity", None)
            spec["leaseDurationSeconds"] = 1
            spec["renewTime"] = _micro(_now())
            lease["spec"] = spec
            self.coord.replace_namespaced_lease(self.name, self.namespace, as_body(lease))
            log.info("released lease %s", self.where)
        except ApiException as exc:
            log.warning("releasing lease %s: %s", self.where, exc.reason)

    def keep(self, stop: threading.Event, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew in the background; call `on_lost` if we cannot for a whole lease period."""

        def renew() -> None:
            last_ok = time.monotonic()
            while not stop.wait(RENEW_SECONDS):
                try:
                    if self._try():
                        last_ok = time.monotonic()
                        continue
                    log.error("lease %s/%s taken by another replica", self.namespace, self.name)
                except Exception as exc:
                    log.warning("renewing lease %s/%s: %s", self.namespace, self.name, exc)
                    if time.monotonic() - last_ok < LEASE_SECONDS:
                        continue
                on_lost()
                return

        thread = threading.Thread(target=renew, name="lease-renewer", daemon=True)
        thread.start()
        return thread
