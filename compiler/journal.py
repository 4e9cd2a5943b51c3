"""The journal: every evaluation is appended to disk as it completes, so an interrupted compile resumes.

The first line is a header, `{"journal": "qra-search", "key"}`: the key names everything a score depends on
besides the configuration (model, data, objective, priors, budget, search space, effort, strategy, seed),
so a journal written by another compile is refused before any of its scores is replayed. Then one JSON
object per evaluation, `{"index", "config", "fidelity", "score", "seconds", "stage"}`, flushed and fsync'ed
per record; a run whose worker died twice is recorded with `"score": null` and its `"failure"`. Resume is by replay (README, "The search": an interrupted compile resumes and reaches the same
plan as an uninterrupted one with the same seed): a search is deterministic given its seed and the scores
it is told, so a rerun asks for the same evaluations in the same order, and the k-th request is answered
from the k-th record instead of being evaluated again. A record counts once its newline is on disk; a last
line cut off mid-write (the process was killed) is dropped.
"""

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from qra.compiler.pool import OnDone, Outcome, Pool, Task
from qra.compiler.space import Config, config_key
from qra.errors import QraError

log = logging.getLogger(__name__)

KIND = "qra-search"


class Objective(Protocol):
    """What the search scores: held-out loss of `config` at `fidelity` (lower is better)."""

    def evaluate(self, config: Config, fidelity: int) -> float: ...


@dataclass(frozen=True)
class Record:
    index: int
    config: str
    fidelity: int
    score: float
    seconds: float
    stage: str
    failure: str = ""

    @property
    def outcome(self) -> Outcome:
        return Outcome(self.score, self.seconds, self.failure)


def _parse(path: Path, number: int, line: bytes) -> Record:
    """The evaluation record on line `number` of the file (line 1 is the header, so its index is number - 2)."""
    try:
        data = json.loads(line)
        record = Record(
            index=int(data["index"]), config=str(data["config"]), fidelity=int(data["fidelity"]),
            score=math.inf if data["score"] is None else float(data["score"]), seconds=float(data["seconds"]),
            stage=str(data["stage"]), failure=str(data.get("failure", "")),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise QraError(f"journal {path} line {number} is not an evaluation record ({error})") from None
    if record.index != number - 2:
        raise QraError(f"journal {path} line {number} has index {record.index}, expected {number - 2}")
    return record


def _header(key: str) -> bytes:
    return (json.dumps({"journal": KIND, "key": key}) + "\n").encode()


def _check_header(path: Path, line: bytes, key: str) -> None:
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("journal") != KIND:
        raise QraError(
            f"journal {path} has no header (it predates keyed journals, or is not a qra search journal): "
            "delete it and compile again", exit_code=2,
        )
    if header.get("key") != key:
        raise QraError(
            f"journal {path} was written by another compile (other model, data, objective, priors, budget, bits, "
            "ranks, granularity, effort, strategy or seed): delete it, or rerun with the original settings", exit_code=2,
        )


class Journal:
    """An append-only JSONL file of evaluations for the compile named by `key`; `records` are the complete
    ones already on disk."""

    def __init__(self, path: Path | str, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.records: list[Record] = []
        self._valid_bytes = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        *complete, tail = data.split(b"\n")
        if not complete:
            if data:
                log.warning("journal %s: its header was cut off mid-write, nothing was evaluated: starting it afresh", self.path)
            return
        _check_header(self.path, complete[0], self.key)
        self.records = [_parse(self.path, number, line) for number, line in enumerate(complete[1:], 2)]
        self._valid_bytes = len(data) - len(tail)
        if tail:
            log.warning("journal %s: ignoring a last record cut off mid-write (%d bytes)", self.path, len(tail))

    def append(self, config: Config, fidelity: int, score: float, seconds: float, stage: str, failure: str = "") -> Record:
        """Write one record and make it durable before returning."""
        record = Record(len(self.records), config_key(config), int(fidelity), float(score), float(seconds), stage, failure)
        fields = asdict(record)
        if failure:
            fields["score"] = None
        else:
            del fields["failure"]
        line = (json.dumps(fields) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._valid_bytes == 0:
            line = _header(self.key) + line
        with open(self.path, "ab") as handle:
            if handle.tell() > self._valid_bytes:
                handle.truncate(self._valid_bytes)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._valid_bytes += len(line)
        self.records.append(record)
        return record


class JournaledPool:
    """A pool whose tasks are answered from their journals where they can be: the k-th task sent to a
    journal is answered by its k-th record when there is one (it must ask for the same config at the same
    fidelity), and otherwise run on `pool` and appended, in the order asked, as soon as every earlier task
    of that journal has finished. `journal_for` names each task's journal (the search has one; the final
    comparison one per seed).

    `evaluated` and `replayed` count tasks per fidelity: run now, and answered from a journal."""

    def __init__(self, pool: Pool, journal_for: Callable[[Task], Journal]) -> None:
        self.pool = pool
        self.journal_for = journal_for
        self.evaluated: Counter[int] = Counter()
        self.replayed: Counter[int] = Counter()
        self._requests: Counter[Path] = Counter()

    def run(self, tasks: Sequence[Task], on_done: OnDone | None = None) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(tasks)
        pending: list[int] = []
        waiting: dict[Path, list[int]] = {}  # per journal, its tasks to run, in the order asked
        for position, task in enumerate(tasks):
            journal = self.journal_for(task)
            index = self._requests[journal.path]
            self._requests[journal.path] += 1
            if index < len(journal.records):
                outcomes[position] = self._replay(journal, journal.records[index], task)
                if on_done is not None:
                    on_done(position, outcomes[position])
            else:
                pending.append(position)
                waiting.setdefault(journal.path, []).append(position)

        def finished(slot: int, outcome: Outcome) -> None:
            position = pending[slot]
            outcomes[position] = outcome
            self.evaluated[tasks[position].fidelity] += 1
            journal = self.journal_for(tasks[position])
            queue = waiting[journal.path]
            while queue and outcomes[queue[0]] is not None:
                done = queue.pop(0)
                written = outcomes[done]
                journal.append(tasks[done].config, tasks[done].fidelity, written.score, written.seconds,
                               tasks[done].stage, written.failure)
            if on_done is not None:
                on_done(position, outcome)

        self.pool.run([tasks[position] for position in pending], finished)
        return [outcome for outcome in outcomes if outcome is not None]

    def _replay(self, journal: Journal, record: Record, task: Task) -> Outcome:
        key = config_key(task.config)
        if record.config != key or record.fidelity != task.fidelity:
            raise QraError(
                f"journal {journal.path} does not match this compile: evaluation {record.index} asks for "
                f"{key} at fidelity {task.fidelity}, the journal holds {record.config} at fidelity {record.fidelity} "
                "(it was written with other settings, seed or model; delete it or rerun with the original ones)",
                exit_code=2,
            )
        self.replayed[task.fidelity] += 1
        return record.outcome
