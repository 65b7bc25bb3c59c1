"""Run logging on rank 0: TensorBoard scalars, a tqdm progress bar with ETA, one-line summaries.

TensorBoard tags (the seed's metric names): ``train/loss``, ``train/learning_rate``,
``train/grad_norm``, ``train/tokens_per_sec``, ``train/real_token_fraction``, ``train/epoch``,
``eval/loss`` (``eval_loss``), ``eval/perplexity``. Other ranks get a logger that does nothing,
so trainers call it unconditionally.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("glm_megatron.train")


class RunLogger:
    def __init__(self, enabled: bool, tensorboard_dir: str | None, total_steps: int,
                 initial_step: int, progress_bar: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if progress_bar:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (CI logs stay readable).
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                            dynamic_ncols=True, disable=None, file=sys.stderr)

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def progress(self, step: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def format_step(step: int, total: int, epoch: float, m: dict) -> str:
    return (f"step {step}/{total} | epoch {epoch:.2f} | loss {m['loss']:.4f} | "
            f"lr {m['learning_rate']:.3e} | grad_norm {m['grad_norm']:.3f} | "
            f"tokens/s {m['tokens_per_sec']:.0f} | real {m['real_token_fraction']:.2f}")


def format_eval(step: int, m: dict) -> str:
    if "eval_perplexity" not in m:  # another trainer's metrics (the reward model's): print them all
        return f"eval @ step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in m.items())
    return (f"eval @ step {step} | eval_loss {m['eval_loss']:.4f} | "
            f"eval_perplexity {m['eval_perplexity']:.3f} | tokens {int(m['eval_tokens'])}")
