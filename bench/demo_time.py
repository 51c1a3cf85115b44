"""Benchmark: how long `loraflow demo` takes on SmolLM2-135M-Instruct (issue 25: <= 12 minutes here
after the install, on an idle machine), cold and with its trained adapters kept.

Runs the installed console script as a user does, in an empty folder with its own LORAFLOW_HOME:
first a cold run (nothing converted, nothing trained), then a second run in the same home. The
second run finds the converted model and, in `trainer.cache_dir` (the demo's `trained/` folder),
every adapter whose config, data and base are those of a run already trained, so it registers the
kept weights instead of training. It still serves, evaluates, sends the traffic and runs the
flywheel's evaluation. Each run's step times are read from the `demo.json` it writes beside
`demo.html`, and the load average before and after each run is kept: on a busy machine every
step is slower and the figures say so.

Writes bench/results/demo_time.json and demo_time.png.

    .venv/bin/python bench/demo_time.py [--runs 2] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import save  # noqa: E402

OUT = ROOT / "bench" / "results" / "demo_time.json"
LORAFLOW = Path(sys.executable).parent / "loraflow"
TARGET_S = 12 * 60


def one_run(folder: Path, *, tiny: bool, log: Path) -> dict[str, Any]:
    """One `loraflow demo` in ``folder`` (its home under it); its demo.json, wall time and load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")}
    env["LORAFLOW_HOME"] = str(folder / ".loraflow")
    before = os.getloadavg()
    started = time.monotonic()
    with log.open("w") as sink:
        done = subprocess.run(
            [str(LORAFLOW), "demo", *(["--tiny"] if tiny else [])],
            cwd=folder,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=False,
        )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"loraflow demo exited {done.returncode}; its output is in {log}")
    pages = sorted((folder / ".loraflow" / "demo").glob("*/demo.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(pages[-1].read_text())
    return summary | {"wall_s": round(wall, 1), "load_before": before, "load_after": os.getloadavg()}


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    steps = [s["step"] for s in runs[0]["steps"]]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(steps) + 1.6))
    height = 0.8 / len(runs)
    for i, run in enumerate(runs):
        seconds = {s["step"]: s["seconds"] for s in run["steps"]}
        ys = [j + i * height for j in range(len(steps))]
        ax.barh(
            ys,
            [seconds.get(s, 0.0) for s in steps],
            height=height,
            label=f"{run['label']}: {run['total_s']:.0f} s",
        )
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(steps))], steps)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(loc="lower right")
    ax.set_title(
        f"loraflow demo ({result['model']}), target {result['target_s']} s in all, on {result['machine']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="runs in one home: the first cold, then kept")
    parser.add_argument("--tiny", action="store_true", help="time `loraflow demo --tiny` instead")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()), help="each run's output")
    parser.add_argument(
        "--keep", type=Path, default=None, help="run in this empty folder and keep it (its registry, pages)"
    )
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        folder = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            if any(args.keep.iterdir()):
                raise SystemExit(f"--keep: {args.keep} is not empty")
            folder = args.keep
        for i in range(args.runs):
            label = "cold" if i == 0 else f"run {i + 1}, adapters kept"
            run = one_run(folder, tiny=args.tiny, log=args.logs / f"demo_time_run{i + 1}.log")
            runs.append(run | {"label": label})
            print(f"{label}: {run['total_s']:.0f} s ({run['wall_s']:.0f} s wall)", flush=True)
    totals = [r["total_s"] for r in runs]
    result = {
        "benchmark": "demo_time",
        "model": runs[0]["model"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "target_s": TARGET_S,
        "runs": runs,
        "met": {r["label"]: r["total_s"] <= TARGET_S for r in runs},
        "cold_s": totals[0],
        "kept_s": totals[1:] or None,
    }
    save(result, args.out, plot)
    print(json.dumps(result["met"]))


if __name__ == "__main__":
    main()
