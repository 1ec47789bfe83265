"""The user's commands: `tuneq files|models|jobs ...`, built on tuneq.client.Client.

Every command takes `--json` (JSON alone on stdout: one document, or one per line when
following). Exit codes, for scripts:

    0  success (when following: the job succeeded)
    1  the job failed
    2  usage error, API error (the problem detail on stderr) or missing TUNEQ_URL/TUNEQ_API_KEY
    3  the job was cancelled
    130  interrupted (Ctrl-C); a followed job keeps running

They read TUNEQ_URL and TUNEQ_API_KEY (the two lines `tuneq up` prints). Nothing here
loads torch: listing jobs stays quick.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneq.client.client import Client
from tuneq.client.errors import MissingSetting, TuneqAPIError
from tuneq.client.render import Output
from tuneq.client.types import Job

if TYPE_CHECKING:
    from tuneq.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = __doc__.split("for scripts:\n\n")[1].split("\n\n")[0]

Handler = Callable[[Client, argparse.Namespace, Output], int | None]


def register_user_commands(commands: Any) -> None:
    """Add `files`, `models` and `jobs` to the `tuneq` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON only, on stdout")
    epilog = "exit codes:\n" + EXIT_CODES
    formatter = argparse.RawDescriptionHelpFormatter

    def group(name: str, help_text: str) -> Any:
        parser = commands.add_parser(name, help=help_text, epilog=epilog, formatter_class=formatter)
        return parser.add_subparsers(required=True, metavar="ACTION")

    def action(actions: Any, name: str, handler: Handler, help_text: str) -> Any:
        parser = actions.add_parser(
            name, parents=[common], help=help_text, epilog=epilog, formatter_class=formatter
        )
        parser.set_defaults(run=functools.partial(_run, handler))
        return parser

    files = group("files", "upload, list, read and delete datasets (the API's /files)")
    upload = action(files, "upload", _files_upload, "upload and validate a dataset")
    upload.add_argument("path", type=Path)
    upload.add_argument("--purpose", default="fine-tune")
    _paged(action(files, "list", _files_list, "your files, newest first"))
    action(files, "get", _files_get, "a file and its validation report").add_argument("file_id")
    action(files, "delete", _files_delete, "delete a file").add_argument("file_id")

    models = group("models", "the base models this deployment trains")
    action(models, "list", _models_list, "the models, with their tasks and methods")

    jobs = group("jobs", "create, follow, steer and download fine-tuning jobs")
    _create_options(action(jobs, "create", _jobs_create, "create a job (or --dry-run it)"))
    listing = _paged(action(jobs, "list", _jobs_list, "your jobs, newest first"))
    listing.add_argument("--status")
    listing.add_argument("--model")
    for name, handler, text in (
        ("get", _jobs_get, "a job: status, progress, result"),
        ("cancel", _jobs_steer, "cancel a job"),
        ("pause", _jobs_steer, "pause a job (it stops at a checkpoint)"),
        ("resume", _jobs_steer, "resume a paused job"),
        ("follow", _jobs_follow, "follow a job live until it ends (exit code: how it ended)"),
        ("metrics", _jobs_metrics, "a job's per-step and evaluation metrics"),
        ("checkpoints", _jobs_checkpoints, "a job's kept checkpoints"),
        ("diagnostics", _jobs_diagnostics, "a finished job's hardest examples and confusions"),
    ):
        parser = action(jobs, name, handler, text)
        parser.add_argument("job_id")
        parser.set_defaults(action=name)
    events = action(jobs, "events", _jobs_events, "a job's events, oldest first")
    events.add_argument("job_id")
    events.add_argument("--after", type=int, help="only events with a greater id")
    events.add_argument("--limit", type=int, default=100)
    download = action(jobs, "download", _jobs_download, "download and unpack the adapter")
    download.add_argument("job_id")
    download.add_argument("--checkpoint", type=int, metavar="STEP", help="a checkpoint's instead")
    download.add_argument(
        "-o", "--out", type=Path, help="directory (default ./JOB_ID/adapter or checkpoint-STEP)"
    )


def _paged(parser: Any) -> Any:
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--after", help="the last id of the previous page")
    return parser


def _create_options(parser: Any) -> None:
    parser.add_argument("--model", help="a base model (`tuneq models list`)")
    parser.add_argument("--training-file", help="a file id, or a local path uploaded first")
    parser.add_argument("--validation-file", help="a file id, or a local path uploaded first")
    parser.add_argument("--method", help="method.type: lora, ia3, full, ... (`tuneq models list`)")
    parser.add_argument(
        "--task",
        help="causal_lm, seq_classification, token_classification, image_classification",
    )
    parser.add_argument("--suffix", help="a name for the adapter")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="a spec value by dotted path, e.g. hyperparameters.n_epochs=3 or method.r=8 "
        "(VALUE is JSON when it parses, else a string); repeatable",
    )
    parser.add_argument("--spec", type=Path, help="a JSON job spec; the other options override it")
    parser.add_argument("--dry-run", action="store_true", help="validate and estimate only")
    parser.add_argument("--follow", action="store_true", help="then follow it until it ends")


def _run(handler: Handler, settings: Settings, args: argparse.Namespace) -> int:
    """Run one user command; errors become a message on stderr and exit code 2."""
    output = Output(as_json=args.json)
    try:
        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        with Client(settings.url, api_key) as client:
            return handler(client, args, output) or EXIT_OK
    except MissingSetting as err:
        print(f"error: {err}", file=sys.stderr)
    except TuneqAPIError as err:
        output.problem(err)
    except (OSError, ValueError, tarfile.TarError) as err:  # a local file, a bad --set
        print(f"error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR


# -- files ------------------------------------------------------------------------------


def _files_upload(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.file(client.files.upload(args.path, purpose=args.purpose), "uploaded")


def _files_list(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.files(client.files.list(limit=args.limit, after=args.after))


def _files_get(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.file(client.files.get(args.file_id), "file")


def _files_delete(client: Client, args: argparse.Namespace, output: Output) -> None:
    deleted = client.files.delete(args.file_id)
    output.document(deleted.raw, f"deleted {deleted.id}")


def _models_list(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.models(client.models.list())


# -- jobs -------------------------------------------------------------------------------


def _jobs_create(client: Client, args: argparse.Namespace, output: Output) -> int | None:
    spec = json.loads(args.spec.read_text()) if args.spec else {}
    for name in ("model", "task", "suffix"):
        if getattr(args, name):
            spec[name] = getattr(args, name)
    for name in ("training_file", "validation_file"):
        if getattr(args, name):
            spec[name] = _file_id(client, getattr(args, name), output)
    if args.method:
        spec.setdefault("method", {})["type"] = args.method
    for assignment in args.set:
        set_path(spec, assignment)
    if args.dry_run:
        output.estimate(client.jobs.create(spec, dry_run=True))
        return None
    job = client.jobs.create(spec)
    output.created(job)
    return _follow(client, job.id, output) if args.follow else None


def _file_id(client: Client, value: str, output: Output) -> str:
    """A local path is uploaded (its report shown); anything else is taken as a file id."""
    if not Path(value).is_file():
        return value
    uploaded = client.files.upload(value)
    output.file(uploaded, "uploaded", document=False)
    return uploaded.id


def set_path(spec: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=VALUE` to the spec: VALUE as JSON when it parses, else as a string."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise ValueError(f"--set {assignment!r}: expected PATH=VALUE, e.g. method.r=8")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment!r}: {part} is not an object in the spec")
    node[leaf] = value


def _jobs_list(client: Client, args: argparse.Namespace, output: Output) -> None:
    page = client.jobs.list(
        limit=args.limit, after=args.after, status=args.status, model=args.model
    )
    output.jobs(page)


def _jobs_get(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.job(client.jobs.get(args.job_id))


def _jobs_steer(client: Client, args: argparse.Namespace, output: Output) -> None:
    steer = {"cancel": client.jobs.cancel, "pause": client.jobs.pause, "resume": client.jobs.resume}
    job = steer[args.action](args.job_id)
    output.document(job.raw, f"{job.id}: {job.status}")


def _jobs_events(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.events(client.jobs.events(args.job_id, after=args.after, limit=args.limit))


def _jobs_metrics(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.metrics(client.jobs.metrics(args.job_id))


def _jobs_checkpoints(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.checkpoints(client.jobs.checkpoints(args.job_id))


def _jobs_diagnostics(client: Client, args: argparse.Namespace, output: Output) -> None:
    output.diagnostics(client.jobs.diagnostics(args.job_id))


def _jobs_follow(client: Client, args: argparse.Namespace, output: Output) -> int:
    return _follow(client, args.job_id, output)


def _follow(client: Client, job_id: str, output: Output) -> int:
    following = client.jobs.follow(job_id)
    with output.following() as show:
        for event in following:
            show(event)
    assert following.job is not None  # iteration ends only once the job has ended
    output.ended(following.job)
    return exit_code(following.job)


def exit_code(job: Job) -> int:
    """How a followed job ended, as the module's table of exit codes says."""
    return {"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(job.status, EXIT_FAILED)


def _jobs_download(client: Client, args: argparse.Namespace, output: Output) -> None:
    out = client.jobs.download(args.job_id, checkpoint=args.checkpoint, out=args.out)
    output.downloaded(args.job_id, args.checkpoint, out)
