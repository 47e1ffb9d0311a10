"""Anchor data: procedural demo videos (`synthetic`), shard format (`shards`), loader (`anchor`)."""
