"""images.build: the image a rebuilt tag stops naming is removed from the project's store."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from ambient_cni_sandbox import images


class Store:
    """podman and buildah as far as build() asks them: a tag moves when buildah builds."""

    def __init__(self, tagged: str | None, new: str):
        self.tagged = tagged
        self.new = new
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, name: str, *args: str, check: bool = True, timeout: float = 900) -> Any:
        self.calls.append((name, *args))
        if name == "buildah":
            self.tagged = self.new
        if args[:2] == ("image", "inspect"):
            found = self.tagged is not None
            return subprocess.CompletedProcess(args, 0 if found else 1, f"{self.tagged}\n", "")
        return subprocess.CompletedProcess(args, 0, "", "")


def build(monkeypatch: pytest.MonkeyPatch, store: Store) -> str:
    monkeypatch.setattr(images, "run_tool", store)
    monkeypatch.setattr(images, "ensure_base", lambda log: None)
    monkeypatch.setattr(images, "ensure_go_image", lambda log: "go:tag")
    monkeypatch.setattr(images, "host_package_config", lambda scratch: [])
    monkeypatch.setattr(images, "_go_module_cache", lambda: None)
    return images.build(Path("/repo"), tag="localhost/ambient-cni:dev")


def test_the_image_a_rebuild_replaced_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tagged="old", new="new")
    assert build(monkeypatch, store) == "new"
    assert ("podman", "rmi", "old") in store.calls


def test_an_unchanged_tree_or_a_first_build_removes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for before in ("same", None):
        store = Store(tagged=before, new="same")
        assert build(monkeypatch, store) == "same"
        assert not [c for c in store.calls if c[:2] == ("podman", "rmi")]
