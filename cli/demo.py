"""`loraflow demo`: the whole loop on the embedded default (SQLite + a local artifact store), on CPU.

From nothing to a second, better production version, with no downloads:

1. build the tiny local Llama;
2. prepare a synthetic extraction dataset (order sentences -> name, city and qty as JSON);
3. train v1, evaluate it through vLLM against the prompted base, and promote it through the gate;
4. serve it (a supervised vLLM engine behind the gateway);
5. ask it with the official ``openai`` client, ``model=<adapter>``;
6. send traffic with PII in it (written redacted), correct the answers through ``/v1/feedback``,
   and compute drift for ordinary traffic and for a shifted slice;
7. run the flywheel: that traffic becomes a dataset, v2 is trained and evaluated against v1;
8. promote v2 through the gate: the running gateway serves it with no restart;
9. train a sabotaged candidate (answers shuffled) and watch the gate refuse it.

It ends with a summary table and writes one HTML page that links every report it made.
The demo's adapter gets its own gate policy and sampling rate (``gate.adapters.NAME``,
``traffic.adapters.NAME``); everything else comes from the settings as loaded.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
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
    from loraflow.registry.domain import VersionInfo
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings
    from loraflow.registry.traffic import Kind
    from loraflow.trainer.eval.run import OpenEndpoint

DEFAULT_NAME = "demo-orders"
STEPS = 9
PROBE = "Extract name, city and qty as JSON.\n\nOrder: 1 items for alice in paris."  # not sampled
EMAIL, PHONE = "jane.roe@example.org", "+1 415 555 0134"
# The demo adapter's gate: token F1 as the primary metric (partial credit for partly right fields),
# mostly valid JSON, and a regression allowance for the tiny model: its weights are random, so
# the general suite only scores the odd word its noise happens to contain (the base matched 1 of
# 32 items there, a "drop" of 0.031 once the adapter answers JSON). Everything else is the
# default policy.
GATE = {"primary_metric": "token_f1", "min_json_valid": 0.9, "max_regression_drop": 0.1}
# Shifted traffic: the same task, written as long e-mails instead of one-line orders.
SHIFTED = (
    "Hello team, hope the week is going well. Following our call this morning, {name} from the "
    "{city} office asked me to place an order for {qty} items before the end of the quarter. "
    f"Could you process it and send the confirmation? Thanks a lot. Jane Roe, {EMAIL}, {PHONE}"
)


def header(n: int, text: str) -> None:
    out.print(f"[bold][{n}/{STEPS}][/] {escape(text)}")


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
) -> None:
    """Train, evaluate, serve, sample traffic, run the flywheel and gate promotions, on a tiny local model.

    Example: loraflow demo
    """
    import openai

    from loraflow.registry.service import Registry

    app = state(ctx)
    settings = app.get_settings()
    name = name or _free_name(app.registry)
    registry = Registry.open(demo_settings(settings, name))  # the demo adapter's gate and sampling
    try:
        with quiet_libraries():
            try:
                Demo(registry, name, (workdir or settings.home / "demo").resolve()).run()
            except openai.APIError as exc:  # the gateway answered an error the demo did not expect
                raise EngineUnavailableError(f"the demo's gateway answered an error: {exc}") from exc
    finally:
        registry.close()


def _free_name(registry: Registry) -> str:
    taken = {a.name for a in registry.adapters()}
    return next(
        n for n in (DEFAULT_NAME, *(f"{DEFAULT_NAME}-{i}" for i in range(2, 10_000))) if n not in taken
    )


def demo_settings(settings: Settings, name: str) -> Settings:
    """The loaded settings, with the demo adapter's own gate policy and sampling, and what the
    tiny model needs: rank-16 adapters, a fast routing poll, and every request sampled."""
    gate = settings.gate.model_copy(update={"adapters": {**settings.gate.adapters, name: GATE}})
    traffic = settings.traffic.model_copy(
        update={"adapters": {**settings.traffic.adapters, name: 1.0}, "flush_interval_s": 0.2}
    )
    server = settings.server.model_copy(update={"max_lora_rank": 16, "poll_interval_s": 0.1})
    evaluation = settings.eval.model_copy(update={"max_tokens": 48})
    # The candidate: trained on the corrected traffic plus most of v1's data again, for longer.
    flywheel = settings.flywheel.model_copy(
        update={"replay_share": 0.85, "train": {"epochs": 30, **settings.flywheel.train}}
    )
    return settings.model_copy(
        update={"gate": gate, "traffic": traffic, "server": server, "eval": evaluation, "flywheel": flywheel}
    )


class Demo:
    def __init__(self, registry: Registry, name: str, work: Path) -> None:
        self.registry = registry
        self.settings = registry.settings
        self.name = name
        self.work = work / name
        self.base = work / "tiny-llama"
        self.bars = Bars(out)
        self.summary = Summary()

    def run(self) -> None:
        from loraflow.server.app import build_app
        from loraflow.server.embedded import serve_in_thread
        from loraflow.server.engine.supervisor import free_port
        from loraflow.trainer.embed import Embedder

        self.embedder = Embedder()
        self.build_base()
        dataset = self.prepare_dataset()
        header(
            3,
            f"train {self.name} v1 (a first, quick version), evaluate it against the prompted base, gate it",
        )
        v1 = self.train(dataset.ref, epochs=8, label="v1")
        app = build_app(
            self.settings,
            registry=self.registry,
            base_model=str(self.base),
            model_name="tiny-llama",
            log_file=self.settings.home / "logs" / "demo-engine.log",
        )
        with ExitStack() as stack:
            with self.bars.step("start vLLM and the gateway"):
                timeout = self.settings.server.engine_start_timeout_s
                self.url = stack.enter_context(serve_in_thread(app, free_port(), timeout_s=timeout))
            self.app = app
            self.evaluate_and_promote(v1, dataset.ref)
            self.serve()
            self.ask()
            self.traffic()
            v2 = self.flywheel()
            self.promote_v2(v2)
            self.sabotage(v2)
        self.finish()

    # -- 1-2 -----------------------------------------------------------------------
    def build_base(self) -> None:
        from loraflow.trainer.tiny import build_tiny_model

        header(1, f"tiny Llama base model in {self.base}")
        if not (self.base / "config.json").is_file():
            with self.bars.step("build the tiny Llama"):
                build_tiny_model(self.base, overwrite=True)  # a run cut short left files
        self.summary.done("base model", "tiny Llama, built locally")

    def prepare_dataset(self) -> Any:
        from loraflow.trainer.data import validate_for_base
        from loraflow.trainer.prepare import prepare
        from loraflow.trainer.synthetic import make_rows, write_jsonl

        header(2, "dataset: extract name, city and qty from an order sentence, as JSON (400 rows)")
        data = write_jsonl(self.work / "orders.jsonl", make_rows(400, seed=0))
        with self.bars.step("validate, deduplicate, split, profile"):
            checked = validate_for_base(data, str(self.base), max_length=self.settings.trainer.max_length)
            dataset, report = prepare(checked, name=self.name, registry=self.registry, embedder=self.embedder)
        counts = " / ".join(f"{n} {split}" for split, n in dataset.counts.items())
        say(
            f"{dataset.ref}: {counts}; dropped {report['exact_duplicates_dropped']} exact and "
            f"{report['near_duplicates_dropped']} near duplicates"
        )
        self.summary.done("dataset", f"{dataset.ref}: {counts}")
        return dataset

    # -- 3 ---------------------------------------------------------------------------
    def train(self, ref: str, *, epochs: int, label: str) -> VersionInfo:
        from loraflow.trainer.config import TrainConfig
        from loraflow.trainer.train import train

        config = TrainConfig(
            adapter=self.name,
            base=str(self.base),
            data=ref,
            r=16,
            alpha=32,
            learning_rate=3e-3,
            epochs=epochs,
            batch_size=16,
            dropout=0.0,
            eval_steps=25,
            eval_generations=0,
            task="extract order fields as JSON",
            output_dir=self.work / "runs" / label,
        )
        with self.bars.step(f"train on {ref}, {epochs} epochs") as report:
            run = train(config, registry=self.registry, settings=self.settings, progress=report)
        m = run.metrics
        say(
            f"{run.version.ref}: eval_loss {m['eval_loss']} (base {m['base_eval_loss']}), "
            f"{m['steps']} steps in {m['wall_time_s']} s"
        )
        return run.version

    def _our_gateway(self) -> OpenEndpoint:
        """Evaluations go through the gateway the demo runs (rather than a gateway and engine of
        their own, another vLLM start)."""
        from loraflow.trainer.eval.run import Endpoint

        return lambda _base: nullcontext(Endpoint(self.url, info={"gateway": self.url}))

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
            say(
                f"{system['label']:<34} {primary} {metrics[primary]['mean']:.3f}   "
                f"valid JSON {metrics['json_valid']['mean']:.2f}" + ("" if key != "candidate" else "  <-")
            )
        version = report["version"]
        decision = self.registry.gate(self.name, version)
        html = write_html(report, self.work / f"eval-v{version}.html", gate=decision.to_json())
        self.summary.links.append((f"eval report of {report['candidate']}", html))

    def evaluate_and_promote(self, v1: VersionInfo, dataset: str) -> None:
        self.evaluate(v1, dataset)
        outcome = self._promote(v1)
        self.summary.done("train + evaluate + gate v1", outcome)

    def _promote(self, version: VersionInfo) -> str:
        """Promote through the gate; a refusal is shown, and production is left as it is."""
        decision = self.registry.gate(self.name, version.version)
        say(decision.message())
        try:
            self.registry.promote(self.name, version.version)
        except GateRefusedError as exc:
            say(f"adapters promote {self.name} v{version.version}: refused: {exc.message}")
            return f"{version.ref}: refused by the gate"
        say(f"adapters promote {self.name} v{version.version}: passed the gate; production -> {version.ref}")
        return f"{version.ref}: passed the gate, promoted"

    # -- 4-5 -------------------------------------------------------------------------
    def serve(self) -> None:
        from openai import OpenAI

        header(4, "serving: vLLM (multi-LoRA) behind the OpenAI-compatible gateway")
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
            extra_headers={self.settings.traffic.opt_out_header: "1"} if text == PROBE else None,
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
                if self.chat(PROBE)[0] == version.ref:
                    break
            except openai.NotFoundError:  # the alias is not in the gateway's routing table yet
                pass
            if time.monotonic() - started > timeout_s:
                raise UnavailableError(f"the gateway did not serve {version.ref} within {timeout_s:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def ask(self) -> None:
        from loraflow.trainer.synthetic import INSTRUCTION, make_rows

        header(5, f"ask it with the official openai client: model={self.name!r}")
        self.wait_served(self.registry.resolve(parse_ref(self.name, param="name")))
        for row in make_rows(3, seed=7):
            served, answer, _ = self.chat(f"{INSTRUCTION}\n\n{row['input']}")
            say(f"{row['input']!r} -> {served}: {answer}")
        self.summary.done("openai client", f"served by {served}")

    # -- 6 ---------------------------------------------------------------------------
    def traffic(self) -> None:
        import httpx

        from loraflow.trainer.synthetic import INSTRUCTION, make_rows

        header(6, "traffic: every request sampled, PII redacted before it is written; feedback; drift")
        rows = make_rows(60, seed=101)
        started = datetime.now(UTC)
        replies = self._send([f"{INSTRUCTION}\n\n{r['input']}" for r in rows], "60 orders from users")
        corrected = 0
        with (
            httpx.Client(base_url=self.url, timeout=60) as http,
            self.bars.step("feedback from a reviewer", len(rows)) as report,
        ):
            for i, ((_, answer, request_id), row) in enumerate(zip(replies, rows, strict=True)):
                right = _same_json(answer, str(row["output"]))
                body: dict[str, Any] = {"request_id": request_id, "rating": 1 if right else -1}
                if not right:
                    body["correction"] = row["output"]
                    corrected += 1
                http.post("/v1/feedback", json=body).raise_for_status()
                report(i + 1, len(rows))
        say(f"{len(rows) - corrected} answers rated +1; {corrected} rated -1 and corrected (/v1/feedback)")
        ordinary_until = datetime.now(UTC)
        shifted_rows = make_rows(60, seed=202)
        self._send(
            [f"{INSTRUCTION}\n\n" + SHIFTED.format(**json.loads(str(r["output"]))) for r in shifted_rows],
            "60 long e-mails, signed",
        )
        self._wait_written("feedback", len(rows), since=started)
        self._show_redacted(self._wait_written("requests", len(rows) + len(shifted_rows), since=started))
        ordinary = self._drift(started, ordinary_until)
        shifted = self._drift(ordinary_until, datetime.now(UTC), html=self.work / "drift-shifted.html")
        self._show_drift({"ordinary orders": ordinary, "e-mails (shifted)": shifted})
        self.summary.done(
            "traffic + feedback + drift",
            f"{len(rows) + len(shifted_rows)} requests sampled and redacted, {corrected} corrected; "
            f"drift: {ordinary['verdict']} for orders, {shifted['verdict']} for the e-mails",
        )

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
        from loraflow.trainer.reports.drift_page import write_html

        with self.bars.step("drift against the training data"):
            version, report = drift_report(
                self.registry,
                self.settings.drift,
                self.name,
                window=until - since,
                now=until,
                embedder=self.embedder,
            )
            self.registry.record_drift(
                version.adapter, version.version, window_start=since, window_end=until, report=report
            )
        if html is not None:
            self.summary.links.append(("drift report of the shifted slice", write_html(report, html)))
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

    # -- 7-9 -------------------------------------------------------------------------
    def flywheel(self) -> VersionInfo:
        from loraflow.trainer.flywheel.cycle import run as run_cycle

        header(7, "flywheel: the corrected traffic becomes a dataset; v2 is trained and evaluated against v1")
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
        self.summary.done(
            "flywheel", f"{cycle.candidate.ref} trained on {cycle.candidate.dataset} (from the traffic)"
        )
        return cycle.candidate

    def promote_v2(self, v2: VersionInfo) -> None:
        from loraflow.trainer.synthetic import INSTRUCTION

        header(8, f"promote {v2.ref} through the gate, under the running gateway")
        question = f"{INSTRUCTION}\n\nOrder: 4 items for grace in oslo."
        before = self.chat(question)
        outcome = self._promote(v2)
        if self.registry.get(self.name).aliases.get("production") == v2.version:
            swap = self.wait_served(v2)
            after = self.chat(question)
            say(f"before: {before[0]}: {before[1]}")
            say(f"after:  {after[0]}: {after[1]}")
            say(f"the same client was served {v2.ref} {swap:.2f} s after the promote, with no restart")
            outcome += f"; served {swap:.2f} s later, no restart"
        self.summary.done("promote v2", outcome)

    def sabotage(self, v2: VersionInfo) -> None:
        from loraflow.trainer.data import validate_file
        from loraflow.trainer.prepare import load_split, prepare
        from loraflow.trainer.synthetic import write_jsonl

        header(9, "a sabotaged candidate: the same prompts, each with another's answer")
        dataset = v2.dataset or ""
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
        v3 = self.train(bad.ref, epochs=4, label="sabotaged")
        self.evaluate(v3, dataset)  # on production's own sealed test split, not its poisoned one
        outcome = self._promote(v3)
        say(f"production stays {self.registry.resolve(parse_ref(self.name)).ref}")
        self.summary.done("sabotaged candidate", outcome)

    # -- the end ---------------------------------------------------------------------
    def finish(self) -> None:

        out.print(self.summary.table())
        page = write_demo_report(self.work / "demo.html", name=self.name, summary=self.summary)
        say(f"report: {page}")
        say(f"next: adapters show {self.name}   adapters history {self.name}   loraflow drift {self.name}")


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
