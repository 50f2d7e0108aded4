"""The zoo's progress bar, counted in fine-tune steps: an ETA from the steps the workers have done.

Counted in finished fine-tunes, the bar of a zoo whose workers each run one pass of K fine-tunes (the quick
profile: 24 fine-tunes, 2 workers, 12 per pass) would sit at 0 until every fine-tune ends at once, with no
ETA at all. So each worker reports the steps of the fine-tunes it is running (`step_reporter`, at most every
REPORT_EVERY_S) to a `StepCounter`: a Ray actor on a cluster, read by the driver every POLL_S, or the bar
itself when the fine-tunes run in this process (workers: 0). A fine-tune that ends, done or failed, counts
all its steps. The class images are sampled before the bar starts (their own bar: zoo.build), so its rate
and ETA are the fine-tunes' alone.

On Ray the counter is a named actor (`progress_actor_name(root)`), made whether or not this build shows a bar:
a sweep runs its trials' zoo builds without bars, and its driver reads each running trial's counter by the
zoo's root (`read_progress`) to say how far the trial's zoo is.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

from tqdm.auto import tqdm

REPORT_EVERY_S = 2.0  # a worker's reports: often enough for the bar, rare enough to cost nothing
POLL_S = 1.0  # the driver's reads of the counter
# How often the bar is redrawn: on a terminal, as steps come; into a log (a Ray job's, a file), where every
# redraw is a line, every LOG_EVERY_S at most (and when the last fine-tune ends).
TERMINAL_EVERY_S, LOG_EVERY_S = 0.5, 30.0


class StepCounter:
    """Steps done per fine-tune (lora_id), as the workers report them (a Ray actor on a cluster), and the
    steps the build has to do (`start`), for readers that see only the counter (a sweep's driver)."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.started = time.time()

    def start(self, totals: Mapping[str, int]) -> None:
        """A build begins: its fine-tunes' steps to do (a reused actor forgets the previous build's)."""
        self.steps, self.totals, self.started = {}, dict(totals), time.time()

    def report(self, steps: Mapping[str, int]) -> None:
        self.steps.update(steps)

    def read(self) -> dict[str, int]:
        return dict(self.steps)

    def summary(self) -> dict[str, float]:
        """Steps done and to do over the build's fine-tunes, and seconds since it began."""
        done = sum(min(step, self.totals.get(lora_id, step)) for lora_id, step in self.steps.items())
        return {"done": done, "total": sum(self.totals.values()), "elapsed_s": time.time() - self.started}


def progress_actor_name(root: str) -> str:
    """The name of the step counter of the build of the zoo at `root` (a path or URI)."""
    return "loraleak-zoo-steps-" + hashlib.sha256(str(root).encode()).hexdigest()[:16]


def read_progress(root: str) -> dict[str, float] | None:
    """The counter's `summary` of the zoo build at `root` running on this Ray cluster (same namespace), or
    None when none runs (not started, finished, or building in its own process)."""
    import ray

    try:
        counter = ray.get_actor(progress_actor_name(root))
        return ray.get(counter.summary.remote(), timeout=10)
    except Exception:  # no such actor (ValueError), or it ended while asked
        return None


def describe_progress(summary: Mapping[str, float]) -> str:
    """One line, e.g. 'zoo 45% of 9,600 fine-tune steps, about 6 min left' (no estimate before the first steps)."""
    total, done, elapsed = summary["total"], summary["done"], summary["elapsed_s"]
    if total <= 0:
        return "zoo: starting"
    text = f"zoo {100 * done / total:.0f}% of {int(total):,} fine-tune steps"
    if done > 0 and done < total:
        text += f", about {max(1, round(elapsed * (total - done) / done / 60))} min left"
    return text


class StepBar:
    """The driver's bar over every pending fine-tune's steps, with done / failed / left in fine-tunes."""

    def __init__(self, totals: Mapping[str, int], show: bool) -> None:
        self.totals = dict(totals)  # lora_id -> its steps
        self.steps: dict[str, int] = {}
        self.counts = {"done": 0, "failed": 0}
        self.started = time.perf_counter()
        self.lock = threading.Lock()  # the poll thread and the loop over results both update it
        self.bar = tqdm(total=sum(self.totals.values()), desc="zoo", unit="step", disable=not show)
        self.every = TERMINAL_EVERY_S if sys.stderr.isatty() else LOG_EVERY_S
        self.shown = -math.inf

    def report(self, steps: Mapping[str, int]) -> None:
        """Steps reached by running fine-tunes (never backwards: a pass retried one by one starts again)."""
        with self.lock:
            for lora_id, step in steps.items():
                if lora_id in self.totals:
                    self.steps[lora_id] = min(max(step, self.steps.get(lora_id, 0)), self.totals[lora_id])
            self._show(force=False)

    def finished(self, lora_id: str, status: str) -> None:
        """A fine-tune ended (`status`: zoo.manifest's DONE or FAILED): all its steps count."""
        with self.lock:
            self.counts[status] += 1
            self.steps[lora_id] = self.totals.get(lora_id, 0)
            self._show(force=sum(self.counts.values()) == len(self.totals))

    def _show(self, force: bool) -> None:
        # n set, not update()d: tqdm then rates the average since the bar started (steps done / time), which
        # two workers reporting in turn would make jumpy as a moving average.
        self.bar.n = sum(self.steps.values())
        ended = sum(self.counts.values())
        per_minute = ended / max(time.perf_counter() - self.started, 1e-9) * 60
        now = time.monotonic()
        redraw = force or now - self.shown >= self.every
        if redraw:
            self.shown = now
        self.bar.set_postfix_str(f"fine-tunes {self.counts['done']} done, {self.counts['failed']} failed, "
                                 f"{len(self.totals) - ended} left, {per_minute:.1f}/min", refresh=redraw)

    def close(self) -> None:
        self.bar.close()


def step_reporter(counter: Any, lora_ids: Sequence[str]) -> Callable[[int], None] | None:
    """The `on_step` of a pass over `lora_ids` (loop.run_finetunes): their step, sent to `counter` (a Ray
    actor handle, a StepCounter or a StepBar) at most every REPORT_EVERY_S; None without a counter."""
    if counter is None:
        return None
    send = counter.report.remote if hasattr(counter.report, "remote") else counter.report
    last = [0.0]

    def on_step(step: int) -> None:
        now = time.monotonic()
        if now - last[0] >= REPORT_EVERY_S:
            last[0] = now
            send({lora_id: step for lora_id in lora_ids})

    return on_step


@contextmanager
def polled(counter: Any, bar: StepBar) -> Iterator[None]:
    """Read the Ray actor `counter` into `bar` every POLL_S in a thread while the block runs (the block
    waits on the workers' results); a counter that stops answering stops only the bar's step count."""
    import ray  # only a build on Ray workers has an actor to read

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_S):
            try:
                bar.report(ray.get(counter.read.remote(), timeout=30))
            except Exception:  # the actor died with the cluster: the build itself reports that
                return

    thread = threading.Thread(target=poll, name="zoo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
