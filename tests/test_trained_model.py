"""`peft_engine.generate.TrainedModel`: a job's output answering, as a worker loads it.

A worker loads outputs on its resident base model (the tensors shared where the method
freezes the base): the answers must be those of the output loaded alone, and answering must
leave the resident weights as they were, whatever the method's weights format (a PEFT
adapter, trained tensors by name, a method's own modules). An input over the limit is
refused naming its field, never cut.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_engine import DataPaths, train
from peft_engine.errors import UserError
from peft_engine.generate import TrainedModel
from peft_engine.models import load_registry
from peft_engine.models.resident import ResidentModels
from tests.conftest import (
    build_tiny_bert,
    build_tiny_llama,
    chat,
    local_model,
    write_jsonl,
    write_registry,
)

QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(16)]
REVIEWS = [
    {"text": f"the {noun} was {word}", "label": label}
    for noun in ("film", "movie", "plot")
    for word, label in {"great": "pos", "good": "pos", "awful": "neg", "bad": "neg"}.items()
]
SENTENCES = [
    {"tokens": [p, "visited", c], "tags": ["B-PER", "O", "B-LOC"]}
    for p in ("alice", "bob", "carol", "dave")
    for c in ("paris", "rome", "oslo")
]
QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]
# (method, task): a PEFT adapter on a shared base, trained tensors on a copy (full), a
# method's own modules rebuilt on a shared base (bottleneck adapters)
OUTPUTS = {
    "lora-chat": ({"type": "lora", "r": 4, "alpha": 8}, "causal_lm"),
    "full-chat": ({"type": "full"}, "causal_lm"),
    "bottleneck-labels": ({"type": "bottleneck_adapter", "bottleneck": 8}, "seq_classification"),
    "lora-tags": ({"type": "lora", "r": 4, "alpha": 8}, "token_classification"),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    llama = tmp_path_factory.mktemp("tied-llama")
    tiny_tokenizer.save_pretrained(llama)
    build_tiny_llama(llama, vocab_size=len(tiny_tokenizer), tied=True)  # as SmolLM2
    return {"causal_lm": llama, "bert": build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, bases, cache_dir) -> dict[str, Path]:
    """Each case trained for a few steps: its output directory."""
    folder = tmp_path_factory.mktemp("trained")
    bert_tasks = ["seq_classification", "token_classification"]
    registry = load_registry(
        write_registry(
            folder / "models.json",
            {
                "tiny-llama": local_model(bases["causal_lm"], "llama", ["causal_lm"]),
                "tiny-bert": local_model(bases["bert"], "bert", bert_tasks),
            },
        )
    )
    rows = {"causal_lm": QUESTIONS, "seq_classification": REVIEWS}
    trained = {}
    for case, (method, task) in OUTPUTS.items():
        data = write_jsonl(folder / f"{case}.jsonl", rows.get(task, SENTENCES))
        spec = {
            "model": "tiny-llama" if task == "causal_lm" else "tiny-bert",
            "task": task,
            "method": method,
            "validation_split": 0.25,
            "hyperparameters": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2},
        }
        result = train(
            spec, folder / case, data=DataPaths(data), registry=registry, cache_dir=cache_dir
        )
        assert result.status == "succeeded", case
        trained[case] = result.output_dir
    return trained


def _answer(model: TrainedModel) -> object:
    if model.task == "causal_lm":
        return model.reply(QUESTION, max_new_tokens=6, max_input_tokens=64)
    if model.task == "seq_classification":
        return model.classify("the plot was awful", None, max_input_tokens=64)
    return model.tag(["bob", "visited", "oslo"], max_input_tokens=64)


@pytest.mark.parametrize("case", OUTPUTS)
def test_answers_on_the_resident_base_are_the_answers_of_the_output_alone(case, outputs, bases):
    task = OUTPUTS[case][1]
    base = bases["causal_lm" if task == "causal_lm" else "bert"]
    alone = _answer(TrainedModel(outputs[case], base))

    resident, sources = ResidentModels(), []
    for _ in range(2):  # the second load finds the weights in memory as the first left them
        with resident.active(report=lambda _, info: sources.append(info["base_model_source"])):
            model = TrainedModel(outputs[case], base)
        assert _answer(model) == alone
    assert sources == ["disk", "resident"]


def test_an_input_over_the_limit_is_refused_naming_its_field(outputs, bases):
    chat_model = TrainedModel(outputs["lora-chat"], bases["causal_lm"])
    with pytest.raises(UserError) as refused:
        chat_model.reply(QUESTION, max_new_tokens=4, max_input_tokens=5)
    assert refused.value.param == "messages" and "at most 5" in refused.value.message
    with pytest.raises(UserError) as refused:  # the model's context bounds it too (512)
        chat_model.reply(QUESTION, max_new_tokens=510, max_input_tokens=4096)
    assert refused.value.param == "messages" and "at most 2" in refused.value.message

    labeller = TrainedModel(outputs["bottleneck-labels"], bases["bert"])
    with pytest.raises(UserError) as refused:
        labeller.classify("the film was good", "and the plot was great", max_input_tokens=6)
    assert refused.value.param == "text"
    tagger = TrainedModel(outputs["lora-tags"], bases["bert"])
    with pytest.raises(UserError) as refused:
        tagger.tag(["alice", "visited", "rome"], max_input_tokens=3)
    assert refused.value.param == "tokens"


def test_a_prompt_is_continued_as_training_tokenized_it(outputs, bases):
    import torch

    model = TrainedModel(outputs["lora-chat"], bases["causal_lm"])
    answer = model.complete("What is 3 plus", max_new_tokens=5, max_input_tokens=64)
    ids = model.tokenizer("What is 3 plus", add_special_tokens=True)["input_ids"]
    assert answer.input_tokens == len(ids)  # no chat template around it
    with torch.no_grad():
        generated = model.model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False,
            pad_token_id=model.tokenizer.eos_token_id,
        )[0, len(ids):]  # fmt: skip
    assert answer.content == model.tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert answer.output_tokens == len(generated) and answer.finish_reason in {"stop", "length"}
    with pytest.raises(UserError) as refused:
        model.complete("What is 3 plus", max_new_tokens=4, max_input_tokens=2)
    assert refused.value.param == "prompt"


def test_every_label_and_word_gets_its_probability(outputs, bases):
    labeller = TrainedModel(outputs["bottleneck-labels"], bases["bert"])
    answer = labeller.classify("the movie was great", None, max_input_tokens=64)
    assert list(answer.scores) == ["neg", "pos"] and answer.label in answer.scores
    assert sum(answer.scores.values()) == pytest.approx(1.0, abs=1e-5)

    tagger = TrainedModel(outputs["lora-tags"], bases["bert"])
    answer = tagger.tag(["carol", "visited", "paris"], max_input_tokens=64)
    assert [w.word for w in answer.words] == ["carol", "visited", "paris"]
    assert all(w.tag in tagger.labels and 0 < w.score <= 1 for w in answer.words)


def test_answers_compute_in_the_mode_the_job_trained_in(outputs, tmp_path):
    """The output records its mode (fp32 here, "auto" on a CPU); a worker answers in the
    recorded mode where its device runs it, else in its own "auto", as a resume does."""
    import json
    import shutil

    import torch

    from peft_engine.generate import trained_dtype

    cpu = torch.device("cpu")
    info = json.loads((outputs["lora-chat"] / "tuneq_model.json").read_text())
    assert info["precision"] == "fp32" and trained_dtype(outputs["lora-chat"], cpu) == torch.float32

    copy = shutil.copytree(outputs["lora-chat"], tmp_path / "bf16")
    (copy / "tuneq_model.json").write_text(json.dumps(info | {"precision": "bf16"}))
    assert trained_dtype(copy, cpu) == torch.bfloat16  # a CPU's autocast takes bf16
    (copy / "tuneq_model.json").write_text(
        json.dumps({k: v for k, v in info.items() if k != "precision"})
    )
    assert trained_dtype(copy, cpu) == torch.float32  # recorded before modes were: auto
