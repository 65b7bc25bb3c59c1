"""``evaluate-sft``: loss, perplexity and token counts of an SFT checkpoint on test data.

    torchrun ... -m glm_megatron evaluate-sft --load CKPT --test-data F --output-file OUT.json
        [--tp N --pp N --ep N] [--batch-size B] [--max-seq-length L]
        [--tokenizer-path T] [--template NAME] [--num-generations K --max-new-tokens M]

``--load`` takes a run directory (its latest checkpoint), ``CKPT/best``, ``iter_x`` or a weights
directory with ``model_config.json`` next to it. ``--test-data`` is a tokenized SFT split
directory, or a JSON/JSONL conversations file tokenized on the fly (needs ``--tokenizer-path``).
With ``--num-generations K`` the first K test conversations are also answered greedily and
compared with the reference (exact match after stripping), written to the JSON. JSON/JSONL
conversations are rendered with ``--template``, by default the chat template of the checkpoint's
model family (``glm4.5`` for GLM-4.5/4.6, ``glm4`` for GLM-4-9B, ``glm4-0414`` for GLM-4-0414).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import numpy as np

from ...data.chat_template import TEMPLATES, render_spans, template_for_model_type
from ...engine.batching import Truncated, model_pad_id, open_tokenized, pad_multiple
from ...engine.config import TrainConfigError
from ...engine.engine import ModelRunner
from ...engine.prepare import evaluation_target
from ...generation.greedy import greedy_generate
from ...models.config import model_shape
from .data import SFTBatcher
from .lm_eval import evaluate_lm
from .loss import lm_forward_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="glm_megatron evaluate-sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True)
    p.add_argument("--test-data", required=True)
    p.add_argument("--output-file", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4, help="per data-parallel rank")
    p.add_argument("--max-seq-length", type=int, default=None, help="longer rows are cut")
    p.add_argument("--tokenizer-path", default=None,
                   help="for JSON/JSONL test data and generations (default: the data's tokenizer)")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="chat template of JSON/JSONL test data and generations (default: the "
                        "model family's)")
    p.add_argument("--num-generations", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    return p.parse_args(argv)


class _InMemory(Sequence):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def lengths(self):
        return np.array([len(r["input_ids"]) for r in self.rows])


def _load_conversations(path: str):
    from ...data.readers import read_examples

    return [ex for _, ex, _ in read_examples(path, "sft")]


def _tokenizer(args, dataset_manifest: dict | None):
    from ...data.tokenizer import load_tokenizer

    path = args.tokenizer_path or ((dataset_manifest or {}).get("tokenizer") or {}).get("path")
    if not path:
        raise TrainConfigError("--tokenizer-path is needed for JSON/JSONL test data and generations")
    return load_tokenizer(path)


def run(args, log=print) -> dict:
    from ...data.encoding import EncodeOptions, encode_sft, encode_spans

    model_dir, glm, env, layout = evaluation_target(args)
    template = args.template or template_for_model_type(glm.model_type)

    conversations, tok = None, None
    if os.path.isdir(args.test_data):
        base = open_tokenized(args.test_data, "--test-data", "sft", glm.vocab_size)
    elif os.path.isfile(args.test_data):
        tok = _tokenizer(args, None)
        conversations = _load_conversations(args.test_data)
        base = _InMemory([encode_sft(tok, c, EncodeOptions(template))[0] for c in conversations])
    else:
        raise TrainConfigError(f"--test-data: {args.test_data}: no such file or directory")
    max_len = args.max_seq_length or int(np.asarray(base.lengths()).max())
    data = Truncated(base, max_len + 1)
    if args.num_generations and conversations is None:
        raise TrainConfigError("--num-generations needs --test-data as a JSON/JSONL conversations "
                               "file (the references are its last assistant turns)")

    from ...engine.lora_checkpoints import load_checkpoint_weights
    from ...models.loading import build_glm_model
    from ...parallel import initialize_parallel

    ctx = initialize_parallel(layout, model_shape(glm), training=False, env=env)
    chunks, _ = build_glm_model(glm, ctx.layout)
    load_checkpoint_weights(chunks, glm, model_dir, "--load")  # LoRA: adapters folded in
    mult = pad_multiple(ctx.layout)
    pad_id = model_pad_id(glm)
    batcher = SFTBatcher(data, max_len, pad_id, mult, -100, False, ctx.device)
    metrics = evaluate_lm(ModelRunner(chunks), batcher, lm_forward_step, args.batch_size)
    result = {"checkpoint": model_dir, "test_data": os.path.abspath(args.test_data),
              "layout": ctx.layout.describe(), **metrics}
    if conversations is not None:
        result["template"] = template

    if args.num_generations:
        samples, correct = [], 0
        for conv in conversations[: args.num_generations]:
            prompt_msgs = conv.messages[:-1] if conv.messages[-1]["role"] == "assistant" else conv.messages
            reference = conv.messages[-1].get("content", "") if prompt_msgs is not conv.messages else ""
            ids, _, _ = encode_spans(tok, render_spans(prompt_msgs, conv.tools, template,
                                                       add_generation_prompt=True))
            new = greedy_generate(chunks, list(ids), args.max_new_tokens, tok.stop_ids, mult,
                                  pad_id, ctx.device)
            text = tok.decode([t for t in new if t not in tok.stop_ids])
            answer = text.split("</think>")[-1].strip()
            match = answer == reference.strip()
            correct += int(match)
            samples.append({"prompt": prompt_msgs[-1].get("content", ""), "reference": reference,
                            "generated": answer, "exact_match": match})
        result["generations"] = samples
        result["exact_match"] = correct / len(samples) if samples else 0.0
    if ctx.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, ensure_ascii=False)
        log(f"evaluate-sft: eval_loss {metrics['eval_loss']:.4f}, perplexity "
            f"{metrics['eval_perplexity']:.3f} over {int(metrics['eval_tokens'])} tokens "
            f"({int(metrics['eval_samples'])} rows)"
            + (f", exact match {result['exact_match']:.2%}" if "exact_match" in result else "")
            + f" -> {args.output_file}")
    return result
