"""A real instruct model end to end, as a user runs it: SmolLM2-135M-Instruct converted from its
GGUF file (the session's ``smollm2`` fixture), a dataset prepared and an adapter trained with the
console scripts, promoted, served by ``loraflow serve`` over vLLM, and asked through the gateway
with the official ``openai`` client. Kept short (a few training steps): what it checks is what a
tiny random model cannot show. The prompts are rendered by SmolLM2's own ChatML template on both
sides, the adapter answers in the trained format and ends its turn with ``<|im_end|>`` (served
answers stop by themselves), and the template hash recorded at training matches the served base's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from loraflow.server.embedded import wait_until_ok
from loraflow.server.engine.supervisor import free_port
from loraflow.trainer.synthetic import INSTRUCTION, make_rows, write_jsonl
from tests.factories import FORCE
from tests.services import RealModel

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
TRAIN = """\
adapter = "orders"
data = "orders"
max_steps = 10
batch_size = 8
learning_rate = 1e-3
eval_steps = 100
eval_generations = 0
self_replay = 8
"""


def test_smollm2_trained_served_and_asked_with_its_own_template(smollm2: RealModel, tmp_path: Path) -> None:
    assert smollm2.conversion.returncode == 0, smollm2.conversion.stderr
    env = {
        **os.environ,
        "LORAFLOW_HOME": str(tmp_path / "home"),
        "LORAFLOW_ARTIFACT_URI": str(tmp_path / "artifacts"),
    }

    def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        return done

    rows = make_rows(120, seed=0)
    cli(
        "loraflow",
        "data",
        "prepare",
        str(write_jsonl(tmp_path / "orders.jsonl", rows)),
        "--name",
        "orders",
        "--base-model",
        str(smollm2.path),
    )
    (tmp_path / "train.toml").write_text(TRAIN)
    trained = json.loads(
        cli(
            "loraflow",
            "train",
            "--config",
            "train.toml",
            "--base-model",
            str(smollm2.path),
            "--json",
            timeout=600,
        ).stdout
    )
    assert trained["metrics"]["eval_loss"] < trained["metrics"]["base_eval_loss"]
    assert trained["metrics"]["self_replay_examples"] >= 4  # the base's own answers, mixed in
    cli("adapters", "promote", "orders", "v1", *FORCE)

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [
                str(BIN / "loraflow"),
                "serve",
                "--base-model",
                str(smollm2.path),
                "--model-name",
                "smollm2",
                "--port",
                str(port),
            ],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until_ok(f"{url}/ready", 300, alive=lambda: serve.poll() is None), log.read_text()[-3000:]
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            models = {m.id: m for m in client.models.list().data}
            versions = (models["orders"].model_extra or {})["versions"]
            assert [v["template_matches"] for v in versions] == [True]  # trained and served with one template
            seen = {row["input"] for row in rows}
            held_out = [row for row in make_rows(40, seed=99) if row["input"] not in seen][:8]
            assert len(held_out) == 8  # prompts it was not trained on
            answers = []
            for row in held_out:
                reply = client.chat.completions.create(
                    model="orders",
                    messages=[{"role": "user", "content": f"{INSTRUCTION}\n\n{row['input']}"}],
                    max_tokens=48,
                    temperature=0,
                )
                choice = reply.choices[0]
                answers.append((choice.finish_reason, choice.message.content, row["output"]))
            stopped = [a for a in answers if a[0] == "stop"]
            assert len(stopped) == len(answers), answers  # ended its turn with <|im_end|>, every time
            parsed = [json.loads(text or "null") for _, text, _ in answers]  # JSON and nothing after it
            assert all(isinstance(p, dict) and set(p) == {"name", "city", "qty"} for p in parsed), answers
            right = sum(
                p == json.loads(expected) for p, (_, _, expected) in zip(parsed, answers, strict=True)
            )
            assert right >= 6, answers
            base = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": f"{INSTRUCTION}\n\n{held_out[0]['input']}"}],
                max_tokens=48,
                temperature=0,
            )
            assert base.choices[0].message.content != answers[0][1]  # the adapter, not the base, answered
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(120)
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]  # uvicorn re-raises the signal it stopped on
    assert "Application shutdown complete" in log.read_text()
