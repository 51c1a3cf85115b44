"""Self-replay's built-in prompts: none is in the regression suite (the suite would be trained on),
none repeats, and asking for more than there are is refused by name."""

from __future__ import annotations

import re

import pytest

from loraflow.registry.errors import InvalidArgumentError
from loraflow.trainer.config import TrainConfig
from loraflow.trainer.eval.regression_suite import load_suite
from loraflow.trainer.replay import PROMPTS, replay_prompts

pytestmark = pytest.mark.unit


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def test_no_replay_prompt_is_a_suite_item_and_none_repeats() -> None:
    suite = {_norm(item.messages[-1]["content"]) for item in load_suite()}
    prompts = [_norm(p) for p in PROMPTS]
    assert len(set(prompts)) == len(prompts)
    assert not suite & set(prompts)


def test_replay_prompts_are_drawn_by_seed_and_bounded() -> None:
    assert replay_prompts(8, seed=3) == replay_prompts(8, seed=3)
    assert replay_prompts(8, seed=3) != replay_prompts(8, seed=4)
    assert replay_prompts(0, seed=0) == []
    assert sorted(replay_prompts(len(PROMPTS), seed=0)) == sorted(PROMPTS)
    with pytest.raises(InvalidArgumentError) as err:
        replay_prompts(len(PROMPTS) + 1, seed=0)
    assert err.value.param == "self_replay"


def test_self_replay_is_off_unless_asked_and_never_negative() -> None:
    config = TrainConfig(adapter="a", base="b", data="d")
    assert config.self_replay == 0
    with pytest.raises(ValueError, match="self_replay"):
        TrainConfig(adapter="a", base="b", data="d", self_replay=-1)
