"""``evaluate-rm``: accuracy, margins, reward statistics and calibration of a reward checkpoint.

    torchrun ... -m glm_megatron evaluate-rm --load CKPT --test-data F --output-file OUT.json
        [--plot-calibration OUT.png] [--tp N --pp N --ep N] [--batch-size B] [--margin M]

``--load`` takes a reward run directory (its latest checkpoint), ``CKPT/best``, ``iter_x`` or
its ``model`` directory. ``--test-data`` is a tokenized preference split directory, or a JSON /
JSONL preference file tokenized on the fly (with ``--tokenizer-path``, default: the training
data's tokenizer recorded in the checkpoint's config). Bad records are the data pipeline's
errors (file:line: what is wrong).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ...engine.batching import Truncated, model_pad_id, open_tokenized, pad_multiple
from ...engine.config import TrainConfigError
from ...engine.engine import ModelRunner
from ...engine.preference_batches import PreferenceBatcher
from ...engine.prepare import evaluation_target
from ...models.checkpoint_dirs import REWARD_FILE
from ...models.config import model_shape
from .calibration import calibration_table, plot_calibration
from .metrics import normalization_stats, pair_metrics, score_pairs


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="glm_megatron evaluate-rm", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True)
    p.add_argument("--test-data", required=True)
    p.add_argument("--output-file", required=True)
    p.add_argument("--plot-calibration", default=None, metavar="OUT.png")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per data-parallel rank")
    p.add_argument("--max-seq-length", type=int, default=None, help="longer sequences are cut")
    p.add_argument("--margin", type=float, default=None, help="for eval_loss (default: training's)")
    p.add_argument("--num-bins", type=int, default=10)
    return p.parse_args(argv)


def read_reward_file(model_dir: str) -> dict:
    path = os.path.join(os.path.dirname(model_dir.rstrip("/")), REWARD_FILE)
    if not os.path.isfile(path):
        raise TrainConfigError(f"--load: {model_dir} is not a reward-model checkpoint (no "
                               f"{REWARD_FILE} next to it; train one with `glm_megatron rm`)")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _training_tokenizer(model_dir: str) -> str | None:
    state = os.path.join(os.path.dirname(model_dir.rstrip("/")), "trainer_state.json")
    if not os.path.isfile(state):
        return None
    with open(state, encoding="utf-8") as fh:
        train_path = (json.load(fh).get("config") or {}).get("data", {}).get("train_data_path")
    if not train_path or not os.path.isfile(os.path.join(train_path, "manifest.json")):
        return None
    with open(os.path.join(train_path, "manifest.json"), encoding="utf-8") as fh:
        return (json.load(fh).get("tokenizer") or {}).get("path")


def load_test_pairs(path: str, tokenizer_path: str | None, vocab_size: int):
    """A tokenized preference split, or a JSON/JSONL file tokenized here (pipeline errors)."""
    if os.path.isdir(path):
        return open_tokenized(path, "--test-data", "preference", vocab_size)
    if not os.path.isfile(path):
        raise TrainConfigError(f"--test-data: {path}: no such file or directory")
    if not tokenizer_path:
        raise TrainConfigError("--tokenizer-path is needed for JSON/JSONL test data")
    from ...data.encoding import EncodeOptions, encode_preference
    from ...data.errors import DataValidationError
    from ...data.readers import read_examples
    from ...data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    rows = []
    for line, example, _ in read_examples(path, "preference"):
        try:
            rows.extend(encode_preference(tok, example, EncodeOptions())[0])
        except DataValidationError as err:
            raise err.at(path, line) from None
    return _Rows(rows)


class _Rows(list):
    def lengths(self):
        return np.array([max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in self])


def run(args, log=print) -> dict:
    model_dir, glm, env, layout = evaluation_target(args)
    reward_info = read_reward_file(model_dir)
    base = load_test_pairs(args.test_data, args.tokenizer_path or _training_tokenizer(model_dir),
                           glm.vocab_size)
    if len(base) == 0:
        raise TrainConfigError(f"--test-data: {args.test_data} holds no preference pairs")
    max_len = args.max_seq_length or int(np.asarray(base.lengths()).max())
    data = Truncated(base, max_len)
    margin = reward_info.get("margin", 0.0) if args.margin is None else args.margin

    from ...engine.lora_checkpoints import load_checkpoint_weights
    from ...models.loading import build_glm_model
    from ...models.reward_head import attach_reward_heads
    from ...parallel import initialize_parallel

    ctx = initialize_parallel(layout, model_shape(glm), training=False, env=env)
    chunks, tconfig = build_glm_model(glm, ctx.layout)
    # A LoRA reward model loads as its base with the adapters folded in.
    load_checkpoint_weights(chunks, glm, model_dir, "--load",
                            heads=lambda c: attach_reward_heads(c, tconfig))
    batcher = PreferenceBatcher(data, model_pad_id(glm), pad_multiple(ctx.layout), margin, ctx.device)
    rewards = score_pairs(ModelRunner(chunks), batcher, args.batch_size)
    metrics = {k.removeprefix("eval_"): v for k, v in pair_metrics(rewards, margin).items()}
    table = calibration_table(rewards[:, 0], rewards[:, 1], args.num_bins)
    result = {"checkpoint": model_dir, "test_data": os.path.abspath(args.test_data),
              "layout": ctx.layout.describe(), "margin": margin, **metrics,
              "calibration": table, "test_reward_stats": normalization_stats(rewards),
              "saved_normalization": reward_info.get("normalization"),
              "pair_rewards": rewards.tolist()}  # [chosen, rejected] per pair, in data order
    if ctx.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        if args.plot_calibration:
            os.makedirs(os.path.dirname(os.path.abspath(args.plot_calibration)), exist_ok=True)
            result["calibration_plot"] = plot_calibration(table, args.plot_calibration)
        with open(args.output_file, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        log(f"evaluate-rm: accuracy {metrics['accuracy']:.2%} over {int(metrics['samples'])} pairs, "
            f"mean margin {metrics['mean_margin']:.3f}, ECE {metrics['ece']:.3f} -> {args.output_file}")
    return result
