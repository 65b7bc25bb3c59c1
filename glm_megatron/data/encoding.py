"""Examples → token ids and loss masks, through the chat template.

Each span of :func:`render_spans` is tokenized on its own and the pieces are concatenated. This
equals tokenizing the whole text because every span boundary sits next to a special token, which
both tokenizer backends split on first (tested); it gives an exact per-token loss mask with no
offset mapping.

Row fields produced (what :class:`TokenizedDataset` stores):

- sft: ``input_ids``, ``loss_mask`` (1 = supervised target token);
- preference: per ranked pair ``chosen_input_ids``, ``chosen_loss_mask``,
  ``rejected_input_ids``, ``rejected_loss_mask`` (masks cover only the response, not assistant
  turns inside a multi-turn prompt);
- prompts: ``prompt_ids`` (ending with the ``<|assistant|>`` generation prompt).

Length: a row longer than ``max_seq_length`` is a :class:`DataValidationError` unless
``truncate`` is set, which cuts from the right (as the seed tutorial's trainer does); a cut that
leaves no supervised token is still an error. Prompts are never truncated (the generation prompt
is at the end).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glm_megatron.data.chat_template import DEFAULT_TEMPLATE, render_spans
from glm_megatron.data.errors import DataValidationError
from glm_megatron.data.readers.schema import (
    Conversation,
    PreferenceExample,
    PromptExample,
)
from glm_megatron.data.tokenizer import GLMTokenizer


@dataclass
class EncodeOptions:
    template: str = DEFAULT_TEMPLATE
    enable_thinking: bool | None = None  # prompts: None/True → "<|assistant|>", False → no-think
    max_seq_length: int | None = None
    truncate: bool = False


def encode_spans(tok: GLMTokenizer, spans) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, loss mask and the message index of every token."""
    ids: list[int] = []
    mask: list[int] = []
    turns: list[int] = []
    for span in spans:
        piece = tok.encode(span.text)
        ids += piece
        mask += [int(span.trainable)] * len(piece)
        turns += [span.turn] * len(piece)
    return (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8),
            np.asarray(turns, dtype=np.int64))


def _fit(ids: np.ndarray, mask: np.ndarray, opts: EncodeOptions, what: str):
    """Apply max_seq_length; returns (ids, mask, truncated)."""
    limit = opts.max_seq_length
    if limit is None or len(ids) <= limit:
        if not mask.any():
            raise DataValidationError(f"{what} has no supervised token", reason="no supervised token")
        return ids, mask, False
    if not opts.truncate:
        raise DataValidationError(f"{what} is {len(ids)} tokens, longer than max_seq_length "
                                  f"{limit} (use --truncate to cut it)",
                                  reason="longer than max_seq_length")
    ids, mask = ids[:limit], mask[:limit]
    if not mask.any():
        raise DataValidationError(f"{what} has no supervised token within max_seq_length {limit}",
                                  reason="no supervised token after truncation")
    return ids, mask, True


def check_assistant_turns(messages: list[dict], first: int = 0) -> None:
    """An assistant turn with neither text nor tool calls (from ``first`` on) teaches only the
    terminator: a DataValidationError naming the message (skipped and counted under
    ``--skip-invalid``)."""
    for i, m in enumerate(messages[first:], start=first):
        if m["role"] == "assistant" and not (m.get("content") or "").strip() \
                and not m.get("tool_calls"):
            raise DataValidationError(f"message {i}: empty assistant turn (no content and no tool "
                                      "calls)", reason="empty assistant turn")


def encode_sft(tok: GLMTokenizer, conv: Conversation, opts: EncodeOptions):
    check_assistant_turns(conv.messages)
    spans = render_spans(conv.messages, conv.tools, template=opts.template, add_eos=True)
    ids, mask, _ = encode_spans(tok, spans)
    ids, mask, truncated = _fit(ids, mask, opts, "conversation")
    return {"input_ids": ids, "loss_mask": mask}, truncated


def encode_preference(tok: GLMTokenizer, ex: PreferenceExample, opts: EncodeOptions):
    """One row per (better, worse) pair; returns (rows, number of truncated sequences)."""
    encoded = []
    n_prompt = len(ex.prompt)
    for k, resp in enumerate(ex.responses):
        check_assistant_turns(ex.prompt + resp, first=n_prompt)
        spans = render_spans(ex.prompt + resp, ex.tools, template=opts.template, add_eos=True)
        ids, mask, turns = encode_spans(tok, spans)
        mask = mask * (turns >= n_prompt)  # supervise the response only
        name = "chosen" if (len(ex.responses) == 2 and k == 0) else (
            "rejected" if len(ex.responses) == 2 else f"responses[{k}]")
        encoded.append(_fit(ids, mask.astype(np.uint8), opts, name))
    rows = []
    # NaN: no margin in the data, the trainer's configured margin applies.
    margin = np.array([np.nan if ex.margin is None else ex.margin], dtype=np.float32)
    for i, j in ex.pairs():
        rows.append({"chosen_input_ids": encoded[i][0], "chosen_loss_mask": encoded[i][1],
                     "rejected_input_ids": encoded[j][0], "rejected_loss_mask": encoded[j][1],
                     "margin": margin})
    if any(np.array_equal(a[0], b[0]) for a, b in
           ((encoded[i], encoded[j]) for i, j in ex.pairs())):
        raise DataValidationError("two ranked responses are identical after tokenization and "
                                  "truncation", reason="identical responses")
    return rows, sum(int(e[2]) for e in encoded)


def encode_prompt(tok: GLMTokenizer, ex: PromptExample, opts: EncodeOptions):
    spans = render_spans(ex.messages, ex.tools, template=opts.template,
                         add_generation_prompt=True, enable_thinking=opts.enable_thinking)
    ids, _, _ = encode_spans(tok, spans)
    if opts.max_seq_length is not None and len(ids) > opts.max_seq_length:
        raise DataValidationError(f"prompt is {len(ids)} tokens, longer than max_seq_length "
                                  f"{opts.max_seq_length} (prompts are never truncated)",
                                  reason="longer than max_seq_length")
    return {"prompt_ids": ids}, False
