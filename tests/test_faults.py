"""Issue 17's faults, each once, on one fault stack (tests/fault_stack.py): real
PostgreSQL, Redis and S3 servers, real `tuneq worker` and `tuneq beat` processes, faults
made by killing processes, restarting servers, TCP proxies that reset connections, and the
hooks of tuneq/faults.py. Each run's lease writes also go through the history checker.

The scenarios live in tests/fault_scenarios.py (bench/faults.py runs them many times);
their order here lets each reuse the workers the one before left running.
"""

from __future__ import annotations

import random

import pytest

from tests.fault_scenarios import SCENARIOS
from tests.fault_stack import fault_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, tiny_registry_file):
    with fault_stack(tmp_path_factory.mktemp("faults"), tiny_registry_file) as stack:
        yield stack


def run(faulty, fault):
    name, scenario = SCENARIOS[fault]
    result = scenario(faulty, random.Random(fault))
    assert result.expected, (name, result.notes, faulty.logs_tail())
    assert result.lost == 0 and result.duplicates == 0, result


def test_max_runtime_reached(faulty):
    run(faulty, 12)


def test_disk_full_at_a_checkpoint(faulty):
    run(faulty, 14)


def test_object_store_failing(faulty):
    run(faulty, 9)


def test_api_killed_between_commit_and_publish(faulty):
    run(faulty, 7)


def test_redis_restarted_and_flushed(faulty):
    run(faulty, 4)


def test_cancel_queued_running_and_cut_off(faulty):
    run(faulty, 11)


def test_relay_publishing_twice(faulty):
    run(faulty, 8)


def test_worker_killed_mid_training(faulty):
    run(faulty, 1)


def test_worker_cut_off_from_the_database(faulty):
    run(faulty, 5)


def test_rolling_deploy(faulty):
    run(faulty, 10)


def test_poison_job(faulty):
    run(faulty, 3)


def test_database_restarted(faulty):
    run(faulty, 6)


def test_task_longer_than_the_visibility_timeout(faulty):
    run(faulty, 2)


def test_two_reapers_and_skewed_clocks(faulty):
    run(faulty, 13)
