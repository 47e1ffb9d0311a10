"""Command line of the reward service: ``ddrl reward-serve`` or ``python -m ddrl_scale.rewards.service``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ddrl_scale.config import ConfigError
from ddrl_scale.rewards.service.server import ServiceSettings, serve
from ddrl_scale.rewards.service.tokens import resolve_token
from ddrl_scale.rewards.service.wire import DEFAULT_TOKEN_ENV

logger = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``reward-serve`` options to ``parser``."""
    parser.add_argument("--reward", required=True,
                        help="module:Class of the reward to host, or a registered reward name")
    parser.add_argument("--args", default="{}", help="JSON object of keyword arguments for the reward")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (0: a free one, printed)")
    parser.add_argument("--device", default="cpu", help="where videos go for scoring: cpu, cuda, cuda:1")
    parser.add_argument("--token-file", default=None, help="file holding the shared-secret token")
    parser.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                        help=f"environment variable holding the token (default {DEFAULT_TOKEN_ENV})")
    parser.add_argument("--token", default=None,
                        help="the token itself (visible in ps: prefer --token-file or --token-env)")
    parser.add_argument("--max-batch", type=int, default=16, help="most videos scored at once")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long an idle worker waits for more requests to batch")
    parser.add_argument("--max-request-mb", type=float, default=512.0,
                        help="largest request body in MiB (413 beyond)")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="on SIGTERM/SIGINT, how long to let requests in progress finish")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="connections held at once, one thread each (503 beyond)")
    parser.add_argument("--request-timeout-s", type=float, default=60.0,
                        help="time a request (headers and body) may take to arrive (408 beyond)")


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """Validated settings from parsed ``reward-serve`` options (token resolved)."""
    try:
        kwargs = json.loads(args.args)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--args must be a JSON object, got {args.args!r}: {error}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--args must be a JSON object, got {args.args!r}")
    if args.token is not None:
        logger.warning("--token is visible to other users in ps; prefer --token-file or --token-env")
    token = resolve_token(args.token, args.token_file, args.token_env, where="ddrl reward-serve")
    return ServiceSettings(reward=args.reward, reward_kwargs=kwargs, token=token, host=args.host,
                           port=args.port, device=args.device, max_batch=args.max_batch,
                           batch_window_ms=args.batch_window_ms, max_request_mb=args.max_request_mb,
                           drain_timeout_s=args.drain_timeout_s, max_connections=args.max_connections,
                           request_timeout_s=args.request_timeout_s)


def run_from_args(args: argparse.Namespace) -> None:
    """The ``reward-serve`` handler: validate, then serve until SIGTERM/SIGINT."""
    from ddrl_scale.runtime import setup

    setup(0)
    settings = settings_from_args(args)  # bad input fails before the reward is built
    # like other app servers, find module:Class in the working directory too
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    serve(settings)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``reward-serve`` to the ``ddrl`` command's subparsers (its handler: ``run_from_args``)."""
    parser = subparsers.add_parser("reward-serve", help="host a reward model over HTTP, with batching")
    configure_parser(parser)
    parser.set_defaults(handler=run_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m ddrl_scale.rewards.service``: same options as ``ddrl reward-serve``."""
    parser = argparse.ArgumentParser(prog="ddrl reward-serve", description="host a reward over HTTP")
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except (ConfigError, OSError) as error:  # bad input, or the port cannot be bound
        print(f"ddrl reward-serve: error: {error}", file=sys.stderr)
        return 2
    return 0

