"""PPO RLHF: rollouts, the four models, KL penalty, GAE, clipped policy and value losses."""
