#!/usr/bin/env python
"""What each stage of the tiny pipeline achieved, read from its checkpoints.

    python examples/tiny_ppo/summary.py output/tiny_ppo
"""

from __future__ import annotations

import json
import os
import sys


def _state(run: str) -> dict:
    with open(os.path.join(run, "latest"), encoding="utf-8") as fh:
        latest = fh.read().strip()
    with open(os.path.join(run, latest, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)


def main(root: str) -> None:
    sft, rm, ppo = (_state(os.path.join(root, s)) for s in ("sft", "rm", "ppo"))
    print(f"  SFT:          eval loss {sft['last_eval']['eval_loss']:.3f} after {sft['step']} steps")
    print(f"  reward model: held-out pair accuracy {rm['last_eval']['eval_accuracy']:.3f} "
          f"after {rm['step']} steps")
    (s0, before), (s1, after) = ppo["validation"][0], ppo["validation"][-1]
    print(f"  PPO:          validation reward {before['mean_reward']:+.3f} (step {s0}) -> "
          f"{after['mean_reward']:+.3f} (step {s1}); KL to the reference {after['kl_divergence']:.4f} "
          f"per token; responses stop {after['stop_fraction']:.0%} of the time")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "output/tiny_ppo")
