"""The on-disk index: store (manifest, shards), search, compression."""
