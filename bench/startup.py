"""Benchmark: how long the command line takes to start (issue: `loraflow --help` <= 0.5 s and
`adapters list` <= 1 s, median of 5 on an idle machine).

Runs the shipped entry point as a user does, each command a fresh process: `loraflow --help`,
and `loraflow adapters list` (table and ``--json``) on a SQLite registry with a few random
adapters, the tiny Llama as their base. ``python -c pass`` is the floor: the interpreter and
site-packages alone. Commands are interleaved round by round after one warm-up round (which
writes the bytecode caches), so a machine that gets busier mid-run slows all of them alike.

Each run records wall time and the CPU time (user + system) of the child, from
``getrusage(RUSAGE_CHILDREN)``. Wall time is what a user waits for; on a shared machine it
mostly measures the other processes, while CPU time barely moves with load, so both are kept,
with the load average before and after. One extra run of each command under
``python -X importtime`` lists the imports that cost most (cumulative, top-level only).

``--baseline REV`` also measures the code of an earlier commit, in the same rounds: its cli/,
registry/, server/ and trainer/ are checked out into a temporary git worktree and put first on
PYTHONPATH, ahead of the editable install (the registry's schema must be one that code knows).
Writes bench/results/startup.json and startup.png.

    .venv/bin/python bench/startup.py [--runs 5] [--adapters 3] [--baseline 1cb9d49]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import save, tiny_registry  # noqa: E402

OUT = ROOT / "bench" / "results" / "startup.json"
LORAFLOW = Path(sys.executable).parent / "loraflow"
TARGETS_S = {"help": 0.5, "adapters_list": 1.0}
COMMANDS: dict[str, list[str]] = {
    "python_floor": [sys.executable, "-c", "pass"],
    "help": [sys.executable, str(LORAFLOW), "--help"],
    "adapters_list": [sys.executable, str(LORAFLOW), "adapters", "list"],
    "adapters_list_json": [sys.executable, str(LORAFLOW), "adapters", "list", "--json"],
}


def run_once(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall and child CPU seconds of one run; a failed run stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def top_imports(cmd: list[str], env: dict[str, str], cwd: Path, n: int = 8) -> list[dict[str, Any]]:
    """The top-level imports of one run that cost most, by cumulative import time."""
    done = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]], env=env, cwd=cwd, capture_output=True, text=True
    )
    rows: list[dict[str, Any]] = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        if name.startswith("  "):  # imported by another import: counted in its parent's total
            continue
        rows.append({"module": name.strip(), "cumulative_ms": round(int(parts[1]) / 1000, 1)})
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:n]


@contextlib.contextmanager
def baseline_tree(rev: str, root: Path) -> Iterator[Path]:
    """A folder to put first on PYTHONPATH that imports ``loraflow`` from commit ``rev``."""
    tree = root / "baseline-tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    try:
        pkg = root / "baseline-path" / "loraflow"
        pkg.mkdir(parents=True)
        for part in ("cli", "registry", "server", "trainer"):
            (pkg / part).symlink_to(tree / part)
        yield pkg.parent
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True
        )


def summary(walls: list[float], cpus: list[float]) -> dict[str, Any]:
    return {
        "wall_median_s": round(statistics.median(walls), 3),
        "wall_min_s": round(min(walls), 3),
        "wall_max_s": round(max(walls), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
        "cpu_min_s": round(min(cpus), 3),
        "cpu_max_s": round(max(cpus), 3),
        "wall_s": [round(w, 3) for w in walls],
        "cpu_s": [round(c, 3) for c in cpus],
    }


def measure(
    variants: dict[str, dict[str, str]], cwd: Path, runs: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """{variant: {command: summary}}; round by round, every variant and command in turn."""
    samples: dict[tuple[str, str], tuple[list[float], list[float]]] = {
        (v, c): ([], []) for v in variants for c in COMMANDS
    }
    for round_ in range(runs + 1):
        for variant, env in variants.items():
            for command, cmd in COMMANDS.items():
                wall, cpu = run_once(cmd, env, cwd)
                if round_ > 0:  # round 0 warms the bytecode and page caches
                    samples[(variant, command)][0].append(wall)
                    samples[(variant, command)][1].append(cpu)
        if round_ > 0:
            print(f"round {round_}/{runs}", flush=True)
    return {v: {c: summary(*samples[(v, c)]) for c in COMMANDS} for v in variants}


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["runs"])
    commands = list(COMMANDS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    height = 0.8 / len(variants)
    colors = {"current": "tab:blue", "baseline": "tab:gray"}
    for ax, key, label in ((axes[0], "wall", "wall time, s"), (axes[1], "cpu", "CPU time (user + sys), s")):
        for i, variant in enumerate(variants):
            cells = [result["runs"][variant][c] for c in commands]
            med = [c[f"{key}_median_s"] for c in cells]
            err = [
                [m - c[f"{key}_min_s"] for m, c in zip(med, cells, strict=True)],
                [c[f"{key}_max_s"] - m for m, c in zip(med, cells, strict=True)],
            ]
            ys = [j + i * height for j in range(len(commands))]
            name = variant if variant == "current" else f"baseline {result.get('baseline_rev', '')}"
            ax.barh(ys, med, height=height, xerr=err, color=colors.get(variant, "tab:orange"), label=name)
        for command, target in TARGETS_S.items():
            j = commands.index(command)
            ax.plot([target, target], [j - 0.4, j + 0.8], color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlabel(label + " (median, min-max; red: target)")
    axes[0].set_yticks([j + 0.4 - height / 2 for j in range(len(commands))], commands)
    axes[0].invert_yaxis()
    if len(variants) > 1:
        axes[1].legend(loc="lower right", fontsize=8)
    load = result["load_average_1min"]
    fig.suptitle(
        f"loraflow start-up, median of {result['runs_per_command']}, {result['machine']}; "
        f"load {load['before']:.1f} -> {load['after']:.1f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="also measure this earlier commit")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the last JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        names = [f"startup-{i}" for i in range(args.adapters)]
        _, env, _ = tiny_registry(root, names)
        env = {**env, "LORAFLOW_HOME": str(root / "client")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # the warm-up round writes the bytecode caches
        variants = {"current": env}
        if args.baseline:
            path = stack.enter_context(baseline_tree(args.baseline, root))
            variants["baseline"] = {**env, "PYTHONPATH": str(path)}
        cwd = root / "work"
        cwd.mkdir()
        listed = subprocess.run(
            COMMANDS["adapters_list_json"], env=env, cwd=cwd, capture_output=True, text=True
        )
        assert len(json.loads(listed.stdout)) == args.adapters, listed.stdout + listed.stderr
        load_before = os.getloadavg()[0]
        runs = measure(variants, cwd, args.runs)
        load_after = os.getloadavg()[0]
        imports = {
            v: {c: top_imports(COMMANDS[c], e, cwd) for c in ("help", "adapters_list")}
            for v, e in variants.items()
        }

    current = runs["current"]
    verdicts = {
        command: {
            "value_s": current[command]["wall_median_s"],
            "cpu_s": current[command]["cpu_median_s"],
            "target": f"<= {target} s (median wall time of {args.runs}, idle machine)",
            "met": current[command]["wall_median_s"] <= target,
        }
        for command, target in TARGETS_S.items()
    }
    result: dict[str, Any] = {
        "what": "start-up of the loraflow command line: each command a fresh process of the entry point",
        "registry": f"SQLite, {args.adapters} adapters (random LoRA on the tiny Llama), one version each",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs_per_command": args.runs,
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "verdicts": verdicts,
        "runs": runs,
        "top_imports": imports,
    }
    if args.baseline:
        result["baseline_rev"] = args.baseline
    save(result, args.out, plot)
    print(json.dumps({"verdicts": verdicts, "load_average_1min": result["load_average_1min"]}, indent=2))


if __name__ == "__main__":
    main()
