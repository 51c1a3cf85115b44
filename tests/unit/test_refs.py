from __future__ import annotations

import pytest

from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.refs import Ref, parse_ref, parse_target, parse_version

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("support", Ref("support")),
        ("support@v3", Ref("support", version=3)),
        ("support@3", Ref("support", version=3)),
        ("support:staging", Ref("support", alias="staging")),
        ("org.support-v2_x", Ref("org.support-v2_x")),
    ],
)
def test_parse(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize("text", ["", "@v1", "a@v0", "a@x", "a:Prod", "a b", "a:", "-a"])
def test_malformed_names_the_param(text: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_ref(text, param="model")
    assert info.value.param == "model"


def test_version() -> None:
    assert parse_version("v12") == 12
    with pytest.raises(InvalidArgumentError):
        parse_version("v-1")


@pytest.mark.parametrize(
    ("text", "version_first", "ref"),
    [
        ("other@v2", False, Ref("other", version=2)),
        ("@v2", False, Ref("support", version=2)),
        (":staging", False, Ref("support", alias="staging")),
        ("v2", True, Ref("support", version=2)),
        ("v2", False, Ref("v2")),  # a bare vN is a name where a name is expected
        ("support", True, Ref("support")),
    ],
)
def test_parse_target_with_a_default_adapter(text: str, version_first: bool, ref: Ref) -> None:
    assert parse_target(text, default_name="support", param="ref", version_first=version_first) == ref


@pytest.mark.parametrize("text", ["@v2", ":staging"])
def test_parse_target_without_a_default_adapter(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="no default_adapter is set") as info:
        parse_target(text, default_name=None, param="ref")
    assert info.value.param == "ref"
