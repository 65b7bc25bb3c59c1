"""Text generation from the Megatron model: KV-cache decoding, sampling, greedy generation and
the rollout interface the RL algorithms consume."""
