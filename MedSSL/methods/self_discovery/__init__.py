"""Self-discovery of anatomical patterns (Semantic Genesis / TransVW): :func:`.discover.discover_patterns`
runs it (or loads it from the cache) and returns a :class:`.patterns.PatternSet`."""
