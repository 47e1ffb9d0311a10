"""Reward service client: ``RewardClient`` and the ``"remote"`` reward built on it."""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ddrl_scale.rewards.base import Reward, check_videos, register_reward
from ddrl_scale.rewards.service.tokens import resolve_token
from ddrl_scale.rewards.service.wire import (
    DEFAULT_TOKEN_ENV,
    HEALTH_PATH,
    SCORE_PATH,
    WIRE_DTYPES,
    RewardServiceAuthError,
    RewardServiceError,
    RewardServiceRequestError,
    encode_request,
)

logger = logging.getLogger(__name__)


class RewardClient:
    """Scores videos on a reward service, with timeouts and retries.

    Args:
        url: ``http://host:port`` (or ``https://``) of ``ddrl reward-serve``.
        token: the server's shared secret.
        timeout_s: limit for connecting and for each wait on the socket, seconds; it must cover
            the server's scoring time of one batch.
        retries: further attempts after a failed one on connection errors, timeouts, HTTP 5xx,
            408 and 429 (others fail at once); ``retries + 1`` attempts in all.
        backoff_s: wait before the first retry; doubled each retry (up to ``max_backoff_s``), plus
            up to 25% random jitter so that many workers do not retry in step.
        wire_dtype: ``"float16"``, ``"uint8"`` or ``"float32"`` (see ``ddrl_scale.rewards.service.wire``).
    """

    def __init__(self, url: str, token: str, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, wire_dtype: str = "float16") -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"reward service url must look like http://host:port, got {url!r}")
        if not token:
            raise ValueError(f"reward service {url}: an empty token; give the server's shared secret")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError(f"reward service {url}: need timeout_s > 0 and retries, backoff_s, "
                             f"max_backoff_s >= 0; got {timeout_s}, {retries}, {backoff_s}, {max_backoff_s}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.url = url.rstrip("/")
        self._parts = parts
        self._token = token
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.wire_dtype = wire_dtype

    def __repr__(self) -> str:  # never shows the token
        return f"RewardClient({self.url!r}, wire_dtype={self.wire_dtype!r}, retries={self.retries})"

    def score(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores of float ``(B, 3, T, H, W)`` videos in [0, 1]: float32 ``(B,)`` on ``videos.device``.

        Raises:
            RewardServiceAuthError: the token was refused.
            RewardServiceRequestError: the server refused the request (400, 413, 422, ...).
            RewardServiceError: the service failed ``retries + 1`` times (names URL and cause).
        """
        check_videos(videos, prompts)
        if videos.shape[0] == 0:
            return torch.zeros(0, device=videos.device)
        body = encode_request(videos, prompts, self.wire_dtype)
        return torch.tensor(self.score_encoded(body, len(prompts)), dtype=torch.float32,
                            device=videos.device)

    def score_encoded(self, body: bytes, count: int) -> list[float]:
        """Send a body made by ``encode_request`` with ``count`` videos; the ``count`` scores."""
        attempts, last_cause = self.retries + 1, ""
        for attempt in range(1, attempts + 1):
            try:
                status, payload = self._request("POST", SCORE_PATH, body)
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out
                last_cause = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            else:
                if status == 200:
                    return self._parse_scores(payload, count)
                message = _error_message(payload)
                if status == 401:
                    raise RewardServiceAuthError(
                        f"reward service {self.url} refused the token (HTTP 401: {message}); "
                        f"give the client the server's shared secret")
                if status < 500 and status not in (408, 429):
                    raise RewardServiceRequestError(
                        f"reward service {self.url} rejected the request (HTTP {status}): {message}")
                last_cause = f"HTTP {status}: {message}"
            if attempt < attempts:
                delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                delay *= 1 + 0.25 * random.random()
                logger.warning("reward service %s: attempt %d/%d failed (%s); retrying in %.2f s",
                               self.url, attempt, attempts, last_cause, delay)
                time.sleep(delay)
        raise RewardServiceError(f"reward service {self.url} failed after {attempts} "
                                 f"attempt{'s' if attempts > 1 else ''}; last cause: {last_cause}")

    def health(self) -> dict[str, Any]:
        """``GET /health`` once (no retries): the server's reward, limits and counters."""
        try:
            status, payload = self._request("GET", HEALTH_PATH, None)
        except (OSError, http.client.HTTPException) as error:
            raise RewardServiceError(f"reward service {self.url} health check failed: "
                                     f"{type(error).__name__}: {error}") from error
        if status != 200:
            raise RewardServiceError(f"reward service {self.url} health check: HTTP {status}: "
                                     f"{_error_message(payload)}")
        try:
            return json.loads(payload)
        except ValueError:
            raise RewardServiceError(f"reward service {self.url} health check: not JSON: "
                                     f"{payload[:200]!r}") from None

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        connection_class = (http.client.HTTPSConnection if self._parts.scheme == "https"
                            else http.client.HTTPConnection)
        connection = connection_class(self._parts.hostname, self._parts.port, timeout=self.timeout_s)
        headers = {"Authorization": f"Bearer {self._token}"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        try:
            try:
                connection.request(method, self._parts.path.rstrip("/") + path, body=body,
                                   headers=headers)
            except (BrokenPipeError, ConnectionResetError) as send_error:
                # the server may have answered (401, 413) and closed before taking the whole body
                try:
                    response = connection.getresponse()
                except (OSError, http.client.HTTPException):
                    raise send_error from None
            else:
                response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _parse_scores(self, payload: bytes, count: int) -> list[float]:
        try:
            scores = json.loads(payload)["scores"]
            if len(scores) == count and all(isinstance(s, (int, float)) for s in scores):
                return [float(s) for s in scores]
        except (ValueError, KeyError, TypeError):
            pass
        raise RewardServiceError(f"reward service {self.url} answered 200 without {count} scores: "
                                 f"{payload[:200]!r}")


def _error_message(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["error"])
    except (ValueError, KeyError, TypeError):
        return payload[:200].decode("utf-8", "replace") or "(empty answer)"



class RemoteReward(Reward):
    """A reward computed by ``ddrl reward-serve``: use it in configs like any other reward::

        {name: remote, weight: 1, args: {url: "http://127.0.0.1:8765", token_env: DDRL_REWARD_TOKEN}}

    Without ``url`` the address comes from ``$DDRL_REWARD_URL`` (``url_env``), which the SLURM
    script sets when the job has a reward node (``launch.reward_nodes=1``).
    Give the token through ``token_env`` (default ``DDRL_REWARD_TOKEN``) or ``token_file``: a
    ``token`` written in the config would be saved with the run's expanded config.

    ``submit(videos, prompts)`` scores in a background thread and returns a ``Future``, so a
    rollout worker can score batch k while generating batch k+1; the videos are encoded before
    ``submit`` returns, so the caller may reuse their memory at once.
    """

    def __init__(self, url: str = "", token: str | None = None, token_env: str | None = DEFAULT_TOKEN_ENV,
                 token_file: str | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, wire_dtype: str = "float16",
                 max_in_flight: int = 2, url_env: str = "DDRL_REWARD_URL") -> None:
        # no url: take it from the environment, where the SLURM script puts the reward node's
        url = url or os.environ.get(url_env, "")
        if not url:
            raise ValueError(f"remote reward: no url given and ${url_env} is not set")
        if max_in_flight < 1:
            raise ValueError(f"remote reward: max_in_flight must be >= 1, got {max_in_flight}")
        secret = resolve_token(token, token_file, token_env, where=f"remote reward {url}")
        self.client = RewardClient(url, secret, timeout_s, retries, backoff_s, max_backoff_s, wire_dtype)
        self.max_in_flight = max_in_flight
        self._executor: ThreadPoolExecutor | None = None

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.client.score(videos, prompts)

    def submit(self, videos: torch.Tensor, prompts: list[str]) -> Future[torch.Tensor]:
        """Start scoring; the ``Future`` gives float32 ``(B,)`` on ``videos.device`` or raises
        ``RewardServiceError``."""
        check_videos(videos, prompts)
        body = encode_request(videos, prompts, self.client.wire_dtype)  # a snapshot of the pixels
        device, count = videos.device, len(prompts)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="remote-reward")

        def score() -> torch.Tensor:
            scores = self.client.score_encoded(body, count)
            return torch.tensor(scores, dtype=torch.float32, device=device)

        return self._executor.submit(score)

    def close(self) -> None:
        """Wait for submitted scores and end the background threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# Registered once: `python -m ddrl_scale.rewards.service` runs the package's __main__.py, not this
# module, so this module is only ever imported under its own name.
register_reward("remote")(RemoteReward)
