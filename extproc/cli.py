"""``python -m extproc``: render-envoy, serve, up, demo, check-config, mock."""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from .config import ConfigError, load_config
from .envoy_render import (
    COMPOSE_PROCESSOR,
    RenderOptions,
    compose_options,
    needs_dns,
    render_bootstrap,
    render_snippet_yaml,
    render_yaml,
)
from .launcher import Stack, StackError


def _parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m extproc", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-config", help="load and validate a LiteLLM config file")
    check.add_argument("--config", required=True)

    render = sub.add_parser("render-envoy", help="write the Envoy bootstrap (or the pieces an existing Envoy needs)")
    render.add_argument("--config", required=True)
    render.add_argument("--target", choices=RENDER_TARGETS, default="local",
                        help="local: bootstrap for processes on this host; compose: bootstrap for a container "
                             "(listener on 0.0.0.0, processor 'processor:50051' by DNS); snippet: only the pieces "
                             "to merge into an existing Envoy (default: local)")
    render.add_argument("--out", help="output file (default: stdout)")
    render.add_argument("--port", type=int, default=10000, help="listener port")
    render.add_argument("--listen-address", help="listener address (default: 127.0.0.1; compose: 0.0.0.0)")
    render.add_argument("--admin-port", type=int, default=9901)
    render.add_argument("--processor", type=_parse_hostport, action="append",
                        help="processor HOST:PORT (repeatable; default 127.0.0.1:50051, compose: processor:50051); "
                             "a hostname makes the processor cluster STRICT_DNS")
    render.add_argument("--processor-socket", action="append", default=[],
                        help="processor Unix socket path, as given to `serve --socket` (repeatable; instead of "
                             "--processor)")
    render.add_argument("--ext-proc-socket", action="append", default=[],
                        help="the processors' lean ext_proc sockets (`serve --ext-proc-socket`), in --processor-socket "
                             "order; without them ext_proc goes to the processor sockets over grpc.aio")
    render.add_argument("--grpc-ext-proc", action="store_true",
                        help="send ext_proc to the processors' grpc.aio address (processors run with "
                             "--ext-proc-port 0) instead of their lean listener at port + 1")
    render.add_argument("--env-file", help="KEY=VALUE file supplying os.environ/NAME values the environment lacks "
                                           "(e.g. .env.example: keys never reach the Envoy config)")

    serve = sub.add_parser("serve", help="run the ext_proc processor alone (for an existing Envoy)")
    serve.add_argument("--config", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop",
                       help="uvloop (default) costs ~10%% less CPU per request than asyncio's own loop")
    serve.add_argument("--socket", help="listen on this Unix socket instead of --host/--port (Envoy on the same "
                                        "machine or in the same pod: less latency per request)")
    serve.add_argument("--ext-proc-port", type=int,
                       help="port of the lean ext_proc listener the rendered Envoy sends ext_proc to (default: "
                            "--port + 1; 0: none). --port serves cluster discovery, access logs, and ext_proc too, "
                            "over grpc.aio")
    serve.add_argument("--ext-proc-socket",
                       help="the lean ext_proc listener on this Unix socket (with --socket) instead of a port")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default: off)")
    serve.add_argument("--metrics-host", default="127.0.0.1",
                       help="address for /metrics (default loopback; 0.0.0.0 in a container or pod)")

    up = sub.add_parser("up", help="run Envoy and the processor together")
    _stack_arguments(up)

    demo = sub.add_parser("demo", help="up, plus local mock Azure deployments and a sample of requests")
    _stack_arguments(demo, default_config="config/demo.yaml")
    demo.add_argument("--requests", type=int, default=40, help="sample requests to send")
    demo.add_argument("--exit", action="store_true", help="exit after the sample instead of serving")

    sub.add_parser("mock", help="run a mock Azure OpenAI resource (flags: see `mock --help`)")

    redact = sub.add_parser("redact", help="copy stdin to stdout with the config's secrets and credential "
                                           "headers masked (pipe an Envoy you run yourself through it)")
    redact.add_argument("--config", required=True)
    return parser


def _stack_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    parser.add_argument("--config", required=default_config is None, default=default_config)
    parser.add_argument("--port", type=int, default=10000, help="listener port (default 10000)")
    parser.add_argument("--admin-port", type=int, help="Envoy admin port (default: a free port)")
    parser.add_argument("--processor-port", type=int,
                        help="first processor TCP port (default: Unix sockets in the run directory)")
    parser.add_argument("--processors", type=int, default=1, help="processor processes behind Envoy")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mock"]:  # its own flags, passed through unchanged
        from .mock_azure import main as mock_main

        return mock_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        config = load_config(args.config)
        print(f"{args.config}: {len(config.deployments)} deployments in model groups "
              f"{', '.join(config.groups)}; strategy {config.routing_strategy}")
        return 0
    if args.command == "render-envoy":
        text = _render_envoy(args)
        if args.out:
            Path(args.out).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "redact":
        from .redact import Redactor

        Redactor(load_config(args.config).secrets()).pump(sys.stdin.buffer, sys.stdout.buffer).join()
        return 0
    if args.command == "serve":
        from .server import serve

        run = asyncio.run
        if args.event_loop == "uvloop":
            import uvloop

            run = uvloop.run
        if args.socket is not None or args.ext_proc_port == 0:
            ext_proc_port = None
        else:
            ext_proc_port = args.port + 1 if args.ext_proc_port is None else args.ext_proc_port
        run(serve(args.config, args.host, args.port, args.metrics_port, args.metrics_host, args.socket,
                  ext_proc_port, args.ext_proc_socket))
        return 0
    if args.command == "up":
        return _up(args, demo=False)
    if args.command == "demo":
        return _up(args, demo=True)
    raise AssertionError(args.command)


RENDER_TARGETS = ("local", "compose", "snippet")


def _render_envoy(args: argparse.Namespace) -> str:
    environ = {**(read_env_file(args.env_file) if args.env_file else {}), **os.environ}
    config = load_config(args.config, environ=environ)
    if args.target == "compose":
        options = compose_options(
            listen_port=args.port, admin_port=args.admin_port,
            processors=tuple(args.processor or [COMPOSE_PROCESSOR]), listen_address=args.listen_address or "0.0.0.0",
        )
        if args.grpc_ext_proc:
            options = dataclasses.replace(options, ext_proc_processors=())
        return render_yaml(render_bootstrap(config, options))
    processors = tuple(args.processor or [("127.0.0.1", 50051)])
    options = RenderOptions(
        listen_address=args.listen_address or "127.0.0.1", listen_port=args.port, admin_port=args.admin_port,
        processors=processors, processor_dns=needs_dns(processors), processor_sockets=tuple(args.processor_socket),
        ext_proc_processors=() if args.grpc_ext_proc else None, ext_proc_sockets=tuple(args.ext_proc_socket),
    )
    if args.target == "snippet":
        return render_snippet_yaml(config, options)
    return render_yaml(render_bootstrap(config, options))


def read_env_file(path: str | Path) -> dict[str, str]:
    """A docker-compose style .env file: KEY=VALUE lines, # comments, optional quotes around the value."""
    values: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _up(args: argparse.Namespace, demo: bool) -> int:
    ports = [args.processor_port + i for i in range(args.processors)] if args.processor_port else []
    stack = Stack(Path(args.config), listen_port=args.port, admin_port=args.admin_port,
                  processor_ports=ports, processors=args.processors, inherit_output=True,
                  unix_sockets=not ports)
    mocks = _start_mocks(stack) if demo else []
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        stack.start()
        print(f"\nready: send OpenAI requests to {stack.base_url}/v1 (models: "
              f"{', '.join(stack.config.public_model_names())})")
        print(f"  Envoy admin {stack.admin_url}, processors on {', '.join(stack.processor_addresses)}, "
              f"logs and rendered config in {stack.run_dir}")
        if demo:
            _sample(stack, args.requests)
            if args.exit:
                return 0
        print("Ctrl-C stops everything; editing the config file (or SIGHUP) reloads it.", flush=True)
        _watch(stack)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        stack.stop()
        for proc in mocks:
            proc.terminate()
            proc.wait(5)
    return 0


def _watch(stack: Stack, interval_s: float = 1.0) -> None:
    """Serve until interrupted; reload when the config file changes or on SIGHUP."""
    requested = False

    def _hup(signum: int, _frame: object) -> None:
        nonlocal requested
        requested = True

    signal.signal(signal.SIGHUP, _hup)
    seen = stack.config_path.stat().st_mtime_ns
    while True:
        time.sleep(interval_s)
        try:
            mtime = stack.config_path.stat().st_mtime_ns
        except OSError:
            continue  # an editor replacing the file; look again next time
        if mtime == seen and not requested:
            continue
        seen, requested = mtime, False
        try:
            config = stack.reload()
        except (ConfigError, StackError) as exc:
            print(f"reload rejected, still serving the previous config:\n{exc}", file=sys.stderr, flush=True)
        else:
            print(f"reloaded {stack.config_path}: {len(config.deployments)} deployments", flush=True)


def _start_mocks(stack: Stack) -> list[subprocess.Popen[bytes]]:
    """One mock Azure resource per local api_base of the config, with that base's api-key."""
    resources: dict[tuple[str, int], str] = {}
    for dep in stack.config.deployments:
        if dep.host == "127.0.0.1" and not dep.tls:
            resources.setdefault((dep.host, dep.port), dep.api_key)
    procs: list[subprocess.Popen[bytes]] = []
    for (host, port), key in resources.items():
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc.mock_azure", "--host", host, "--port", str(port),
             "--api-key", key, "--name", f"mock-{port}"],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if "listening" not in line:
            proc.wait(5)
            for started in procs:
                started.terminate()
            raise StackError(f"the mock for {host}:{port} did not start (is the port in use?)")
        print(line)
        procs.append(proc)
    return procs


def _sample(stack: Stack, count: int) -> None:
    group = next(iter(stack.config.groups))
    served: collections.Counter[str] = collections.Counter()
    for i in range(count):
        body = orjson.dumps({"model": group, "messages": [{"role": "user", "content": f"hello {i}"}]})
        request = urllib.request.Request(
            f"{stack.base_url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            served[response.headers.get("x-llm-deployment", "?")] += 1
    print(f"\n{count} chat requests for model group {group!r} were served by:")
    bases = {dep.deployment: dep for dep in stack.config.groups[group]}
    for name, n in served.most_common():
        dep = bases.get(name)
        where = f" at {urlsplit(dep.api_base).netloc} (rpm {dep.rpm or '-'}, weight {dep.weight or '-'})" if dep else ""
        print(f"  {name:28s}{where}: {n:3d} {'#' * n}")
    print("\ntry: curl -s " + stack.base_url + "/v1/chat/completions -H 'content-type: application/json' "
          f"-d '{{\"model\": \"{group}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}'")
