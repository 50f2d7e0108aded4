"""What a sweep says while a trial runs: how far its zoo build is.

A trial runs its whole study without bars (many trials may run at once, and Tune runs quiet), and a zoo
build is most of a trial's time (minutes to hours), so without this the sweep says nothing between a
trial's start and its end. `TrialWatch` reads, every `every_s`, the step counter of each running trial's
zoo build (a named Ray actor, loraleak.zoo.progress) and says one line when it moved:

    [running] rank=64 alpha=64: zoo 45% of 9,600 fine-tune steps, about 6 min left

The other stages are shorter and say their line when the trial ends (sweeps.run: `[i/n] ...`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..pipeline.stages import plan_stages
from ..zoo.progress import describe_progress, read_progress

WATCH_EVERY_S = 60.0  # one line a minute per running trial at most: a log, not a bar


def zoo_roots(trial) -> list[str]:
    """The zoo folders a trial may build: its zoo, and for a defended study the undefended one."""
    stages = plan_stages(trial.config)
    roots = [stages.zoo.folder]
    if stages.undefended is not None:
        roots.append(stages.undefended[0].folder)
    return [str(Path(root)) for root in roots]


class TrialWatch:
    """A thread saying each running trial's zoo progress (`start` / `stop`); `running` / `ended` are called
    as Tune starts and ends trials."""

    def __init__(self, trials: Sequence, say: Callable[[str], None], every_s: float = WATCH_EVERY_S,
                 read: Callable[[str], Mapping[str, float] | None] = read_progress) -> None:
        self.roots = {t.trial_id: zoo_roots(t) for t in trials}
        self.labels = {t.trial_id: t.label for t in trials}
        self.say, self.every_s, self.read = say, every_s, read
        self.active: set[str] = set()
        self.said: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    # Tune pickles its callbacks with the experiment's state, and the callback that tells this watch about trials
    # holds it: a pickled copy keeps the settings, not the lock or the thread (the live watch is the original).
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "stopping", "thread")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock, self.stopping, self.thread = threading.Lock(), threading.Event(), None

    def running(self, trial_id: str) -> None:
        with self.lock:
            self.active.add(trial_id)

    def ended(self, trial_id: str) -> None:
        with self.lock:
            self.active.discard(trial_id)

    def check(self) -> list[str]:
        """Say (and return) a line for each running trial whose zoo build moved since the last check."""
        with self.lock:
            active = sorted(self.active)
        lines = []
        for trial_id in active:
            for root in self.roots.get(trial_id, []):
                summary = self.read(root)
                if summary is None:
                    continue
                text = f"[running] {self.labels[trial_id]}: {describe_progress(summary)}"
                if self.said.get(root) != text:
                    self.said[root] = text
                    self.say(text)
                    lines.append(text)
        return lines

    def _loop(self) -> None:
        while not self.stopping.wait(self.every_s):
            try:
                self.check()
            except Exception:  # a progress line is never worth stopping a sweep for
                continue

    def start(self) -> "TrialWatch":
        self.thread = threading.Thread(target=self._loop, name="sweep-watch", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
