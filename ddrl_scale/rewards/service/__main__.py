"""``python -m ddrl_scale.rewards.service``: the same options as ``ddrl reward-serve``."""

import sys

from ddrl_scale.rewards.service.cli import main

if __name__ == "__main__":
    sys.exit(main())
