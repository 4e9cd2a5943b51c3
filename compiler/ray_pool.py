"""Candidate runs on a Ray cluster: a local one started for the compile (`--workers N`), or one already
running (`--ray-address`).

Each worker is a Ray actor that builds the compile's evaluator once (model, data, quantization cache) and
then runs tasks: one GPU per worker where the cluster has GPUs, else an equal share of the CPUs (and as many
intra-op threads). Ray runs the candidates and nothing else: Ray Tune has no scikit-optimize searcher any
more, and the search keeps its own ask/tell (`qra.compiler.strategies`), so this is plain actors.

Scheduling: a batch's tasks go to idle workers as they free up, a promoted candidate preferably to the
worker that ran its lower rung (which keeps the run's checkpoint in memory; elsewhere the run restarts and
ends at the same score). Outcomes stream back as they finish. A task whose worker dies (killed, out of
memory) or runs out of GPU memory is retried once on another worker; if that fails too, it is returned as
failed with the reason, and the compile goes on. A dead worker is restarted by Ray.
"""

import logging
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from qra.compiler.pool import Evaluator, OnDone, Outcome, Task, run_task
from qra.errors import QraError

log = logging.getLogger(__name__)
ATTEMPTS = 2  # a task is run at most this often before it is recorded as failed
RESTARTS = 3  # times Ray restarts a worker that died
PROBE_INTERVAL_S = 0.5  # between readiness probes of a worker Ray is restarting
OBJECT_STORE_BYTES = 128 * 2**20  # a local cluster's shared memory: tasks and scores are a few KB


class Worker:
    """One Ray actor: the compile's evaluator, built once, running one task at a time."""

    def __init__(self, make_evaluator: Callable[[], Evaluator], threads: int) -> None:
        torch.set_num_threads(threads)
        self.evaluator = make_evaluator()
        if ray.get_gpu_ids():
            self.evaluator.model.to("cuda")

    def fingerprint(self) -> str | None:
        return getattr(self.evaluator, "fingerprint", None)

    def pid(self) -> int:
        return os.getpid()

    def run(self, task: Task) -> Outcome:
        try:
            return run_task(self.evaluator, task)
        except torch.OutOfMemoryError as error:
            return Outcome.failed_with(f"out of memory on the worker's GPU: {error}")


def _connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a local one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address is None:
            ray.init(object_store_memory=OBJECT_STORE_BYTES, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise QraError(f"could not start or join {where}: {error}") from None
    return True


class RayPool:
    """`workers` Ray actors (default: one per GPU of the cluster, else one), each building its evaluator
    with `make_evaluator`, which must have the compile's `fingerprint`."""

    def __init__(self, make_evaluator: Callable[[], Evaluator], workers: int | None = None, address: str | None = None,
                 fingerprint: str | None = None) -> None:
        self._started = _connect(address)
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1.0)
        count = workers or max(1, gpus)
        if gpus and count > gpus:
            log.warning("%d workers asked for, the cluster has %d GPUs: the others wait for a free one", count, gpus)
        share = cpus / count
        options = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": share}
        actor = ray.remote(max_restarts=RESTARTS, **options)(Worker)
        threads = max(1, math.floor(share))
        self.actors = [actor.remote(make_evaluator, threads) for _ in range(count)]
        self._ran: list[set[tuple[str, int | None]]] = [set() for _ in self.actors]
        self._gone: set[int] = set()
        log.info("%d Ray workers (%s each), loading the model", count, "1 GPU" if gpus else f"{share:g} CPUs, {threads} threads")
        try:
            fingerprints = ray.get([a.fingerprint.remote() for a in self.actors])
        except RayActorError as error:
            self.close()
            raise QraError(f"a Ray worker could not load the compile's model and data: {error}") from None
        if fingerprint is not None and any(f != fingerprint for f in fingerprints):
            self.close()
            raise QraError("a Ray worker's evaluator differs from this compile's (another version of qra, torch or "
                           "the model, or other data on that node): install the same set on every node")

    def run(self, tasks: Sequence[Task], on_done: OnDone | None = None) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        failed_on: dict[int, set[int]] = defaultdict(set)
        running: dict[ray.ObjectRef, tuple[int | None, int]] = {}  # position None: a restarted worker's readiness probe
        idle = [actor for actor in range(len(self.actors)) if actor not in self._gone]

        def finish(position: int, outcome: Outcome) -> None:
            outcomes[position] = outcome
            if on_done is not None:
                on_done(position, outcome)

        while queue or running:
            for actor in list(idle):
                position = self._pick(queue, actor, tasks, failed_on)
                if position is not None:
                    queue.remove(position)
                    idle.remove(actor)
                    running[self.actors[actor].run.remote(tasks[position])] = (position, actor)
            if not running:  # every worker is gone
                for position in list(queue):
                    finish(position, Outcome.failed_with("no Ray worker is left"))
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            position, actor = running.pop(ready[0])
            if position is None:
                self._probed(ready[0], actor, idle, running)
                continue
            outcome = self._outcome(ready[0], actor, tasks[position])
            if not outcome.failed:
                idle.append(actor)
                finish(position, outcome)
                continue
            running[self.actors[actor].pid.remote()] = (None, actor)  # back in service once Ray has restarted it
            failed_on[position].add(actor)
            if len(failed_on[position]) < ATTEMPTS:
                log.warning("worker %d failed on %s (%s): retrying on another worker", actor, tasks[position].config,
                            outcome.failure)
                queue.appendleft(position)
            else:
                log.warning("giving up on %s at fidelity %d: %s", tasks[position].config, tasks[position].fidelity,
                            outcome.failure)
                finish(position, outcome)
        return [outcome for outcome in outcomes if outcome is not None]

    def _probed(self, reference: ray.ObjectRef, actor: int, idle: list[int],
                running: dict[ray.ObjectRef, tuple[int | None, int]]) -> None:
        """A failed worker answered (idle again), is still restarting (ask again shortly), or is gone."""
        try:
            ray.get(reference)
        except ActorUnavailableError:
            time.sleep(PROBE_INTERVAL_S)
            running[self.actors[actor].pid.remote()] = (None, actor)
            return
        except RayActorError as error:
            log.warning("worker %d is gone (%s)", actor, str(error).splitlines()[0])
            self._gone.add(actor)
            return
        idle.append(actor)

    def _pick(self, queue: deque[int], actor: int, tasks: Sequence[Task], failed_on: dict[int, set[int]]) -> int | None:
        """The queued task `actor` should run next: one whose run it holds a checkpoint of, else the first;
        never one that already failed on it while another worker is left to try."""
        workers = len(self.actors) - len(self._gone)
        allowed = [p for p in queue if actor not in failed_on[p] or len(failed_on[p]) >= workers]
        held = [p for p in allowed if (str(tasks[p].config), tasks[p].seed) in self._ran[actor]]
        return (held or allowed or [None])[0]

    def _outcome(self, reference: ray.ObjectRef, actor: int, task: Task) -> Outcome:
        try:
            outcome = ray.get(reference)
        except RayActorError as error:
            self._ran[actor].clear()  # a restarted worker holds no checkpoints
            return Outcome.failed_with(f"worker died: {error}".splitlines()[0])
        self._ran[actor].add((str(task.config), task.seed))
        return outcome

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started:
            ray.shutdown()
