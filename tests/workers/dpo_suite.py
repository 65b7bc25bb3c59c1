"""Distributed worker: DPO trainings in one torchrun launch (2 gloo ranks).

Launched by tests/test_dpo.py. One after another in one process group:

- ``learn_tp2``: sigmoid DPO at TP=2 (+SP) from a saved random initialisation, reference = a
  frozen copy of the start;
- ``learn_ep2``: sigmoid DPO at EP=2 from the preset's seeded random init, uninterrupted: the
  config the test ran through the CLI and killed with kill -9 (:func:`kill_config`);
- ``resumed``: that killed run resumed (``checkpoint.resume: auto``, what ``--resume auto``
  sets): its reference is rebuilt from the starting weights, the loop loads the checkpoint;
- ``lora``: IPO with LoRA adapters at DP=2, reference = the base with the adapters switched off
  at every step;
- ``live_dp2`` / ``precomputed_dp2``: 3 steps with the reference scored live (a frozen copy) and
  precomputed by the policy itself before its first step;
- ``oracle_*``: one step from ``learn_tp2``'s final weights against ``training.reference_model``
  = the initialisation, on the first 8 validation pairs in order, with each loss type at PP=2,
  TP=2 and EP=2 (precomputed): the test recomputes them with transformers + TRL's formulas.

Rank 0 writes ``results.json``.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.rm_common import rm_config  # noqa: E402
from workers.train_common import finish_worker  # noqa: E402
from workers.train_suite import LAYOUTS, save_initial_weights  # noqa: E402

from glm_megatron.algorithms.dpo.config import DPOConfig  # noqa: E402,I001
from glm_megatron.engine.config import build_section  # noqa: E402

LEARN_STEPS = 10
ORACLE_PAIRS = 8  # the oracle runs' one global batch: validation pairs 0..7, in order
ORACLES = {  # name: (layout, training keys)
    "oracle_sigmoid_pp2": ("pp2", {"loss_type": "sigmoid", "beta": 0.1}),
    "oracle_ipo_tp2": ("tp2", {"loss_type": "ipo", "beta": 0.5}),
    "oracle_conservative_ep2": ("ep2", {"loss_type": "conservative", "beta": 0.2,
                                        "label_smoothing": 0.2,
                                        "precompute_ref_log_probs": True}),
}


def dpo_config(info: dict, output_dir: str, init: str, **sections) -> dict:
    """A sigmoid-DPO config for glm4-moe-tiny on the tiny preferences (``info``: the data
    builder's paths), started from ``init``; ``sections`` update each section."""
    cfg = rm_config(info, output_dir, model={"preset": None, "load_checkpoint": init})
    cfg["training"].pop("margin")
    cfg["training"].update(loss_type="sigmoid", beta=0.1, learning_rate=1.0e-3,
                           min_learning_rate=1.0e-4, max_steps=LEARN_STEPS)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


EVALUATION = {"eval_strategy": "steps", "eval_steps": LEARN_STEPS, "eval_at_start": True}


def learning(data: dict, out: str, init: str, name: str, layout: str, **sections) -> dict:
    return dpo_config(data, os.path.join(out, name), init, evaluation=EVALUATION,
                      parallel=LAYOUTS[layout], **sections)


def kill_config(info: dict, output_dir: str, **sections) -> dict:
    """The run the test starts through the CLI and kills: EP=2 from the preset's seeded random
    init (nothing needs to exist before it), a checkpoint every 3 steps."""
    cfg = dpo_config(info, output_dir, None, model={"preset": "glm4-moe-tiny"},
                     checkpoint={"save_strategy": "steps", "checkpoint_interval": 3},
                     parallel=LAYOUTS["ep2"])
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


def scenarios(data: dict, out: str, init: str, killed: str) -> dict:
    runs = {
        "learn_tp2": learning(data, out, init, "learn_tp2", "tp2",
                              checkpoint={"save_final": True}),  # the oracles' policy
        "learn_ep2": kill_config(data, os.path.join(out, "learn_ep2"), evaluation=EVALUATION,
                                 checkpoint={"save_strategy": "no"}),
        "resumed": kill_config(data, killed, checkpoint={"resume": "auto"}),
        "lora": learning(data, out, init, "lora", "tp1",
                         model={"use_peft": True, "lora_r": 8, "lora_alpha": 16},
                         training={"loss_type": "ipo", "beta": 0.5, "learning_rate": 1.0e-2,
                                   "min_learning_rate": 1.0e-3},
                         checkpoint={"save_final": True}),
    }
    for name, precompute in (("live_dp2", False), ("precomputed_dp2", True)):
        # A few steps on the small validation split: the policy scoring every pair before its
        # first step must give the live frozen copy's reference numbers.
        runs[name] = dpo_config(data, os.path.join(out, name), init,
                                training={"max_steps": 3, "precompute_ref_log_probs": precompute},
                                data={"train_data_path": data["val"], "validation_data_path": None})
    for name, (layout, training) in ORACLES.items():
        runs[name] = dpo_config(
            data, os.path.join(out, name), os.path.join(out, "learn_tp2"),
            training=dict(training, max_steps=1, global_batch_size=ORACLE_PAIRS,
                          per_device_train_batch_size=4, reference_model=init),
            data={"train_data_path": data["val"], "validation_data_path": None, "shuffle": False},
            parallel=LAYOUTS[layout])
    return runs


def refused_reference(data: dict, out: str, init: str) -> str | None:
    """prepare_dpo's answer (before any process group) to ``training.reference_model`` of
    another architecture: a checkpoint directory whose model_config.json has hidden size 128."""
    from glm_megatron.algorithms.dpo.train import prepare_dpo
    from glm_megatron.engine.config import TrainConfigError
    from glm_megatron.models import get_preset

    other = os.path.join(out, "other_architecture")
    os.makedirs(os.path.join(other, "model"), exist_ok=True)
    for name in ("metadata.json", ".metadata"):
        with open(os.path.join(other, "model", name), "w", encoding="utf-8") as fh:
            fh.write("{}")
    with open(os.path.join(other, "model_config.json"), "w", encoding="utf-8") as fh:
        json.dump(get_preset("glm4-moe-tiny").replace(hidden_size=128).to_hf_dict(), fh)
    cfg = dpo_config(data, os.path.join(out, "refused"), init, training={"reference_model": other})
    try:
        prepare_dpo(build_section(DPOConfig, cfg, ""), 2)
    except TrainConfigError as err:
        return str(err)
    return None


def main():
    from glm_megatron.parallel import install_cpu_support

    install_cpu_support()
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="JSON from rm_common.build_rm_data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--killed-run", required=True, help="output dir of the killed CLI run")
    args = parser.parse_args()
    with open(args.data, encoding="utf-8") as fh:
        data = json.load(fh)

    from glm_megatron.algorithms.dpo.train import run_dpo

    results = {}
    init = os.path.join(args.out, "init")
    save_initial_weights(init)
    runs = scenarios(data, args.out, os.path.join(init, "model"), args.killed_run)
    for name, cfg_dict in runs.items():
        cfg = build_section(DPOConfig, cfg_dict, "")
        cfg.validate()
        start = time.perf_counter()
        result, _, ctx = run_dpo(cfg, log=lambda *a: None)
        results[name] = {"history": result.history, "eval": result.eval_history,
                         "layout": ctx.layout.describe(), "checkpoint": result.last_checkpoint,
                         "config": cfg_dict, "seconds": time.perf_counter() - start}
    if int(os.environ["RANK"]) == 0:
        results["refused_reference"] = refused_reference(data, args.out, os.path.join(init, "model"))
    finish_worker(results, args.out)


if __name__ == "__main__":
    main()
