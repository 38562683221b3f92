"""The coordinator: membership, rounds, encrypted aggregation into memory-only patch buffers."""
