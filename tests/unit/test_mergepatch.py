from __future__ import annotations

from typing import Any

import pytest

from ambient_cni.mergepatch import merge_patch


def apply(target: Any, patch: Any) -> Any:
    """RFC 7386 MergePatch, to check patches by their effect."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply(result.get(key), value)
    return result


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"z": {"ip": "10.0.0.1", "ready": True}}, {"z": {"ready": True}}, {"z": {"ip": None}}),
        ({"w": [1, 2]}, {"w": [1]}, {"w": [1]}),
        ({}, {"z": {"a": 1}}, {"z": {"a": 1}}),
        ({"z": {"a": 1}}, {"z": 5}, {"z": 5}),
    ],
)
def test_merge_patch(old: dict[str, Any], new: dict[str, Any], patch: dict[str, Any]) -> None:
    assert merge_patch(old, new) == patch
    assert apply(old, patch) == new
