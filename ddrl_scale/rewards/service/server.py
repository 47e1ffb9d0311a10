"""The reward service's HTTP server: reward loading, request handler, settings and ``serve``.

Security: the server binds 127.0.0.1 unless told otherwise, refuses to start without a
shared-secret token (from a file or an environment variable, so it does not show in ``ps``) and
compares tokens in constant time. It holds at most ``max_connections`` connections (one thread
each; a connection beyond that gets 503 at once) and a request must arrive whole within
``request_timeout_s`` (else 408), so slow or idle clients cannot pile up threads.
Traffic is plain HTTP: across machines, keep it on a trusted
network or behind a TLS proxy (the client accepts ``https://`` URLs).
"""

from __future__ import annotations

import contextlib
import hmac
import importlib
import ipaddress
import json
import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from ddrl_scale.config import ConfigError
from ddrl_scale.rewards.base import Reward, available_rewards, build_reward
from ddrl_scale.rewards.service.batcher import (
    RewardBatcher,
    _RewardFailure,
    _RewardInputError,
    _ShuttingDown,
)
from ddrl_scale.rewards.service.wire import HEALTH_PATH, SCORE_PATH, WireFormatError, decode_request

logger = logging.getLogger(__name__)

# After refusing a request before reading its body, the server reads and discards the body (up to
# its declared size, for at most this long, while the client keeps sending), so that the client,
# which reads the answer only once it has sent everything, gets the refusal instead of a
# connection reset (a "lingering close"). Discarding needs no memory.
_LINGER_S = 30.0


def load_reward(spec: str, kwargs: dict[str, Any] | None = None) -> Callable[..., torch.Tensor]:
    """Build the reward to host: ``module:Class`` (any class whose instances score
    ``(videos, prompts)``) or the name of a registered reward, called with ``kwargs``.

    Raises:
        ConfigError: the module, class or name cannot be found, or the kwargs do not fit.
    """
    kwargs = dict(kwargs or {})
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"--reward {spec}: cannot import module {module_name!r}: {error}") from None
        factory = getattr(module, attribute, None)
        if factory is None or not callable(factory):
            raise ConfigError(f"--reward {spec}: module {module_name!r} has no class {attribute!r}")
    else:
        import ddrl_scale.rewards  # noqa: F401  (registers the built-in rewards)

        if spec not in available_rewards():
            raise ConfigError(
                f"--reward {spec}: not a registered reward ({available_rewards()}) nor module:Class"
            )

        def factory(**kwargs: Any) -> Reward:
            return build_reward(spec, **kwargs)

    try:
        reward = factory(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--args {json.dumps(kwargs)} do not fit --reward {spec}: {error}") from None
    if not callable(reward):
        raise ConfigError(f"--reward {spec}: its instances must be callable as reward(videos, prompts)")
    return reward


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    server_version = "ddrl-reward/1"
    timeout = 120  # seconds a silent client may hold a connection (socket timeout)

    def do_GET(self) -> None:
        if self.path.split("?")[0] != HEALTH_PATH:
            self._reply(404, {"error": f"unknown path {self.path}; use GET {HEALTH_PATH}"})
            return
        self._reply(200, self.server.health())

    def setup(self) -> None:
        super().setup()
        # the whole request (headers and body) must arrive by this deadline: a client that sends a
        # byte now and then would otherwise hold its thread for `timeout` per byte
        self.arrival_expired = False
        self._watchdog = threading.Timer(self.server.request_timeout_s, self._arrival_deadline)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _arrival_deadline(self) -> None:
        self.arrival_expired = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RD)  # the blocked read returns; replies still go out

    def finish(self) -> None:
        self._watchdog.cancel()
        super().finish()

    def do_POST(self) -> None:
        with self.server.in_flight():
            self._score()

    def _score(self) -> None:
        if self.path != SCORE_PATH:
            self._refuse(404, f"unknown path {self.path}; use POST {SCORE_PATH}")
            return
        if not self.server.token_matches(self.headers.get("Authorization", "")):
            self.server.count("refused_token")
            self._refuse(401, "missing or wrong token (header 'Authorization: Bearer <token>')")
            return
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()):
            self.server.count("bad_requests")
            self._refuse(411, "a Content-Length header with the body size in bytes is required")
            return
        if int(length) > self.server.max_request_bytes:
            self.server.count("refused_size")
            self._refuse(413, f"request body of {int(length)} bytes exceeds the limit of "
                              f"{self.server.max_request_bytes} bytes (server option --max-request-mb)")
            return
        body = self.rfile.read(int(length))
        self._watchdog.cancel()  # arrived (or cut off): scoring time is not arrival time
        if self.arrival_expired:
            self.close_connection = True
            limit = self.server.request_timeout_s
            self._reply(408, {"error": f"the request did not arrive within {limit:g} s (server "
                                       f"option --request-timeout-s)"})
            return
        try:
            if len(body) != int(length):
                raise WireFormatError(f"body ended after {len(body)} of {length} bytes")
            videos, prompts = decode_request(body)
            scores = self.server.batcher.enqueue(videos, prompts).wait()
        except WireFormatError as error:
            self.server.count("bad_requests")
            self._reply(400, {"error": str(error)})
        except _RewardInputError as error:
            self._reply(422, {"error": f"the reward refused the input: {error}"})
        except _RewardFailure as error:
            self._reply(500, {"error": f"the reward failed: {error}"})
        except _ShuttingDown as error:
            self._reply(503, {"error": str(error)})
        else:
            self._reply(200, {"scores": scores})

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: int, message: str) -> None:
        """Answer before reading the body, then discard the body so the client sees the answer."""
        self.close_connection = True
        self._reply(status, {"error": message})
        self.wfile.flush()
        length = self.headers.get("Content-Length", "")
        # an unknown length: until the client stops sending
        remaining = int(length) if length.isascii() and length.isdigit() else 1 << 62
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            deadline = time.monotonic() + _LINGER_S
            while remaining > 0 and time.monotonic() < deadline:
                chunk = self.connection.recv(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass  # the client closed or went quiet: nothing more to do

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class RewardHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them (503 beyond); scoring goes
    through the shared ``RewardBatcher``."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], batcher: RewardBatcher, token: str,
                 max_request_bytes: int, description: str, max_connections: int = 64,
                 request_timeout_s: float = 60.0) -> None:
        super().__init__(address, _Handler)
        self.batcher, self.max_request_bytes, self.description = batcher, max_request_bytes, description
        self.max_connections, self.request_timeout_s = max_connections, request_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        # refusals waiting for their 503 (beyond these, a connection is closed without an answer)
        self._busy: queue.Queue[socket.socket] = queue.Queue(maxsize=max(16, max_connections))
        threading.Thread(target=self._answer_busy_connections, daemon=True).start()
        self._token = token.encode()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.counters = {"refused_token": 0, "refused_size": 0, "bad_requests": 0, "refused_busy": 0}

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Start the connection's thread if a slot is free; else answer 503 from here and close."""
        if not self._slots.acquire(blocking=False):
            self.count("refused_busy")
            try:  # one thread answers them all, so refusals cannot pile up threads either
                self._busy.put_nowait(request)
            except queue.Full:
                self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _answer_busy_connections(self) -> None:
        while True:
            request = self._busy.get()
            _answer_busy(request, self.max_connections)
            self.shutdown_request(request)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def token_matches(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        # compare_digest takes time independent of where the strings differ
        return scheme == "Bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                          self._token)

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a scoring request while it runs (shutdown waits for the count to reach 0)."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def busy(self) -> int:
        with self._lock:
            return self._in_flight

    def health(self) -> dict[str, Any]:
        with self._lock:
            counters = dict(self.counters, in_flight=self._in_flight)
        return {"status": "ok", "reward": self.description, "device": str(self.batcher.device),
                "max_batch": self.batcher.max_batch, "max_request_bytes": self.max_request_bytes,
                "max_connections": self.max_connections, "request_timeout_s": self.request_timeout_s,
                "stats": {**self.batcher.snapshot(), **counters}}


@dataclass
class ServiceSettings:
    """What ``ddrl reward-serve`` needs; see ``cli.configure_parser`` for the meaning of each field."""

    reward: str
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    token: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    max_batch: int = 16
    batch_window_ms: float = 10.0
    max_request_mb: float = 512.0
    drain_timeout_s: float = 30.0
    max_connections: int = 64
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "--port", "0..65535 (0 picks a free port)", self.port),
            (self.max_batch >= 1, "--max-batch", ">= 1", self.max_batch),
            (self.batch_window_ms >= 0, "--batch-window-ms", ">= 0", self.batch_window_ms),
            (self.max_request_mb > 0, "--max-request-mb", "> 0", self.max_request_mb),
            (self.drain_timeout_s >= 0, "--drain-timeout-s", ">= 0", self.drain_timeout_s),
            (self.max_connections >= 1, "--max-connections", ">= 1", self.max_connections),
            (self.request_timeout_s > 0, "--request-timeout-s", "> 0", self.request_timeout_s),
        ]
        for ok, option, expected, value in checks:
            if not ok:
                raise ConfigError(f"{option} must be {expected}, got {value}")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise ConfigError(f"--device {self.device!r} is not a torch device: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available in this process")


class RewardService:
    """A bound reward server: ``serve_forever()`` in one thread, ``close()`` from another."""

    def __init__(self, settings: ServiceSettings) -> None:
        if not settings.token:
            raise ConfigError("reward service: refusing to start without a shared-secret token")
        reward = load_reward(settings.reward, settings.reward_kwargs)
        device = torch.device(settings.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        self.settings = settings
        self.batcher = RewardBatcher(reward, device, settings.max_batch, settings.batch_window_ms / 1000)
        max_bytes = int(settings.max_request_mb * 2**20)
        self.httpd = RewardHTTPServer((settings.host, settings.port), self.batcher, settings.token,
                                      max_bytes, settings.reward, settings.max_connections,
                                      settings.request_timeout_s)
        self.batcher.start()
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{_url_host(str(host))}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def stop_listening(self) -> None:
        """Stop accepting connections (returns once ``serve_forever`` has returned)."""
        self.httpd.shutdown()

    def close(self, drain_timeout_s: float | None = None) -> None:
        """After ``stop_listening``: let requests in progress finish, then free everything."""
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        deadline = time.monotonic() + timeout
        while self.httpd.busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.httpd.busy():
            logger.warning("%d requests still in progress after %.0f s; stopping anyway",
                           self.httpd.busy(), timeout)
        self.batcher.stop(timeout=max(deadline - time.monotonic(), 0.1))
        self.httpd.server_close()


def _answer_busy(request: socket.socket, max_connections: int) -> None:
    """A complete 503 response, then what the client still sends is read and dropped for a moment
    (as `_Handler._refuse` does), so that it reads the answer instead of a connection reset."""
    data = json.dumps({"error": f"the reward service holds its maximum of {max_connections} "
                                f"connections (server option --max-connections); retry later"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        request.settimeout(0.5)
        request.sendall(head + data)
        request.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and request.recv(1 << 16):
            pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(settings: ServiceSettings) -> None:
    """Run the service until SIGTERM or SIGINT, then finish the requests in progress and exit.

    Prints ``reward-serve: listening on <url>`` (flushed) once the port is bound.
    """
    if not _is_loopback(settings.host):
        logger.warning("binding %s: the service is reachable from other machines over plain HTTP "
                       "(token included); use a trusted network or a TLS proxy", settings.host)
    service = RewardService(settings)
    stop_thread: list[threading.Thread] = []

    def on_signal(signum: int, frame: object) -> None:
        logger.info("%s: stopping after the requests in progress", signal.Signals(signum).name)
        for name in ("SIGTERM", "SIGINT"):  # a second signal stops at once
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        # shutdown() waits for serve_forever, which runs in this (the main) thread: call it elsewhere
        stop_thread.append(threading.Thread(target=service.stop_listening, daemon=True))
        stop_thread[0].start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"reward-serve: listening on {service.url} (reward {settings.reward}, device "
          f"{settings.device}, max batch {settings.max_batch})", flush=True)
    try:
        service.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    service.close()
    print("reward-serve: stopped", flush=True)

