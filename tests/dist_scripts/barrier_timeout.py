"""Two ranks, one barrier: rank 1 never enters it, so rank 0's barrier must time out with a message.

Run as two processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (tests/test_distributed.py).
Rank 0 prints the error it got and exits 3; rank 1 idles until it is killed.
"""

from __future__ import annotations

import sys
import time

import torch.distributed as dist

from ddrl_scale.parallel.distributed import collective, init_world


def main(timeout_s: float) -> int:
    world = init_world("cpu", timeout_s=timeout_s)
    if world.rank == 1:
        time.sleep(20 * timeout_s)  # skip the barrier; stay alive so rank 0 sees a timeout, not a dead peer
        return 0
    start = time.monotonic()
    try:
        collective("barrier", dist.barrier)
    except RuntimeError as error:
        print(f"elapsed {time.monotonic() - start:.2f} s", file=sys.stderr)
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0))
