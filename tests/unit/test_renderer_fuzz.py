"""Hostile strings thrown at every renderer: each output line is one of the shapes it knows.

The renderers take interface names from specs and annotations. Whatever
reaches them (newlines, quotes, option-like words, non-ASCII, 10 kB), the
output must consist only of the rule lines the renderer constructs, with a
name only where a name belongs; otherwise the renderer refuses, with
UnsafeInput, and emits nothing. The models refuse the same strings before
that (a second line of defence is tested with `model_construct`, which skips
validation).
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ambient_cni.api.models import INTERFACE_NAME_PATTERN, Workload, is_interface_name
from ambient_cni.dataplane.constants import Family
from ambient_cni.dataplane.errors import UnsafeInput
from ambient_cni.dataplane.iptables_rules import host_ruleset, pod_ruleset
from ambient_cni.dataplane.redirection import PodRedirect

FAMILIES: tuple[Family, ...] = (4, 6)
NAME = INTERFACE_NAME_PATTERN.strip("^$")
INTERFACE_LINE = re.compile(
    rf"-A ISTIO_PRERT -i {NAME} -p tcp -j (REDIRECT --to-ports 15001|RETURN)"
)
# Every line the renderer writes without interfaces, over every combination of its knobs.
KNOWN_LINES = {
    line
    for family, dns, bypass in itertools.product(FAMILIES, (True, False), (True, False))
    for line in pod_ruleset(
        PodRedirect(family=family, dns_capture=dns, bypass_inbound=bypass)
    ).splitlines()
} | {line for family in FAMILIES for line in host_ruleset(family).splitlines()}

HOSTILE = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20),
    st.sampled_from(
        [
            "eth0 -p tcp -j RETURN\n-A ISTIO_OUTPUT -p tcp --dport 1234 -j DNAT "
            "--to-destination 6.6.6.6:80\n-A ISTIO_PRERT -i eth0",
            'a"b',
            "a'b",
            "!",
            "-jDROP",
            "--dport",
            "eth0+",
            "eth0 ",
            " eth0",
            "eth0\n",
            "eth0\r\nCOMMIT",
            "*nat",
            "tün0",
            ".",
            "..",
            "a/b",
            "a:b",
            "x" * 16,
            "x" * 10_000,
            "",
        ]
    ),
    st.from_regex(INTERFACE_NAME_PATTERN, fullmatch=True),
)


def assert_only_known_lines(text: str) -> None:
    for line in text.splitlines():
        assert line in KNOWN_LINES or INTERFACE_LINE.fullmatch(line), repr(line)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(HOSTILE, max_size=3),
    family=st.sampled_from([4, 6]),
    dns=st.booleans(),
    bypass=st.booleans(),
)
def test_the_pod_renderer_emits_only_its_own_lines(
    names: list[str], family: int, dns: bool, bypass: bool
) -> None:
    # Past the model's validation on purpose: the renderer must hold on its own.
    redirect = PodRedirect.model_construct(
        family=family, dns_capture=dns, bypass_inbound=bypass, virtual_interfaces=tuple(names)
    )
    try:
        text = pod_ruleset(redirect)
    except UnsafeInput:
        assert not all(is_interface_name(name) for name in names)
        return
    assert all(is_interface_name(name) for name in names)
    assert_only_known_lines(text)
    for name in names:
        assert f" -i {name} -p tcp -j RETURN" in text


@settings(max_examples=300)
@given(name=HOSTILE)
def test_the_models_refuse_what_the_renderer_refuses(name: str) -> None:
    entry = {"uid": "u", "name": "p", "namespace": "n", "ips": ["10.0.0.1"]}
    if is_interface_name(name):
        Workload.model_validate({**entry, "rerouteVirtualInterfaces": [name]})
        PodRedirect(virtual_interfaces=(name,))
        return
    with pytest.raises(ValidationError):
        Workload.model_validate({**entry, "rerouteVirtualInterfaces": [name]})
    with pytest.raises(ValidationError):
        PodRedirect(virtual_interfaces=(name,))


@pytest.mark.parametrize("family", [4, 6])
def test_the_host_renderer_emits_only_its_own_lines(family: int) -> None:
    assert_only_known_lines(host_ruleset(4 if family == 4 else 6))
