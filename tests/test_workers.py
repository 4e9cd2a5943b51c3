"""Candidate runs on a real local Ray cluster with 2 workers (no mock of Ray): the same plan as in-process,
a worker killed mid-candidate has its candidate retried, a candidate that kills every worker it runs on is
journaled as failed and the search goes on."""

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from qra.compiler.compile import build_evaluator, compile_plan  # noqa: E402
from qra.compiler.importance import flat_importance  # noqa: E402
from qra.compiler.journal import Journal  # noqa: E402
from qra.compiler.pool import InProcessPool, Task  # noqa: E402
from qra.compiler.ray_pool import RayPool  # noqa: E402
from qra.compiler.strategies import Problem, RandomSearch, run_search  # noqa: E402
from test_compile import TRAINING, request  # noqa: E402
from qra.testing import save_tiny_model, tiny_corpus  # noqa: E402

TESTS = str(Path(__file__).parent)
LONG = TRAINING.model_copy(update={"steps": 120})  # a run of seconds, long enough to be killed in the middle of


class CrashOn:
    """The compile's evaluator, except that running `config` ends the worker's process, as the kernel's
    out-of-memory killer would."""

    def __init__(self, build, config) -> None:
        self.evaluator, self.config = build(), config
        self.fingerprint = self.evaluator.fingerprint
        self.model = self.evaluator.model

    def evaluate(self, config, fidelity, seed=None):
        if config == self.config:
            os._exit(9)
        return self.evaluator.evaluate(config, fidelity, seed)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny model `test_compile` compiles, with its corpus beside it."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_corpus(folder / "corpus.jsonl")
    return save_tiny_model(folder / "model", "llama", layers=2)


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 CPUs for the module (the pools join it); workers import the tests' modules."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS, "RAY_USAGE_STATS_ENABLED": "0"}})
    yield
    ray.shutdown()


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def alone(tiny_folder, tmp_path_factory):
    """The in-process compile the workers' compiles are compared with."""
    return compile_plan(request(tiny_folder, tmp_path_factory.mktemp("alone")))


def test_two_workers_reach_the_same_plan_as_the_in_process_compile(cluster, alone, tiny_folder, tmp_path):
    shared = compile_plan(request(tiny_folder, tmp_path / "shared", workers=2))
    assert shared.plan.layers == alone.plan.layers
    asked = lambda outcome: [(e.config, e.fidelity) for e in outcome.result.history]  # noqa: E731
    assert asked(shared) == asked(alone)  # the search asked the same candidates in the same order
    # the same runs; a CPU sums matrix products in an order that depends on its thread count (workers: 1 each)
    for mine, theirs in zip(shared.result.history, alone.result.history):
        assert mine.score == pytest.approx(theirs.score, abs=1e-3)
    assert [s.config for s in shared.plan.provenance.finalists] == [s.config for s in alone.plan.provenance.finalists]


def test_a_compile_killed_while_workers_are_busy_resumes_to_the_same_plan(cluster, alone, tiny_folder, tmp_path):
    def kill(evaluation):
        if evaluation.index == 5:  # a result streaming back while the other worker is busy
            raise Killed

    with pytest.raises(Killed):
        compile_plan(request(tiny_folder, tmp_path, workers=2), on_progress=kill)
    resumed = compile_plan(request(tiny_folder, tmp_path, workers=2, resume=True))
    assert resumed.plan.layers == alone.plan.layers and resumed.result.replayed >= 1


def test_a_worker_killed_mid_candidate_has_its_candidate_retried_on_another(cluster, tiny_folder, tmp_path, caplog):
    long = request(tiny_folder, tmp_path, training=LONG)
    evaluator = build_evaluator(long)
    tasks = [Task(evaluator.space.uniform(bits, 4), evaluator.ladder.levels - 1) for bits in (2, 8)]
    pool = RayPool(lambda: build_evaluator(long), workers=2, fingerprint=evaluator.fingerprint)
    victim = ray.get(pool.actors[0].pid.remote())
    killer = threading.Timer(0.6, os.kill, (victim, signal.SIGKILL))
    try:
        with caplog.at_level(logging.WARNING, logger="qra.compiler.ray_pool"):
            killer.start()
            started = time.perf_counter()
            outcomes = pool.run(tasks)
    finally:
        killer.cancel()
        pool.close()
    assert time.perf_counter() - started > 0.6  # the kill came while the first candidates were running
    assert "retrying on another worker" in caplog.text
    assert not any(outcome.failed for outcome in outcomes)
    expected = InProcessPool(evaluator).run(tasks)
    assert [o.score for o in outcomes] == pytest.approx([o.score for o in expected], abs=1e-3)


def test_a_candidate_that_kills_every_worker_is_journaled_as_failed_and_the_search_goes_on(cluster, tiny_folder, tmp_path):
    compile_request = request(tiny_folder, tmp_path)
    evaluator = build_evaluator(compile_request)
    space = evaluator.space
    problem = Problem(space, flat_importance(len(space.units), space.bits, space.ranks), compile_request.budget.bytes,
                      fidelities=tuple(range(evaluator.ladder.levels)))  # random search needs no priors
    first = run_search(RandomSearch(problem, 0), evaluator, 4)
    doomed = first.history[1].config
    build = lambda: CrashOn(lambda: build_evaluator(compile_request), doomed)  # noqa: E731
    pool = RayPool(build, workers=2)
    journal = tmp_path / "search.jsonl"
    try:
        result = run_search(RandomSearch(problem, 0), None, 4, journal=Journal(journal, "k"), pool=pool)
    finally:
        pool.close()
    failed = [e for e in result.history if e.failure]
    assert [e.config for e in failed] == [doomed] and "worker died" in failed[0].failure
    assert [e.config for e in result.history] == [e.config for e in first.history]  # it went on as before
    assert result.best_config != doomed
    assert '"score": null' in journal.read_text().splitlines()[2]
    replayed = run_search(RandomSearch(problem, 0), evaluator, 4, journal=Journal(journal, "k"))
    assert replayed.replayed == len(first.history) and replayed.history[1].failure == failed[0].failure
    assert replayed.best_config == result.best_config
