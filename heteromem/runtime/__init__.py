"""Runtime: wrap, hooks, the chunked optimizer, reports and state dicts."""
