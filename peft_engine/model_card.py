"""The model card (README.md) written beside every trained adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_engine.methods import method_for
from peft_engine.methods.weights import TRAINED_WEIGHTS_FILE

if TYPE_CHECKING:
    from peft_engine.prepare import PreparedJob

# The headline metrics of each task, in the card's evaluation table.
_METRICS = {
    "causal_lm": ("eval_loss", "eval_perplexity", "eval_token_accuracy"),
    "seq_classification": ("eval_loss", "accuracy", "macro_f1"),
    "token_classification": ("eval_loss", "entity_f1", "entity_precision", "entity_recall"),
    "image_classification": ("eval_loss", "accuracy", "macro_f1"),
    # a causal LM tuned on preference pairs (method.objective dpo)
    "preference": ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_logps_margin"),
}


def render_model_card(job: PreparedJob, result: dict[str, Any]) -> str:
    spec = job.spec
    hp = spec.hyperparameters
    method = spec.method.model_dump()
    method_text = ", ".join(f"{k}={v}" for k, v in method.items() if k != "type")
    license_line = f"license: {job.entry.license}\n" if job.entry.license else ""
    return f"""---
library_name: peft
base_model: {job.entry.name}
{license_line}tags: [tuneq, {method["type"]}, {spec.task}]
---

# {spec.suffix or "Adapter"} — {method["type"]} on {job.entry.name}

Trained by tuneq's `peft_engine` {result["versions"]["peft_engine"]} (peft
{result["versions"]["peft"]}, transformers {result["versions"]["transformers"]}).

| | |
|---|---|
| base model | `{job.entry.name}` ({job.entry.description or job.entry.source.type}) |
| task | `{spec.task}` |
| method | `{method["type"]}` ({method_text}) |
| training examples | {_examples(result, hp.max_seq_length)} |
| validation examples | {result["validation_examples"]} |
| steps | {_steps(result, hp)} |
| learning rate | {_learning_rate(hp)} |
| trained tokens | {result["trained_tokens"]} |
| weights kept | {_kept(result)} |

## Evaluation

{_metrics_table(result, _metrics_kind(spec))}
{_labels(result)}
## Loading

{_loading(job)}

`result.json` holds every figure above; `metrics.jsonl` the per-step series.
"""


def _learning_rate(hp: Any) -> str:
    head = f" (the new head {hp.head_learning_rate:g})" if hp.head_learning_rate else ""
    return f"{hp.learning_rate:g}{head}, {hp.lr_scheduler}, {hp.warmup_steps} warmup steps"


def _metrics_kind(spec: Any) -> str:
    """Which headline metrics the card shows: the task's, or preference tuning's."""
    return "preference" if spec.method.objective.type == "dpo" else spec.task


def _examples(result: dict[str, Any], max_seq_length: int) -> str:
    return (
        f"{result['train_examples']} ({result['truncated_examples']} truncated to "
        f"{max_seq_length} tokens, {result['dropped_examples']} left out with nothing to learn)"
    )


def _steps(result: dict[str, Any], hp: Any) -> str:
    stopped = " (early stopping)" if result["early_stopped"] else ""
    return (
        f"{result['steps']} of {result['total_steps']}{stopped}, batch {hp.batch_size} × "
        f"{hp.gradient_accumulation_steps}, {hp.n_epochs} epochs"
    )


def _kept(result: dict[str, Any]) -> str:
    best = result["best_step"]
    if best is None:
        return f"step {result['steps']} (no evaluation data)"
    return f"step {best}, the lowest eval loss"


def _metrics_table(result: dict[str, Any], kind: str) -> str:
    metrics = result["metrics"]
    if not metrics["initial"] and not metrics["best"]:
        return "No validation data: nothing was evaluated."
    columns = ["base model", "final step", "kept (best)"]
    keys = ["initial", "final", "best"]
    evaluation = result.get("evaluation") or {}
    n_validation = evaluation.get("validation_examples")
    sampled = evaluation.get("periodic_sample_size", n_validation) != n_validation
    if evaluation.get("final") == "whole set on the kept weights":
        columns.append("kept, whole validation set")  # the periodic columns are on a sample
        keys.append("kept")
    rows = [
        "| metric | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name in _METRICS[kind]:
        cells = [_fmt(metrics.get(k, {}).get(name)) for k in keys]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if sampled:
        rows.append(
            f"\nThe base model, final step and best columns are on a fixed sample of "
            f"{evaluation['periodic_sample_size']} of the {evaluation['validation_examples']} "
            "validation examples, the same at each evaluation."
        )
    return "\n".join(rows)


def _labels(result: dict[str, Any]) -> str:
    labels = result.get("labels")
    if not labels:
        return ""
    text = ", ".join(f"`{label}`" for label in labels[:50])
    more = f" and {len(labels) - 50} more" if len(labels) > 50 else ""
    return (
        f"\nLabels, in id order ({len(labels)}): {text}{more}. `tuneq_model.json` holds "
        "`id2label`; `result.json`'s `report` the per-class (or per-entity-type) figures.\n"
    )


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _loading(job: PreparedJob) -> str:
    base_hint = f"""# BASE: the base model's files. With tuneq installed:
#   from peft_engine.models import load_registry, model_dir
#   BASE = model_dir(load_registry().get("{job.entry.name}"), cache_dir)"""
    trained_weights = method_for(job.spec.method.type).weights.file == TRAINED_WEIGHTS_FILE
    if job.spec.task != "causal_lm" or trained_weights:
        what = (
            f"The trained weights (`{TRAINED_WEIGHTS_FILE}`, by parameter name) go back on"
            if trained_weights
            else "The PEFT adapter (`adapter_model.safetensors`) is loaded with"
        )
        how = (
            "the rebuilt model"
            if trained_weights
            else "`PeftModel.from_pretrained` on the base model with the task head rebuilt"
        )
        return f"""{what} {how} by tuneq's loader, which reads `tuneq_model.json` (task, labels,
pooling, method):

```python
from peft_engine import load_trained

{base_hint}
model = load_trained("path/to/this/directory", BASE).eval()
```"""
    return f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

{base_hint}
base = AutoModelForCausalLM.from_pretrained(BASE)
model = PeftModel.from_pretrained(base, "path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```{_qlora_note(job)}"""


def _qlora_note(job: PreparedJob) -> str:
    if job.spec.hyperparameters.base_precision != "nf4":
        return ""
    return """

Trained with QLoRA, on the base quantised to 4-bit NF4 (bitsandbytes). To merge, load the
base in bf16 or float32 as above (not 4-bit) and call `model.merge_and_unload()`; the
merged model differs from the trained one by the base's quantisation error."""
