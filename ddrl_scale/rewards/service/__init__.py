"""Reward service: host a reward model in its own process over HTTP, and score remotely.

Place in the data flow (docs/architecture.md): SDE rollouts -> decoded videos -> **rewards** ->
advantages. With ``ddrl reward-serve`` a reward (often a large model on its own GPUs) runs in a
separate process; the trainer or a rollout worker reaches it through ``RemoteReward`` (registered
as ``"remote"``), which behaves like any other ``Reward`` and can also score asynchronously
(``submit``) while the next rollout batch is generated.

Modules: ``wire`` (protocol, constants, errors, request codec), ``tokens`` (shared secret),
``batcher`` (server-side batching), ``server`` (HTTP server, ``serve``), ``client``
(``RewardClient``, ``RemoteReward``) and ``cli`` (``ddrl reward-serve``).
"""

from ddrl_scale.config import ConfigError
from ddrl_scale.rewards.service.batcher import RewardBatcher, ScoreJob
from ddrl_scale.rewards.service.batcher import _RewardInputError as _RewardInputError
from ddrl_scale.rewards.service.cli import (
    add_parser,
    configure_parser,
    main,
    run_from_args,
    settings_from_args,
)
from ddrl_scale.rewards.service.client import RemoteReward, RewardClient
from ddrl_scale.rewards.service.server import (
    RewardHTTPServer,
    RewardService,
    ServiceSettings,
    load_reward,
    serve,
)
from ddrl_scale.rewards.service.tokens import resolve_token
from ddrl_scale.rewards.service.wire import (
    DEFAULT_TOKEN_ENV,
    HEALTH_PATH,
    MIN_TOKEN_LENGTH,
    REQUEST_FORMAT,
    SCORE_PATH,
    WIRE_DTYPES,
    RewardServiceAuthError,
    RewardServiceError,
    RewardServiceRequestError,
    WireFormatError,
    decode_request,
    encode_request,
    wire_to_float,
)

__all__ = [
    "DEFAULT_TOKEN_ENV",
    "HEALTH_PATH",
    "MIN_TOKEN_LENGTH",
    "REQUEST_FORMAT",
    "SCORE_PATH",
    "WIRE_DTYPES",
    "ConfigError",
    "RemoteReward",
    "RewardBatcher",
    "RewardClient",
    "RewardHTTPServer",
    "RewardService",
    "RewardServiceAuthError",
    "RewardServiceError",
    "RewardServiceRequestError",
    "ScoreJob",
    "ServiceSettings",
    "WireFormatError",
    "add_parser",
    "configure_parser",
    "decode_request",
    "encode_request",
    "load_reward",
    "main",
    "resolve_token",
    "run_from_args",
    "serve",
    "settings_from_args",
    "wire_to_float",
]
