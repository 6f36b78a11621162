"""The `strata` command: serve, chat, bench, deploy, status, config render.

    strata serve [MODEL] [--tp N] [--pp N] [--min-replicas N] [--max-replicas N] [--host H] [--port P]
                 [--config FILE] [--address ADDR] [--log-level LEVEL] [any ModelConfig / ClusterConfig key as --flag]
    strata chat [MODEL] [--url URL] [--api-key KEY] [--system TEXT]   (cluster/chat.py)
    strata bench [--base-url URL] [--model NAME] [vllm bench serve's flags]   (cluster/bench.py)
    strata deploy CONFIG.yaml [--address ADDR]
    strata status [--address ADDR] [--app-name NAME]
    strata config render [MODEL] [--config FILE] [flags]

Flags are generated from the pydantic config models (cluster/config.py): every key `some_key` of a model,
of `http` and of `limits` is `--some-key`; precedence is defaults < --config file < flags.
Bad input prints one line and exits with status 2. `strata serve` prints the URL, the models ready, and the
warnings and errors of every process; `--log-level debug` adds Ray's and Serve's own lines.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import types
import typing
from pathlib import Path

import yaml
from pydantic import ValidationError

from cluster.bench import add_bench_parser
from cluster.chat import add_chat_parser
from cluster.config import ClusterConfig, HTTPConfig, LimitsConfig, ModelConfig, load_yaml
from cluster.serve_env import (LOG_LEVELS, configure_logging, delete_and_wait_for_port, logging_ray_init_kwargs,
                               serves_http_directly, start_local)

logger = logging.getLogger("strata")

APP_BUILDER = "cluster.app:build_app"
FLAG_ALIASES = {"tensor_parallel_size": ["--tp"], "pipeline_parallel_size": ["--pp"], "api_keys": ["--api-key"],
                "name": ["--served-model-name"]}
# Which keys become flags, and where their values go: (schema, section of the config, keys left out).
FLAG_SECTIONS = [(ModelConfig, "model", {"model"}), (HTTPConfig, "http", set()), (LimitsConfig, "limits", set()),
                 (ClusterConfig, "cluster", {"models", "http", "limits"})]


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


# -- flags from the schema ------------------------------------------------------------------------------------
def _flag_options(annotation) -> dict:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_options(inner[0]) if len(inner) == 1 else {"type": str}
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return {"action": "append", "type": typing.get_args(annotation)[0]}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for schema, section, skipped in FLAG_SECTIONS:
        group = parser.add_argument_group(f"{section} options")
        for key, field in schema.model_fields.items():
            if key in skipped:
                continue
            names = ["--" + key.replace("_", "-")] + FLAG_ALIASES.get(key, [])
            default = field.get_default(call_default_factory=False)
            help_text = f"{field.description or ''} (default: {default})".strip()
            options = _flag_options(field.annotation)
            metavar = None if "choices" in options or options.get("action") is argparse.BooleanOptionalAction \
                else key.upper()
            group.add_argument(*names, dest=f"{section}.{key}", default=argparse.SUPPRESS, help=help_text,
                               metavar=metavar, **options)


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """defaults < the --config file < flags (and the positional MODEL)."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if "." in k}
    model_keys = {k.split(".", 1)[1]: v for k, v in flags.items() if k.startswith("model.")}
    if getattr(args, "model", None):
        model_keys["model"] = args.model
    if model_keys:
        models = data.get("models") or [{}]
        if len(models) != 1:
            raise UsageError(f"model flags ({', '.join(sorted(model_keys))}) apply to one model, but the config "
                             f"lists {len(models)}: set them in the config file instead")
        data["models"] = [{**models[0], **model_keys}]
    for key, value in flags.items():
        section, _, name = key.partition(".")
        if section in ("http", "limits"):
            data.setdefault(section, {})[name] = value
        elif section == "cluster":
            data[name] = value
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise UsageError(validation_message(e)) from None


def validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid config: {where + ': ' if where else ''}{message}{more}"


def check_models_exist(config: ClusterConfig) -> None:
    """Fail fast on a model path that is not there (hub ids and built-in names are checked by the replicas)."""
    from engine.builtin_models import builtin_name

    for m in config.models:
        looks_like_path = m.model.startswith(("/", "./", "../", "~")) or m.model.endswith("/")
        if builtin_name(m.model) is None and looks_like_path and not Path(m.model).expanduser().is_dir():
            raise UsageError(f"model directory {m.model!r} does not exist")


# -- commands -------------------------------------------------------------------------------------------------
def serve_command(args) -> int:
    config = config_from_args(args)
    check_models_exist(config)
    import ray
    from ray import serve

    from cluster.app import build_app

    configure_logging(args.log_level)
    names = ", ".join(m.served_name for m in config.models)
    logging_kwargs = logging_ray_init_kwargs(args.log_level)
    if args.address is None:  # always a new cluster of our own, never one left running
        logger.info("starting Ray on this machine and deploying %s", names)
        http_options = start_local(config, **logging_kwargs)
    else:
        logger.info("joining the Ray cluster at %s and deploying %s", args.address, names)
        ray.init(address=args.address, **logging_kwargs)
        http_options = {"host": config.http.host, "port": config.http.port}
    # Ctrl-C and SIGTERM stop it even where SIGINT came in ignored (a process started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options=http_options)
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        print(f"Strata is serving {names} at {base_url(config)} (OpenAI API under /v1). Press Ctrl-C to stop.",
              flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping...", flush=True)
    except Exception as e:  # noqa: BLE001 - a failed deployment: one line, not Serve's traceback
        print(f"strata serve: deployment failed: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The app's replicas drain; a cluster of our own then goes with ray.shutdown (serve.shutdown would add
        # Ray's notice that the controller's shutdown task died with the controller).
        serve.delete(config.app_name)
        ray.shutdown()
    return 0


def deploy_command(args) -> int:
    data = load_yaml(args.file)
    if "applications" in data:  # a Serve config file (e.g. from `strata config render`)
        apps = [a for a in data["applications"] if a.get("import_path") == APP_BUILDER]
        if len(apps) != 1:
            raise UsageError(f"{args.file}: expected one application with import_path {APP_BUILDER}")
        data = apps[0].get("args") or {}
    try:
        config = ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise UsageError(validation_message(e)) from None
    import ray
    from ray import serve

    from cluster.app import build_app

    ray.init(address=args.address or "auto")
    try:
        serve.start(http_options={"host": config.http.host, "port": config.http.port})
        if serves_http_directly(config.app_name):
            logger.warning("this cluster's ingress serves HTTP itself: redeploying restarts %s (requests in flight "
                           "finish first; new ones are refused until it is back)", config.app_name)
            delete_and_wait_for_port(config.app_name, config.http.host, config.http.port)
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
    except Exception as e:  # noqa: BLE001
        print(f"strata deploy: deployment failed: {_one_line(e)}", file=sys.stderr)
        return 1
    print(f"deployed {', '.join(m.served_name for m in config.models)} at {base_url(config)}")
    return 0


def status_command(args) -> int:
    import ray
    from ray import serve

    from cluster.app import INGRESS_NAME

    ray.init(address=args.address or "auto", log_to_driver=False)
    app = serve.status().applications.get(args.app_name)
    if app is None:
        print(f"strata status: no application {args.app_name!r} is running on this cluster", file=sys.stderr)
        return 1
    print(f"application {args.app_name}: {_enum_name(app.status)}")
    print(f"{'MODEL':<28} {'STATUS':<10} {'REPLICAS':<9} {'WAITING':>7} {'RUNNING':>7} {'KV USE':>7} "
          f"{'PREFIX HIT':>10}")
    for name, deployment in sorted(app.deployments.items()):
        running = sum(n for state, n in deployment.replica_states.items() if _enum_name(state) == "RUNNING")
        # The ingress runs an engine itself only with engine_in_ingress.
        method = "local_engine_stats" if name == INGRESS_NAME else "engine_stats"
        try:
            stats = serve.get_deployment_handle(name, args.app_name).broadcast(method).results(
                timeout_s=10, return_exceptions=True)
        except Exception:  # noqa: BLE001 - no replica: scaled to zero or starting
            stats = []
        stats = [s for r in stats for s in (r if isinstance(r, list) else [r]) if isinstance(s, dict)]
        if name == INGRESS_NAME and not stats:
            continue
        model = stats[0]["model"] if stats else name.removeprefix("EngineReplica-")
        print(f"{model:<28} {_enum_name(deployment.status):<10} {running:<9} {sum(s['waiting'] for s in stats):>7} "
              f"{sum(s['running'] for s in stats):>7} {_mean(stats, 'kv_cache_usage'):>7.1%} "
              f"{_mean(stats, 'prefix_cache_hit_rate'):>10.1%}")
        for s in stats:
            print(f"  replica {s['replica']:<17} {'ok' if s['healthy'] else 'UNHEALTHY':<10} {'':<9} "
                  f"{s['waiting']:>7} {s['running']:>7} {s['kv_cache_usage']:>7.1%} "
                  f"{s['prefix_cache_hit_rate']:>10.1%}")
    return 0


def render_command(args) -> int:
    config = config_from_args(args)
    args_dump = config.model_dump(mode="json", exclude_unset=True)
    args_dump["models"] = [{"model": m.model, **m.model_dump(mode="json", exclude_unset=True)} for m in config.models]
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.http.host, "port": config.http.port},
        "applications": [{"name": config.app_name, "route_prefix": "/", "import_path": APP_BUILDER,
                          "args": args_dump}],
    }
    print(f"# Serve config for Strata: `serve deploy` this file, or `strata deploy` it.\n"
          f"# `args` are ClusterConfig keys (cluster/config.py); unset keys take their defaults.")
    print(yaml.safe_dump(serve_config, sort_keys=False), end="")
    return 0


# -- plumbing -------------------------------------------------------------------------------------------------
def _enum_name(value) -> str:
    return str(getattr(value, "value", value))


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _mean(stats: list[dict], key: str) -> float:
    return sum(s[key] for s in stats) / len(stats) if stats else 0.0


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def base_url(config: ClusterConfig) -> str:
    host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::") else config.http.host
    return f"http://{host}:{config.http.port}"


def build_parser() -> Parser:
    parser = Parser(prog="strata", description="Strata: an LLM serving cluster on Ray Serve (OpenAI API).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    serve_p = commands.add_parser("serve", help="Start (or join with --address) a Ray cluster and serve, "
                                                "in the foreground.")
    serve_p.add_argument("model", nargs="?", help="Model to serve: built-in name, local HF directory or HF repo id "
                                                  "(default: smollm2-135m-instruct).")
    serve_p.add_argument("--config", help="ClusterConfig YAML file; flags override its keys.")
    serve_p.add_argument("--address", help="Join this Ray cluster (e.g. auto, or host:6379) instead of starting one.")
    serve_p.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                         help="Console detail: Strata's lines from this level on; Ray's and Serve's own INFO lines "
                              "only with debug (default: info).")
    add_config_flags(serve_p)
    serve_p.set_defaults(run=serve_command)

    add_chat_parser(commands)
    add_bench_parser(commands)

    deploy_p = commands.add_parser("deploy", help="Deploy a config onto a running Ray cluster and return.")
    deploy_p.add_argument("file", help="ClusterConfig YAML, or a Serve config from `strata config render`.")
    deploy_p.add_argument("--address", help="Ray cluster address (default: auto).")
    deploy_p.set_defaults(run=deploy_command)

    status_p = commands.add_parser("status", help="Replicas, queue depth and KV usage of each served model.")
    status_p.add_argument("--address", help="Ray cluster address (default: auto).")
    status_p.add_argument("--app-name", default="strata", help="Serve application name (default: strata).")
    status_p.set_defaults(run=status_command)

    config_p = commands.add_parser("config", help="Config tools.")
    config_commands = config_p.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    render_p = config_commands.add_parser("render", help="Print the Serve config YAML for a config file or flags.")
    render_p.add_argument("model", nargs="?", help="Model to serve (as for `strata serve`).")
    render_p.add_argument("--config", help="ClusterConfig YAML file; flags override its keys.")
    add_config_flags(render_p)
    render_p.set_defaults(run=render_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as e:
        print(f"{e}" if str(e).startswith("strata") else f"strata: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # config file missing or malformed
        print(f"strata: error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # --address / auto found no Ray cluster
        # Ray turns token authentication on by itself only for a cluster it finds (auto), never for an address.
        hint = " (a cluster with token authentication, such as one `strata serve` starts, needs RAY_AUTH_MODE=token " \
               "with an explicit address)" if os.environ.get("RAY_AUTH_MODE") is None else ""
        print(f"strata: error: cannot reach the Ray cluster ({_one_line(e)}){hint}; start one with `ray start "
              "--head` or use `strata serve`", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
