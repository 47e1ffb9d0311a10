"""Where the anchor shards of a run come from: `data.shards`, or the generated demo set."""

from __future__ import annotations

from ddrl_scale.config.schema import RunConfig
from ddrl_scale.data.shards import resolve_shards, write_demo_shards


def demo_shards(config: RunConfig) -> list[str]:
    """Shard URLs of the run: `data.shards` when set, else the procedural demo shards (made once)."""
    if config.data.shards:
        return resolve_shards(config.data.shards)
    video = config.video
    if video.channels != 3:
        raise ValueError("the generated demo shards are RGB videos: video.channels must be 3 "
                         "(or set data.shards)")
    paths = write_demo_shards(config.data.generated_dir, config.data.num_generated,
                              config.data.samples_per_shard, config.run.seed, video.num_frames,
                              video.height, video.width)
    return [str(path) for path in paths]
