"""Memory: chunks, tiers, the slab pool, the chunk manager, tracing and copy streams."""
