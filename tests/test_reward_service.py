"""Tests for the reward service (ddrl_scale.rewards.service): a real server in a subprocess hosting
``caption_alignment``; its scores over HTTP against the in-process reward, batching, the token,
the size limit, bad bodies, graceful shutdown, and a frozen or killed server."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ddrl_scale.data.synthetic import make_samples
from ddrl_scale.rewards import WeightedRewards, build_reward
from ddrl_scale.rewards import service as rs

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
# Remote scores equal the in-process reward on the same float32 input up to this: the server runs
# the same float32 code; only the batch it is part of may differ, which per-video reductions ignore.
ATOL = 1e-6


def _videos(num: int, seed: int = 3, noise: float = 0.02) -> tuple[torch.Tensor, list[str]]:
    """``num`` demo clips (1..num, 3, 8, 16, 16) float in [0, 1] with captions, plus a little noise so
    that the wire dtypes round differently."""
    clips, prompts = [], []
    for _, video, text, _ in make_samples(num, seed=seed):
        clips.append(torch.from_numpy(video).permute(3, 0, 1, 2).float() / 255)
        prompts.append(text)
    videos = torch.stack(clips)
    videos = (videos + noise * torch.randn(videos.shape, generator=torch.Generator().manual_seed(seed)))
    return videos.clamp(0, 1), prompts


@dataclass
class _Server:
    process: subprocess.Popen
    url: str = ""
    stdout: queue.Queue = field(default_factory=queue.Queue)
    stderr: list[str] = field(default_factory=list)

    def client(self, **options) -> rs.RewardClient:
        options = {"timeout_s": 10.0, "retries": 0, "backoff_s": 0.05, **options}
        return rs.RewardClient(self.url, options.pop("token", TOKEN), **options)

    def stats(self) -> dict:
        return self.client().health()["stats"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _start_server(*options: str) -> _Server:
    """``python -m ddrl_scale.rewards.service`` on a free port, token from the environment."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DDRL_REWARD_TOKEN=TOKEN)
    command = [sys.executable, "-m", "ddrl_scale.rewards.service", "--reward", "caption_alignment",
               "--port", "0", *options]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    server = _Server(process)
    # reader threads, so a full pipe never blocks the server and a silent one never blocks us
    threading.Thread(target=lambda: [server.stdout.put(line) for line in process.stdout],
                     daemon=True).start()
    threading.Thread(target=lambda: server.stderr.extend(process.stderr), daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = server.stdout.get(timeout=0.1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        if "listening on " in line:
            server.url = line.split("listening on ")[1].split()[0]
            return server
    server.stop()
    pytest.fail(f"reward server did not start: {''.join(server.stderr)[-2000:]}")


def _wait_in_flight(server: _Server, count: int = 1, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.stats()["in_flight"] < count:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server():
    """One server for the module: small batches gathered over 200 ms, requests up to 1 MiB."""
    running = _start_server("--max-batch", "8", "--batch-window-ms", "200", "--max-request-mb", "1")
    yield running
    running.process.send_signal(signal.SIGTERM)
    try:
        running.process.wait(15)
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------------
# In-process: wire format, token, batcher


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "uint8"])
def test_wire_round_trip(wire_dtype):
    videos, prompts = _videos(2)
    wire, decoded_prompts = rs.decode_request(rs.encode_request(videos, prompts, wire_dtype))
    assert wire.dtype == rs.WIRE_DTYPES[wire_dtype] and decoded_prompts == prompts
    restored = rs.wire_to_float(wire)
    # the stated error bounds of each wire dtype (module docstring)
    bound = {"float32": 0.0, "float16": 2.5e-4, "uint8": 1 / 510 + 1e-7}[wire_dtype]
    assert restored.dtype == torch.float32 and (restored - videos).abs().max() <= bound
    if wire_dtype == "uint8":
        torch.testing.assert_close(restored * 255, (restored * 255).round(), atol=1e-4, rtol=0)


def _body(videos: torch.Tensor, metadata: dict[str, str]) -> bytes:
    return safetensors.torch.save({"videos": videos}, metadata=metadata)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"short", "too short"),
        (b"\xff" * 64, "header runs past the end"),
        (_body(torch.zeros(1, 3, 2, 4, 4), {"format": "other"}), "'format' must be"),
        (_body(torch.zeros(1, 3, 2, 4, 4), {"format": rs.REQUEST_FORMAT}), "list of strings"),
        (_body(torch.zeros(2, 3, 2, 4, 4), {"format": rs.REQUEST_FORMAT, "prompts": '["a"]'}),
         "got 2 videos but 1 prompts"),
        (_body(torch.zeros(1, 4, 2, 4, 4), {"format": rs.REQUEST_FORMAT, "prompts": '["a"]'}),
         "shape (B, 3, T, H, W)"),
        (_body(torch.zeros(1, 3, 2, 4, 4, dtype=torch.int32),
               {"format": rs.REQUEST_FORMAT, "prompts": '["a"]'}), "dtype must be"),
        (_body(torch.full((1, 3, 2, 4, 4), float("nan")),
               {"format": rs.REQUEST_FORMAT, "prompts": '["a"]'}), "NaN"),
        (_body(torch.full((1, 3, 2, 4, 4), 1.5), {"format": rs.REQUEST_FORMAT, "prompts": '["a"]'}),
         "values must lie in [0, 1] (pixels), got min 1.5, max 1.5"),
        (_body(torch.full((1, 3, 2, 4, 4), -0.25, dtype=torch.float16),
               {"format": rs.REQUEST_FORMAT, "prompts": '["a"]'}), "must lie in [0, 1]"),
    ],
)
def test_decode_rejects_bad_bodies(body, expected):
    with pytest.raises(rs.WireFormatError, match=re.escape(expected)):
        rs.decode_request(body)


def test_resolve_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("DDRL_TEST_TOKEN", TOKEN)
    assert rs.resolve_token(token_env="DDRL_TEST_TOKEN") == TOKEN
    token_file = tmp_path / "token"
    file_token = "file-token-0123456789abcdef"
    token_file.write_text(file_token + "\n")
    token_file.chmod(0o600)
    # a file given explicitly wins over the environment
    assert rs.resolve_token(token_file=token_file, token_env="DDRL_TEST_TOKEN") == file_token
    with pytest.raises(rs.ConfigError, match="not both"):
        rs.resolve_token(token=TOKEN, token_file=token_file)
    with pytest.raises(rs.ConfigError, match="no shared-secret token"):
        rs.resolve_token(token_env="DDRL_TEST_UNSET_TOKEN")
    with pytest.raises(rs.ConfigError, match="at least 16"):
        rs.resolve_token(token="short")
    with pytest.raises(rs.ConfigError, match="cannot read the token file"):
        rs.resolve_token(token_file=tmp_path / "missing")


def test_server_refuses_to_start_without_token_or_with_bad_input(monkeypatch, capsys):
    monkeypatch.delenv("DDRL_REWARD_TOKEN", raising=False)
    assert rs.main(["--reward", "caption_alignment"]) == 2
    assert "no shared-secret token" in capsys.readouterr().err
    monkeypatch.setenv("DDRL_REWARD_TOKEN", TOKEN)
    assert rs.main(["--reward", "no_such_reward"]) == 2
    assert "not a registered reward" in capsys.readouterr().err
    assert rs.main(["--reward", "no_such_module:Reward"]) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err
    assert rs.main(["--reward", "caption_alignment", "--args", '{"softness": -1}']) == 2
    assert "do not fit --reward caption_alignment" in capsys.readouterr().err
    assert rs.main(["--reward", "caption_alignment", "--args", "[1]"]) == 2
    assert "--args must be a JSON object" in capsys.readouterr().err
    assert rs.main(["--reward", "caption_alignment", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


class _RecordingReward:
    """Mean brightness per video; records the batch size of each call; refuses the prompt "bad"."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.calls.append(len(prompts))
        if "bad" in prompts:
            raise ValueError("prompt 'bad' refused")
        return videos.mean(dim=(1, 2, 3, 4))


def test_batcher_groups_by_frame_size_and_limit_and_splits_scores():
    reward = _RecordingReward()
    batcher = rs.RewardBatcher(reward, max_batch=4, window_s=0.0)
    sizes_and_frames = [(2, 4), (3, 4), (1, 2), (2, 4), (5, 4)]
    generator = torch.Generator().manual_seed(0)
    requests = [(torch.rand(size, 3, frames, 8, 8, generator=generator), [f"p{i}"] * size)
                for i, (size, frames) in enumerate(sizes_and_frames)]
    # queued before the worker starts, so the batches formed are fixed
    jobs = [batcher.enqueue(videos, prompts) for videos, prompts in requests]
    batcher.start()
    for job, (videos, _) in zip(jobs, requests):
        torch.testing.assert_close(torch.tensor(job.wait(10)), videos.mean(dim=(1, 2, 3, 4)))
    batcher.stop(10)
    # [2 + 2 of one frame size], [3: the next 2 would exceed 4], [1: other frames], [5 in 4 + 1]
    assert reward.calls == [4, 3, 1, 4, 1]
    stats = batcher.snapshot()
    assert stats["requests"] == 5 and stats["batches"] == 4 and stats["max_requests_per_batch"] == 2


def test_batcher_failure_fails_only_the_bad_request():
    reward = _RecordingReward()
    batcher = rs.RewardBatcher(reward, max_batch=8, window_s=0.0)
    good_videos = torch.rand(1, 3, 2, 4, 4)
    good, bad = batcher.enqueue(good_videos, ["fine"]), batcher.enqueue(torch.rand(1, 3, 2, 4, 4), ["bad"])
    batcher.start()
    torch.testing.assert_close(torch.tensor(good.wait(10)), good_videos.mean(dim=(1, 2, 3, 4)))
    with pytest.raises(rs._RewardInputError, match="prompt 'bad' refused"):
        bad.wait(10)
    batcher.stop(10)
    assert reward.calls == [2, 1, 1]  # together, then each alone
    assert batcher.snapshot()["failed_requests"] == 1


# ---------------------------------------------------------------------------------------------
# Over HTTP


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "uint8"])
def test_remote_scores_equal_in_process_reward(server, wire_dtype):
    videos, prompts = _videos(4)
    remote = server.client(wire_dtype=wire_dtype).score(videos, prompts)
    # the reference scores what the server receives: the videos after the wire dtype's rounding
    received, _ = rs.decode_request(rs.encode_request(videos, prompts, wire_dtype))
    expected = build_reward("caption_alignment")(rs.wire_to_float(received), prompts)
    assert remote.dtype == torch.float32 and remote.shape == (4,)
    assert len(set(expected.tolist())) == 4  # distinct scores: the comparison means something
    torch.testing.assert_close(remote, expected, atol=ATOL, rtol=0)


def test_concurrent_requests_are_batched_and_correct(server):
    videos, prompts = _videos(6, seed=5)
    expected = build_reward("caption_alignment")(videos, prompts)
    before = server.stats()
    client = server.client(wire_dtype="float32")
    start = threading.Barrier(6)

    def score_one(index: int) -> torch.Tensor:
        start.wait()
        return client.score(videos[index : index + 1], prompts[index : index + 1])

    with ThreadPoolExecutor(6) as pool:
        remote = torch.cat(list(pool.map(score_one, range(6))))
    torch.testing.assert_close(remote, expected, atol=ATOL, rtol=0)
    after = server.stats()
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6  # some requests shared a reward call
    assert after["max_requests_per_batch"] >= 2


def test_wrong_or_missing_token_is_refused_without_retry(server):
    videos, prompts = _videos(1)
    before = server.stats()["refused_token"]
    for token in ("wrong-token-0123456789abcdef", "Bearer"):
        client = server.client(token=token, retries=3)
        with pytest.raises(rs.RewardServiceAuthError, match="refused the token") as caught:
            client.score(videos, prompts)
        assert server.url in str(caught.value)
    assert server.stats()["refused_token"] - before == 2  # one attempt each


def test_oversize_request_gets_413_without_retry(server):
    videos = torch.rand(1, 3, 4, 256, 256)  # 3 MiB as float32, over the server's 1 MiB
    before = server.stats()["refused_size"]
    with pytest.raises(rs.RewardServiceRequestError, match="HTTP 413.*exceeds the limit of 1048576"):
        server.client(wire_dtype="float32", retries=3).score(videos, ["a red square moving left"])
    assert server.stats()["refused_size"] - before == 1


def test_bad_body_gets_400_with_the_reason(server):
    body = _body(torch.zeros(2, 3, 2, 4, 4), {"format": rs.REQUEST_FORMAT, "prompts": '["a"]'})
    with pytest.raises(rs.RewardServiceRequestError, match="HTTP 400.*got 2 videos but 1 prompts"):
        server.client(retries=3).score_encoded(body, 2)
    body = _body(torch.full((1, 3, 2, 4, 4), 2.0), {"format": rs.REQUEST_FORMAT, "prompts": '["a"]'})
    with pytest.raises(rs.RewardServiceRequestError, match=re.escape("HTTP 400") + ".*" +
                       re.escape("values must lie in [0, 1]")):
        server.client(retries=3).score_encoded(body, 1)


def _raw_post(url: str, body: bytes, send_body: bool = True) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST {rs.SCORE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + (body if send_body else b""))
    return sock


def _status(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return int(answer.split()[1]) if answer else 0


def test_connections_are_bounded_and_requests_must_arrive_in_time():
    """--max-connections 2: two clients that send headers but never their body hold both slots; a
    third client gets 503 at once; after --request-timeout-s the two get 408 and valid requests are
    answered again (the client retries 503 with backoff)."""
    running = _start_server("--max-connections", "2", "--request-timeout-s", "2")
    try:
        videos, prompts = _videos(1)
        body = rs.encode_request(videos, prompts, "float32")
        stalled = [_raw_post(running.url, body, send_body=False) for _ in range(2)]
        time.sleep(0.5)  # both reach their handler threads (a health check would need a slot too)
        extra = [_raw_post(running.url, body) for _ in range(3)]  # more clients than the bound
        assert [_status(sock) for sock in extra] == [503, 503, 503]
        assert [_status(sock) for sock in stalled] == [408, 408]
        for sock in stalled + extra:
            sock.close()
        scores = running.client(retries=5, backoff_s=0.2, wire_dtype="float32").score(videos, prompts)
        torch.testing.assert_close(scores, build_reward("caption_alignment")(videos, prompts),
                                   atol=ATOL, rtol=0)
        assert running.stats()["refused_busy"] >= 3
    finally:
        running.stop()



def test_remote_reward_in_weighted_rewards_and_async(server, monkeypatch):
    monkeypatch.setenv("DDRL_REWARD_TOKEN", TOKEN)
    rewards = WeightedRewards([("remote", 2.0, {"url": server.url, "wire_dtype": "float32"}),
                               ("brightness", 1.0, None)])
    videos, prompts = _videos(3, seed=7)
    expected = build_reward("caption_alignment")(videos, prompts)
    scores = rewards(videos, prompts)
    torch.testing.assert_close(scores["remote"], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(rewards.total(scores), 2 * expected + videos.mean(dim=(1, 2, 3, 4)))

    remote = rewards.rewards["remote"]
    future = remote.submit(videos, prompts)
    videos.zero_()  # the caller may reuse the buffer at once: submit encoded a snapshot
    torch.testing.assert_close(future.result(timeout=30), expected, atol=ATOL, rtol=0)
    remote.close()


# ---------------------------------------------------------------------------------------------
# Shutdown and failures (their own servers: these stop them)


def test_sigterm_lets_the_request_in_progress_finish():
    server = _start_server("--batch-window-ms", "1000")  # a lone request waits ~1 s in the batcher
    try:
        videos, prompts = _videos(2)
        expected = build_reward("caption_alignment")(videos, prompts)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(server.client(wire_dtype="float32").score, videos, prompts)
            _wait_in_flight(server)
            server.process.send_signal(signal.SIGTERM)
            torch.testing.assert_close(future.result(timeout=30), expected, atol=ATOL, rtol=0)
        assert server.process.wait(15) == 0
        assert "reward-serve: stopped" in "".join(server.stdout.queue)
        with pytest.raises(rs.RewardServiceError, match=f"reward service {server.url} failed after 1"):
            server.client().score(videos, prompts)
    finally:
        server.stop()


def test_frozen_or_killed_server_gives_a_named_error_not_a_hang():
    server = _start_server("--batch-window-ms", "1000")
    try:
        videos, prompts = _videos(1)
        # frozen (SIGSTOP): the kernel still accepts connections, nothing answers -> timeouts
        server.process.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(rs.RewardServiceError, match="failed after 2 attempts.*timed out") as caught:
            server.client(timeout_s=0.5, retries=1).score(videos, prompts)
        assert server.url in str(caught.value)
        # bounded: 2 timeouts of 0.5 s and a short backoff (~1.2 s; generous for a loaded machine)
        assert time.monotonic() - start < 30
        server.process.send_signal(signal.SIGCONT)

        # killed (SIGKILL) with a request in flight: reset, then refused, then the error
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(server.client(timeout_s=5.0, retries=2).score, videos, prompts)
            _wait_in_flight(server)
            server.process.kill()
            start = time.monotonic()
            with pytest.raises(rs.RewardServiceError, match="failed after 3 attempts") as caught:
                future.result(timeout=30)
        assert server.url in str(caught.value) and "Connection" in str(caught.value)
        assert time.monotonic() - start < 30
    finally:
        server.stop()
