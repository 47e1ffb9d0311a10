"""Anchor data: procedural demo videos (`synthetic`), demo shards (`shards`), the prepared latent
shard format and its index (`latent_shards`), `ddrl data prepare|validate|stats` (`prepare`,
`video_io`, `encoders`, `validate`, `commands`), and the loaders: replicated (`anchor`) and sharded
by rank and worker (`sharded`)."""
