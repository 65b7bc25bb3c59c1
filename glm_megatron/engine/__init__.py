"""The engine every trainer shares: config loading, batching, optimizer, schedule, the one
training loop, checkpoints, metrics and signals. It knows no algorithm (docs/ARCHITECTURE.md)."""
