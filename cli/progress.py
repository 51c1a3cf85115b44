"""Progress for long CLI jobs: one bar per long step, and the libraries kept quiet meanwhile.

``loraflow demo`` drives training, evaluation, serving and the flywheel in one
process. Each of those libraries (transformers, datasets, TRL, bitsandbytes,
vLLM's client side) prints its own bars and warnings; :func:`quiet_libraries`
turns them down for the duration, and :class:`Bars` draws ours instead. A step
reports through a plain ``(done, total)`` callable (:data:`Report`), so the
trainer and the evaluator need no rich or tqdm of their own to be followed.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

Report = Callable[[int, int], None]  # (done, total): a step's progress

# Loggers that speak at INFO (or warn about things a demo user cannot act on) while we work.
NOISY_LOGGERS = (
    "transformers",
    "datasets",
    "trl",
    "peft",
    "bitsandbytes",
    "accelerate",
    "httpx",
    "sentence_transformers",
    "presidio-analyzer",
    "loraflow.server.traffic",
    "loraflow.routing",
    "loraflow.replicas",
    "loraflow.gateway",
    "loraflow.supervisor",
    "uvicorn",
)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Library bars off and library logs at ERROR, put back as they were afterwards.

    Warnings are hidden only in here: a library's deprecation notice is noise in a demo, and
    still shows everywhere else."""
    saved_env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it for every bar it makes
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    restore: list[Callable[[], None]] = []
    try:
        import datasets

        datasets.disable_progress_bars()
        restore.append(datasets.enable_progress_bars)
    except ImportError:  # the train extra is not installed: nothing of it to quiet
        pass
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        restore += [lambda: hf_logging.set_verbosity(verbosity), hf_logging.enable_progress_bar]
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for undo in reversed(restore):
            undo()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if saved_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved_env


class Bars:
    """One rich bar per long step, on ``console``: a count when the step knows its total, else a
    spinner with the time elapsed. Off a terminal, each bar is printed once, when its step ends."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Report]:
        """A bar for one step; the yielded :data:`Report` moves it."""
        progress = Progress(
            SpinnerColumn(finished_text="[green]done[/]"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        task: TaskID = progress.add_task(description, total=total)

        def report(done: int, of: int) -> None:
            progress.update(task, completed=done, total=of)

        with progress:
            yield report
            finished = progress.tasks[0].total or progress.tasks[0].completed or 1
            progress.update(task, completed=finished, total=finished)
