"""`python -m peft_engine`: run exactly the training a tuneq job runs, without the service.

    python -m peft_engine train SPEC.json --data TRAIN.jsonl [--validation VAL.jsonl]
                                          --out DIR [--resume CHECKPOINT_DIR|latest]
    python -m peft_engine models

Under torchrun (`python -m torch.distributed.run --nproc_per_node N -m peft_engine train
...`) the job runs data parallel on N ranks (distributed.py); rank 0 prints the progress.
`--report FILE --stop-file FILE` is how a worker drives such a run (report.py).

Exit status: 0 done, 2 the user's fault (spec, data, model) with a one-line reason,
130 interrupted, 1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft_engine.errors import SpecError, UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m peft_engine", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--registry",
        type=Path,
        default=_env_path("TUNEQ_MODEL_REGISTRY"),
        help="operator model registry file (YAML or JSON) adding to the built-in models "
        "[env TUNEQ_MODEL_REGISTRY]",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=_env_path("TUNEQ_CACHE_DIR"),
        help="where converted base models are cached [env TUNEQ_CACHE_DIR; ~/.cache/tuneq]",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a base model from a job spec")
    train.add_argument("spec", type=Path, help="job spec, JSON (DESIGN §5)")
    train.add_argument("--data", type=Path, help="training data, JSONL (overrides training_file)")
    train.add_argument("--validation", type=Path, help="validation data, JSONL")
    train.add_argument("--out", type=Path, required=True, help="working directory for the run")
    train.add_argument(
        "--resume", help="checkpoint directory to continue from, or 'latest' (in OUT/checkpoints)"
    )
    train.add_argument("--report", type=Path, help="write the run's progress as JSON lines here")
    train.add_argument("--stop-file", type=Path, help="stop at the next step once this exists")
    train.set_defaults(run=_train)

    models = commands.add_parser("models", help="list the base models of the registry")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(run=_models)
    return parser


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _train(args: argparse.Namespace) -> int:
    from peft_engine.distributed import close, world_from_env

    world = world_from_env()
    try:
        return _train_rank(args, world)
    finally:
        close(world)


def _train_rank(args: argparse.Namespace, world: Any) -> int:
    from peft_engine.report import ReportWriter, die_with_parent, quiet_hooks

    if args.report is None:
        return _train_console(args, world)
    if world.active:
        die_with_parent()  # torchrun gone (its worker killed): this rank goes too
    writer = ReportWriter(args.report, args.stop_file) if world.is_main else None
    hooks = writer.hooks() if writer else quiet_hooks(args.stop_file)
    try:
        result = _run_train(args, hooks, world)
    except UserError as err:
        if writer:
            writer.write({"type": "error", "code": err.code, "message": err.message,
                          "param": err.param})  # fmt: skip
        raise
    except Exception as err:
        if writer:
            writer.write({"type": "crash", "error": f"{type(err).__name__}: {err}"})
        raise
    if writer:
        out = str(result.output_dir) if result.output_dir else None
        writer.write({"type": "result", "status": result.status, "output_dir": out,
                      "result": result.result})  # fmt: skip
        writer.close()
    return 0


def _train_console(args: argparse.Namespace, world: Any) -> int:
    from peft_engine.progress import ConsoleProgress
    from peft_engine.report import quiet_hooks

    progress = ConsoleProgress()
    hooks = progress.hooks() if world.is_main else quiet_hooks(args.stop_file)
    with _stop_on_first_ctrl_c(progress):
        result = _run_train(args, hooks, world)
    if not world.is_main:
        return 0
    if result.status == "stopped":
        latest = _latest_checkpoint(args.out)
        hint = f"; resume with --resume {latest}" if latest else ""
        print(f"stopped at step {result.result['steps']}{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _print_summary(result.output_dir, result.result)
    return 0


def _run_train(args: argparse.Namespace, hooks: Any, world: Any) -> Any:
    from peft_engine.models import load_registry
    from peft_engine.prepare import DataPaths
    from peft_engine.progress import quiet_library_output
    from peft_engine.spec import parse_spec
    from peft_engine.training import train

    quiet_library_output()
    raw = _read_spec_file(args.spec)
    if args.data is not None:
        raw["training_file"] = str(args.data)
    if args.validation is not None:
        raw["validation_file"] = str(args.validation)
    spec = parse_spec(raw)
    data = DataPaths.from_spec(spec)
    resume = _resume_path(args.resume, args.out)
    return train(
        spec,
        args.out,
        hooks,
        data=data,
        resume_from=resume,
        registry=load_registry(args.registry),
        cache_dir=args.cache_dir,
        world=world,
    )


def _models(args: argparse.Namespace) -> int:
    from peft_engine.models import load_registry

    entries = load_registry(args.registry).entries()
    if args.json:
        print(json.dumps([_entry_json(e) for e in entries], indent=2))
        return 0
    print(f"{'NAME':<28} {'TASKS':<40} SOURCE")
    for entry in entries:
        print(f"{entry.name:<28} {','.join(entry.tasks):<40} {entry.source.type}")
    return 0


def _entry_json(entry: Any) -> dict[str, Any]:
    return {
        "name": entry.name,
        "tasks": list(entry.tasks),
        "source": entry.source.type,
        "description": entry.description,
        "license": entry.license,
    }


def _read_spec_file(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"file not found: {path}", param="spec") from None
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            param="spec",
        ) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path} must hold a JSON object", param="spec")
    return raw


def _resume_path(value: str | None, out: Path) -> Path | None:
    if value is None:
        return None
    path = _latest_checkpoint(out) if value == "latest" else Path(value)
    if path is None or not (path / "trainer_state.json").is_file():
        raise SpecError(f"no checkpoint at {path or out / 'checkpoints'}", param="resume")
    return path


def _latest_checkpoint(out: Path) -> Path | None:
    found = [
        p
        for p in (out / "checkpoints").glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


@contextmanager
def _stop_on_first_ctrl_c(progress: Any) -> Iterator[None]:
    """The first Ctrl-C stops after the current step; a second one aborts at once."""

    def handle(signum: int, frame: Any) -> None:
        if progress.stop_requested:
            raise KeyboardInterrupt
        progress.stop_requested = True
        print("\nstopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_summary(output_dir: Path | None, result: dict[str, Any]) -> None:
    metrics = result["metrics"]
    before, best = metrics["initial"].get("eval_loss"), metrics["best"].get("eval_loss")
    lines = [f"output: {output_dir}"]
    if before is not None and best is not None:
        lines.append(
            f"eval loss: {before:.4f} (base model) -> {best:.4f} (step {result['best_step']})"
        )
    lines.append(
        f"trained {result['trained_tokens']} tokens in {result['steps']} steps, "
        f"{result['tokens_per_second']:.0f} tokens/s, {result['wall_seconds']:.0f} s, "
        f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
    if timings := result.get("timings"):
        lines.append(
            f"time: load {timings['load_seconds']:.0f} s, train {timings['train_seconds']:.0f} s, "
            f"eval {timings['eval_seconds']:.0f} s ({timings['evaluations']} evaluations), "
            f"checkpoints {timings['checkpoint_seconds']:.0f} s ({timings['checkpoints']})"
        )
    if result["truncated_examples"]:
        lines.append(f"{result['truncated_examples']} examples were truncated")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
