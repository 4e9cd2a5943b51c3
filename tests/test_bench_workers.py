"""benchmarks/bench_workers.py: the projection prices the batches the search really asks, and the table says
whether the plans agreed."""

from bench_workers import makespan, markdown, project

from qra.compiler.compile import EFFORTS


def test_a_batch_takes_the_makespan_of_its_candidates_dealt_longest_first():
    assert makespan([3.0, 2.0, 2.0, 1.0], 2) == 4.0
    assert makespan([3.0, 2.0, 2.0, 1.0], 1) == 8.0
    assert makespan([5.0], 8) == 5.0


def test_the_projection_prices_every_evaluation_and_more_gpus_never_take_longer():
    projection = project(2000.0, 1000, 512, 4, (1, 2, 8))
    assert sum(projection["batch_sizes"]) == projection["evaluations"]
    assert projection["evaluations"] == EFFORTS["quick"].evaluations  # one population, at step 0
    hours = projection["hours"]
    assert hours[1] >= hours[2] >= hours[8] > 0
    assert projection["ladder_steps"] == [0, 100]  # quick effort caps the top rung of a 1000-step schedule


def test_the_table_says_when_the_plans_differ():
    plan = [{"bits": 4}]
    runs = {"in this process": {"seconds": 100.0, "plan": plan}, "1 Ray worker": {"seconds": 110.0, "plan": plan},
            "2 Ray workers": {"seconds": 60.0, "plan": [{"bits": 8}]}}
    projection = {"effort": "quick", "model": "m", "budget": "1MB", "schedule": "s", "tokens_per_second": 1.0,
                  "ladder_steps": [0, 1], "batch_sizes": [2], "final_runs": 6, "hours": {1: 2.0, 2: 1.0}}
    text = markdown(runs, [projection])
    assert "| 2 Ray workers | 1m00s | 0.60 | 0.55 |" in text and "NOT the same" in text
    assert "| quick | [0, 1] | [2] + 6 | 2 | 1.00 h | 2.00x |" in text
