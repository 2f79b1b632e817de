"""kube.decode: the API server's JSON, through orjson, with the standard library behind it."""

from __future__ import annotations

import json
import math

import pytest

from ambient_cni.kube import decode


def test_a_page_decodes_as_the_standard_library_decodes_it() -> None:
    page = {"metadata": {"continue": "x"}, "items": [{"a": [1, 2.5, None, True, "é"]}]}
    text = json.dumps(page)
    assert decode(text.encode()) == decode(text) == page


def test_integers_are_exact_to_64_bits_and_lax_json_still_decodes() -> None:
    assert decode(b'{"n": 9223372036854775807, "m": -9223372036854775808}') == {
        "n": 2**63 - 1,
        "m": -(2**63),
    }
    assert math.isnan(decode(b'{"x": NaN}')["x"])  # orjson refuses it; json reads it


def test_what_is_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="Expecting property name"):
        decode(b"{not json")
