"""The learning-rate schedule: linear warmup, then linear, cosine or constant."""

from __future__ import annotations

import pytest

from peft_engine.schedule import lr_multiplier


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_warmup_rises_linearly_to_the_peak(kind):
    values = [lr_multiplier(step, kind=kind, warmup=4, total=20) for step in range(5)]
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_decay_shapes():
    def at(kind, step):
        return lr_multiplier(step, kind=kind, warmup=0, total=10)

    assert [at("constant", s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [at("linear", s) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    assert [at("cosine", s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert at("cosine", 2) > at("linear", 2)  # cosine stays high longer


def test_no_warmup_and_a_single_step_run():
    assert lr_multiplier(0, kind="cosine", warmup=0, total=1) == 1.0
