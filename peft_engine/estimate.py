"""What a job will cost, without torch: token counts, resolved hyperparameters, duration.

The control plane calls this when a job is created (and for `?dry_run=true`); it never
loads weights. Tokens are counted with the model's own tokenizer (the Rust `tokenizers`
library and the model's chat template) when its files are on disk; a GGUF model not yet
dequantised has none, and then a characters-per-token rule is used and the estimate says
so (`exact: false`). The worker's engine counts exactly again when the job runs.

The duration is the sum of four phases, each from the token counts and a `Throughput`
(the caller's figures for this model, measured on the deployment or its defaults, and
`basis` says which):

    load        the base model's loading, as measured (seconds a job)
    train       trained tokens x their cost / train tokens per second (a preference
                objective's step also runs the reference model forward over both answers:
                a forward pass's share, EVAL_COST_PER_TOKEN, more a token)
    eval        the evaluations the cadence runs (`evaluation_plan`) x the tokens each reads,
                / eval tokens per second (a forward pass only: by default 3x the train speed)
    checkpoint  the checkpoints the cadence writes, plus the output, x seconds per checkpoint

Classification text is counted as the model's encoder sees it (special tokens, and a
text_a/text_b pair as one pair); token classification as its words joined by spaces; a
preference pair as its two sequences, the prompt with each answer, each truncated on its own
as the engine does (`_sequences`: both are trained, side by side).
Image classification has no tokens: each image counts as one, so its "tokens" are
examples (see `_token_counter`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_engine.data.formats import (
    PREFERENCE_OBJECTIVES,
    DataFormat,
    Example,
    preference_conversations,
)
from peft_engine.errors import SpecError
from peft_engine.eval_plan import EVAL_COST_PER_TOKEN, periodic_evaluations
from peft_engine.jsonfile import read_json_object
from peft_engine.memory import job_memory
from peft_engine.models.loading import model_dir, read_model_info
from peft_engine.models.registry import ModelRegistry
from peft_engine.prepare import DataPaths, check_support, read_job_examples
from peft_engine.spec import (
    DatasetStats,
    JobSpec,
    ModelLimits,
    ResolvedHyperparameters,
    ResolvedSpec,
    resolve_max_seq_length,
    resolve_spec,
)

_CHARS_PER_TOKEN = 4.0  # English text with a BPE vocabulary of ~50k: a rough but usual rule
PHASES = ("load", "train", "eval", "checkpoint")


@dataclass(frozen=True)
class Throughput:
    """How fast a model trains on this deployment: what a duration estimate divides by."""

    train_tokens_per_second: float
    eval_tokens_per_second: float
    load_seconds: float  # the base model's loading, once a job
    seconds_per_checkpoint: float  # one checkpoint (or the output) written
    basis: str  # where the figures come from, e.g. "measured: 12 jobs of m on cpu"

    @classmethod
    def of(
        cls,
        train_tokens_per_second: float,
        *,
        load_seconds: float,
        seconds_per_checkpoint: float,
        basis: str,
        eval_tokens_per_second: float | None = None,
    ) -> Throughput:
        """Figures where the eval speed may be unknown: then a forward pass's share of a
        training step (EVAL_COST_PER_TOKEN) of the train speed."""
        return cls(
            train_tokens_per_second,
            eval_tokens_per_second or train_tokens_per_second / EVAL_COST_PER_TOKEN,
            load_seconds,
            seconds_per_checkpoint,
            basis,
        )


@dataclass(frozen=True)
class EvaluationPlan:
    """The evaluations a job's cadence runs, and how many validation examples each reads."""

    periodic: int  # the base model's and every eval_every_steps (the last step's too)
    sample_size: int  # validation examples each periodic evaluation reads
    whole: int  # the kept weights' pass over the whole set, after sampled periodic ones
    n_validation: int

    @property
    def evaluations(self) -> int:
        return self.periodic + self.whole

    @property
    def examples(self) -> int:
        return self.periodic * self.sample_size + self.whole * self.n_validation


def evaluation_plan(hp: ResolvedHyperparameters, n_validation: int) -> EvaluationPlan:
    """The evaluations of a job that runs to its last step (an early stop runs fewer), as the
    engine runs them: the base model's and one every `eval_every_steps` steps and at the last
    step, on `eval_sample_size` examples (None: the whole set); then, when that was a sample,
    the kept weights' on the whole set."""
    if n_validation == 0 or hp.eval_every_steps is None:
        return EvaluationPlan(0, 0, 0, 0)
    size = min(hp.eval_sample_size or n_validation, n_validation)
    periodic = periodic_evaluations(hp.total_steps, hp.eval_every_steps) + 1
    final = size < n_validation and hp.final_eval_whole_set
    return EvaluationPlan(periodic, size, 1 if final else 0, n_validation)


def checkpoint_writes(hp: ResolvedHyperparameters) -> int:
    """Checkpoints every checkpoint_every_steps steps before the last, and the output."""
    return (hp.total_steps - 1) // hp.checkpoint_every_steps + 1


@dataclass(frozen=True)
class Estimate:
    spec: ResolvedSpec
    n_train: int
    n_validation: int
    train_tokens_per_epoch: int  # after truncation to max_seq_length
    trained_tokens: int  # over the whole job (epochs, max_steps)
    truncated: int  # training examples longer than max_seq_length
    exact: bool  # counted with the model's tokenizer
    evaluations: int
    eval_tokens: int  # read by every evaluation together
    checkpoints: int  # written, the output included
    seconds_by_phase: dict[str, float]  # PHASES
    basis: str  # where the throughput figures come from
    memory: dict[str, Any] | None = None  # peak training memory (peft_engine/memory.py)

    @property
    def estimated_seconds(self) -> float:
        return sum(self.seconds_by_phase.values())

    def as_dict(self) -> dict[str, Any]:
        """The estimate as the API shows it. An image job counts images (`unit`), and its
        fields say so: an image has no tokens, nothing to truncate, nothing to guess."""
        if self.spec.task == "image_classification":
            counted: dict[str, Any] = {
                "unit": "images",
                "train_images_per_epoch": self.train_tokens_per_epoch,
                "trained_images": self.trained_tokens,
            }
        else:
            counted = {
                "unit": "tokens",
                "train_tokens_per_epoch": self.train_tokens_per_epoch,
                "trained_tokens": self.trained_tokens,
                "truncated_examples": self.truncated,
                "tokens_exact": self.exact,
            }
        evaluated = "eval_images" if counted["unit"] == "images" else "eval_tokens"
        return {
            "n_train_examples": self.n_train,
            "n_validation_examples": self.n_validation,
            **counted,
            "total_steps": self.spec.hyperparameters.total_steps,
            "evaluations": self.evaluations,
            evaluated: self.eval_tokens,
            "checkpoints": self.checkpoints,
            "estimated_seconds": round(self.estimated_seconds, 1),
            "seconds_by_phase": {k: round(v, 1) for k, v in self.seconds_by_phase.items()},
            "basis": self.basis,
            "memory": self.memory,
        }


def estimate_job(
    spec: JobSpec,
    data: DataPaths,
    *,
    registry: ModelRegistry,
    cache_dir: Path,
    throughput: Throughput,
) -> Estimate:
    entry = registry.get(spec.model)
    check_support(spec, entry)
    path = model_dir(entry, cache_dir, build=False)
    limits = ModelLimits(
        max_position_embeddings=read_model_info(path).max_position_embeddings if path else None
    )
    train_examples, validation_examples = read_job_examples(spec, data)
    count = _token_counter(path)
    # Images count one "token" each, so for image_classification the token fields below
    # are examples: trained_tokens is examples x epochs, the duration examples / throughput.
    lengths = [_sequence_lengths(example, count) for example in train_examples]
    cap = resolve_max_seq_length(spec.hyperparameters, limits)
    stats = DatasetStats(
        n_train=len(train_examples),
        n_validation=len(validation_examples),
        max_tokens=max(max(sequences) for sequences in lengths),
        mean_tokens=sum(_truncated(sequences, cap) for sequences in lengths) / len(lengths),
        validation_mean_tokens=_mean_tokens(validation_examples, count, cap),
    )
    resolved = resolve_spec(spec, stats, limits)
    hp = resolved.hyperparameters
    per_epoch = sum(_truncated(sequences, hp.max_seq_length) for sequences in lengths)
    epochs_run = hp.total_steps / hp.steps_per_epoch  # max_steps may end the job early
    trained = math.ceil(per_epoch * epochs_run)
    evals = evaluation_plan(hp, len(validation_examples))
    eval_tokens = _eval_tokens(evals, validation_examples, count, hp.max_seq_length)
    checkpoints = checkpoint_writes(hp)
    seconds = {
        "load": throughput.load_seconds,
        "train": trained
        * train_token_cost(spec.method.objective.type)
        / throughput.train_tokens_per_second,
        "eval": eval_tokens / throughput.eval_tokens_per_second,
        "checkpoint": checkpoints * throughput.seconds_per_checkpoint,
    }
    return Estimate(
        spec=resolved,
        n_train=stats.n_train,
        n_validation=stats.n_validation,
        train_tokens_per_epoch=per_epoch,
        trained_tokens=trained,
        truncated=sum(1 for sequences in lengths if max(sequences) > hp.max_seq_length),
        exact=path is not None,
        evaluations=evals.evaluations,
        eval_tokens=eval_tokens,
        checkpoints=checkpoints,
        seconds_by_phase=seconds,
        basis=throughput.basis,
        memory=job_memory(path, resolved, longest_sequence=stats.max_tokens),
    )


def _eval_tokens(
    plan: EvaluationPlan, examples: list[Example], count: TokenCounter, max_seq_length: int
) -> int:
    """The tokens the plan's evaluations read: examples read x the mean validation length."""
    if not plan.examples:
        return 0
    mean = _mean_tokens(examples, count, max_seq_length) or 0.0
    return math.ceil(plan.examples * mean)


def train_token_cost(objective: str) -> float:
    """A trained token's cost, in trained tokens of a plain (sft) step: a preference
    objective's step also runs the reference model (the adapter disabled, no backward)
    forward over both answers. The recorded speeds are in plain steps' tokens (see
    tuneq.throughput), so a preference job's measured speed is scaled up by this."""
    return 1 + EVAL_COST_PER_TOKEN if objective in PREFERENCE_OBJECTIVES else 1.0


TokenCounter = Callable[[Example], int]  # the tokens of one sequence


def _sequences(example: Example) -> list[Example]:
    """The sequences the model runs for an example: a preference pair's two conversations (the
    prompt with each answer, each a chat), any other example as it is."""
    if example.format is not DataFormat.PREFERENCE:
        return [example]
    return [
        Example(example.line, DataFormat.CHAT, {"messages": messages})
        for messages in preference_conversations(example.record)
    ]


def _sequence_lengths(example: Example, count: TokenCounter) -> list[int]:
    return [count(sequence) for sequence in _sequences(example)]


def _truncated(lengths: list[int], cap: int) -> int:
    """An example's tokens once each of its sequences is cut to `cap`."""
    return sum(min(n, cap) for n in lengths)


def _mean_tokens(examples: list[Example], count: TokenCounter, cap: int) -> float | None:
    """The mean example's tokens after truncation (the periodic evaluations' plan uses it)."""
    if not examples:
        return None
    return sum(_truncated(_sequence_lengths(e, count), cap) for e in examples) / len(examples)


def _token_counter(path: Path | None) -> TokenCounter:
    """How many tokens a sequence (`_sequences`) is, with the model's tokenizer when it has one.

    An image is one "token": the estimate's token fields then count examples, and trained
    tokens are examples x epochs (and the duration is examples over the throughput figure).
    """
    if path is None or not (path / "tokenizer.json").is_file():
        return _approximate_tokens
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    # A tokenizer.json may pad and truncate every encoding to a fixed length (all-MiniLM-L6-v2
    # pads to 128): lengths are counted here, and truncation is the estimate's business.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    template = _chat_template(path)

    def count(example: Example) -> int:
        record = example.record
        if example.format is DataFormat.IMAGE_CLASSIFICATION:
            return 1
        if example.format is DataFormat.CHAT and template is not None:
            text = template.render(messages=record["messages"], add_generation_prompt=False)
            return len(tokenizer.encode(text, add_special_tokens=False).ids)
        if example.format is DataFormat.PROMPT_COMPLETION:
            prompt = tokenizer.encode(record["prompt"], add_special_tokens=True).ids
            completion = tokenizer.encode(record["completion"], add_special_tokens=False).ids
            return len(prompt) + len(completion) + 1  # + end of sequence
        if example.format is DataFormat.CLASSIFICATION and "text_a" in record:
            return len(tokenizer.encode(record["text_a"], record["text_b"]).ids)
        if example.format in _ENCODER_FORMATS:  # an encoder's special tokens, no end token
            return len(tokenizer.encode(_example_text(example), add_special_tokens=True).ids)
        return len(tokenizer.encode(_example_text(example), add_special_tokens=True).ids) + 1

    return count


_ENCODER_FORMATS = (DataFormat.CLASSIFICATION, DataFormat.TOKEN_CLASSIFICATION)


def _approximate_tokens(example: Example) -> int:
    """Without a tokenizer: characters over a usual characters-per-token ratio."""
    if example.format is DataFormat.IMAGE_CLASSIFICATION:
        return 1
    return max(1, math.ceil(len(_example_text(example)) / _CHARS_PER_TOKEN))


def _chat_template(path: Path) -> Any:
    source = None
    if (path / "chat_template.jinja").is_file():
        source = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif (path / "tokenizer_config.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        source = config.get("chat_template") if isinstance(config, dict) else None
    if not isinstance(source, str):
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    config = read_json_object(path / "tokenizer_config.json")
    return env.from_string(source, globals={k: config.get(k) for k in ("bos_token", "eos_token")})


def _raise_template_error(message: str) -> None:
    raise SpecError(
        f"the model's chat template refused an example: {message}", param="training_file"
    )


def _example_text(example: Example) -> str:
    """The example's text, for the tokenizer or the characters-per-token rule."""
    record = example.record
    if example.format is DataFormat.CHAT:
        return "\n".join(str(m.get("content") or "") for m in record["messages"])
    if example.format is DataFormat.PROMPT_COMPLETION:
        return record["prompt"] + record["completion"]
    if example.format is DataFormat.TOKEN_CLASSIFICATION:
        return " ".join(record["tokens"])  # as the engine tokenizes the words
    if example.format is DataFormat.IMAGE_CLASSIFICATION:
        return ""
    if "text_a" in record:
        return record["text_a"] + " " + record["text_b"]
    return record["text"]
