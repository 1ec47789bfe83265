"""`tuneq`: run the parts of the service, administer it, and use it (files, models, jobs).

    tuneq up                           the embedded stack in the background; prints URL and key
    tuneq down                         stops it
    tuneq demo                         what `make demo` runs: a real job, start to finish
    tuneq migrate                      apply the database migrations
    tuneq api                          the HTTP control plane (uvicorn)
    tuneq worker                       a training worker (one job at a time; generate requests
                                       between jobs)
    tuneq beat                         the periodic relay, reaper and webhook deliveries (one)
    tuneq admin create-team NAME
    tuneq admin create-key --team NAME [--name N] [--expires-in 30d | --expires-at TIME]
                                       prints the new key alone on its last line
    tuneq admin list-keys --team NAME    tuneq admin revoke-key PREFIX
    tuneq admin set-quota --team NAME [--running-jobs N] [--queued-jobs N] [--stored-bytes
                          SIZE] [--gpu-seconds N --gpu-window 7d]     (`default`: clear one)
    tuneq admin show-quota --team NAME
    tuneq admin build-image-model [--name N] [--out DIR] [--registry FILE] [--epochs N]
                                       an image base model (MobileNetV2 pretrained on digits
                                       0-4, about a minute on a CPU), registered for jobs

A user's commands (TUNEQ_URL, TUNEQ_API_KEY; `--json` on each; `tuneq jobs -h`):
    tuneq files upload|list|get|delete     tuneq models list
    tuneq jobs create|list|get|follow|cancel|pause|resume|events|metrics|checkpoints|download

Settings come from TUNEQ_* environment variables (see the README's configuration table).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneq.client.cli import register_user_commands
from tuneq.errors import TuneqError
from tuneq.image_model import PRETRAIN_EPOCHS
from tuneq.logs import configure_logging, with_request_ids
from tuneq.quotas import cli as quota_commands
from tuneq.settings import Settings
from tuneq.teams import cli as key_commands

# The parts above the shared package, named "module:function" and imported only when their
# command runs: tuneq/ never imports api/ or worker/ (tests/test_import_contracts.py).
API_APP = "api.app:create_app"
WORKER = "worker.main:run_worker"
BEAT = "worker.main:run_beat"
# Within Docker's default stop timeout (10 s), so the API shuts down before it is killed.
GRACEFUL_SHUTDOWN_SECONDS = 5


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # The servers log what they do; the commands a person runs print only their results.
    level = logging.INFO if args.run in (_api, _worker, _beat) else logging.WARNING
    configure_logging(level, request_ids=args.run is _api)  # the API's lines name their request
    settings = Settings()
    try:
        return int(args.run(settings, args) or 0)
    except TuneqError as err:
        print(f"error: {err.detail}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneq", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start the embedded stack in the background")
    up.set_defaults(run=_up)
    down = commands.add_parser("down", help="stop the embedded stack")
    down.set_defaults(run=_down)
    demo = commands.add_parser("demo", help="run the demo: a real fine-tuning job end to end")
    demo.add_argument(
        "--keep", action="store_true", help="leave the stack running at the end (`tuneq down`)"
    )
    demo.set_defaults(run=_demo)

    migrate = commands.add_parser("migrate", help="apply the database migrations")
    migrate.set_defaults(run=_migrate)

    api = commands.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", help="default: TUNEQ_HOST")
    api.add_argument("--port", type=int, help="default: TUNEQ_PORT")
    api.set_defaults(run=_api)

    worker = commands.add_parser("worker", help="run a training worker")
    worker.add_argument("--name", help="Celery node name (default: training@HOSTNAME)")
    worker.add_argument(
        "--queues",
        default="training",
        help="comma-separated queues to train from (a registry entry's `queue`; default: "
        "training); the worker answers generate requests on each one's inference queue, "
        "QUEUE-inference, too",
    )
    worker.set_defaults(run=_worker)

    beat = commands.add_parser(
        "beat", help="run the periodic outbox relay, lease reaper and webhook deliveries"
    )
    beat.set_defaults(run=_beat)

    admin = commands.add_parser("admin", help="teams and API keys")
    admin_commands = admin.add_subparsers(required=True, metavar="ACTION")
    team = admin_commands.add_parser("create-team", help="create a team")
    team.add_argument("name")
    team.set_defaults(run=_create_team)
    _add_build_image_model(admin_commands)
    key_commands.register(admin_commands)
    quota_commands.register(admin_commands)

    register_user_commands(commands)
    return parser


def _up(settings: Settings, _: argparse.Namespace) -> None:
    from tuneq.embedded import EmbeddedStack, local_key

    stack = EmbeddedStack.for_settings(settings)
    stack.start()
    try:
        stack.wait_ready()
    except BaseException:
        stack.stop()
        raise
    key = local_key(settings, "local")
    print(f"tuneq is up: API, worker and beat, state in {stack.home}")
    print(f"  API   {stack.url}")
    print(f"  docs  {stack.url}/docs")
    print(f"  logs  {stack.logs}")
    print("  key   for team 'local' (shown once; `tuneq down` stops everything)")
    print(f"TUNEQ_URL={stack.url}")
    print(f"TUNEQ_API_KEY={key}")


def _down(settings: Settings, _: argparse.Namespace) -> None:
    from tuneq.embedded import running_stack

    stack = running_stack(settings)
    if stack is None:
        print(f"no tuneq stack is running under {settings.home.resolve()}")
        return
    stopped = stack.stop()
    print(f"stopped {', '.join(stopped)}; state kept in {stack.home}")


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from tuneq.demo import run_demo

    return run_demo(settings, keep=args.keep)


def _migrate(settings: Settings, _: argparse.Namespace) -> None:
    from tuneq.migrate import upgrade

    _ensure_home(settings)
    upgrade(settings.resolved_database_url)
    print(f"database at head: {_redacted(settings.resolved_database_url)}")


def _api(settings: Settings, args: argparse.Namespace) -> None:
    _ensure_home(settings)
    serve_http(
        API_APP,
        factory=True,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
    )


def serve_http(app: Any, *, host: str, port: int, factory: bool = False) -> None:
    """Run an ASGI app under uvicorn the way `tuneq api` runs the control plane.

    bench/api_load.py serves its bare baseline endpoint through here too, so the two are
    measured under the same server settings.
    """
    import gc

    import uvicorn

    config = uvicorn.Config(
        app,
        factory=factory,
        host=host,
        port=port,
        proxy_headers=True,
        log_level="info",
        log_config=with_request_ids(uvicorn.config.LOGGING_CONFIG),
        # On SIGTERM, requests still running this long after are cancelled: an open event
        # stream never ends by itself (its client reconnects elsewhere with Last-Event-ID).
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    config.load()  # imports the app and its libraries; uvicorn does not load it again
    # What exists now lives as long as the process: keep it out of the garbage collector's
    # full passes, whose walks over it show up as p99 latency (bench/README.md).
    gc.collect()
    gc.freeze()
    # A request allocates a few hundred containers, nearly all freed with it: young
    # collections far rarer than Python's default cost less than they free (bench/README.md).
    gc.set_threshold(50_000, 20, 100)
    uvicorn.Server(config).run()


def _worker(settings: Settings, args: argparse.Namespace) -> None:
    _ensure_home(settings)
    _call_named(WORKER, settings, queues=args.queues, name=args.name)


def _beat(settings: Settings, _: argparse.Namespace) -> None:
    _ensure_home(settings)
    _call_named(BEAT, settings)


def _call_named(target: str, *args: Any, **kwargs: Any) -> Any:
    """Import `target` ("module:function") now, and call it."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(*args, **kwargs)


def _create_team(settings: Settings, args: argparse.Namespace) -> None:
    from tuneq.db import make_engine, make_sessionmaker, transaction
    from tuneq.teams.service import create_team

    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as db:
        team = create_team(db=db, name=args.name)
        print(f"created team {team.name} ({team.id})")


def _add_build_image_model(admin_commands: Any) -> None:
    build = admin_commands.add_parser(
        "build-image-model",
        help="build an image base model (MobileNetV2 pretrained on digits 0-4) and register it",
    )
    build.add_argument("--name", default="mobilenetv2-digits", help="its name in the registry")
    build.add_argument("--out", type=Path, help="default: TUNEQ_HOME/models/NAME")
    build.add_argument(
        "--registry",
        type=Path,
        help="the registry file to add it to (YAML or JSON; default: TUNEQ_MODEL_REGISTRY, "
        "else TUNEQ_HOME/models.yaml)",
    )
    build.add_argument("--epochs", type=int, default=PRETRAIN_EPOCHS, help="pretraining epochs")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--threads", type=int, default=1, help="torch threads")
    build.set_defaults(run=_build_image_model)


def _build_image_model(settings: Settings, args: argparse.Namespace) -> int:
    """Build, then register: a running API and worker read the changed registry file."""
    from peft_engine.errors import UserError
    from peft_engine.models.registry import register_model, with_entry
    from peft_engine.progress import quiet_library_output
    from tuneq.image_model import build_digits_model, registry_fields

    out = (args.out or settings.home / "models" / args.name).resolve()
    registry = (args.registry or settings.model_registry or settings.home / "models.yaml").resolve()
    try:
        with_entry(registry, args.name, registry_fields(out))  # fails now, not after the build
        quiet_library_output()
        print(f"building {args.name} ({args.epochs} epochs on digits 0-4) in {out} ...")
        built = build_digits_model(out, epochs=args.epochs, seed=args.seed, threads=args.threads)
        register_model(registry, args.name, registry_fields(out))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train, validation = built["samples"].values()
    print(f"model     {out} ({built['parameters']:,} parameters, {built['build_seconds']:.0f} s)")
    print(
        f"accuracy  {built['accuracy_recalibrated']:.3f} on {built['held_out_images']} "
        "held-out images of digits 0-4"
    )
    print(f"registry  {registry} (entry {args.name!r}, task image_classification)")
    print(f"samples   {train}\n          {validation}")
    if settings.resolved_model_registry != registry:
        print(f"  the service reads another registry: set TUNEQ_MODEL_REGISTRY={registry}")
    print("next (a running API and worker see the new entry without a restart):")
    print("  tuneq models list")
    print(
        f"  tuneq jobs create --model {args.name} --task image_classification "
        f"--method head_only --training-file {train} --validation-file {validation} --follow"
    )
    return 0


def _ensure_home(settings: Settings) -> None:
    settings.home.mkdir(parents=True, exist_ok=True)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
