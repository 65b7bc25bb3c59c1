"""The GLM-4.x special tokens.

Order follows the real GLM-4.5/4.6 vocabulary (``<|endoftext|>`` = 151329 onwards), so a
SentencePiece tokenizer trained by ``tools/train_tokenizer.py`` lists them in the same relative
order. Only the ids below are relied on for the real tokenizer; everything else is looked up by
string in the tokenizer actually loaded.
"""
from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
GMASK = "[gMASK]"
SOP = "<sop>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
OBSERVATION = "<|observation|>"

# Tokens that the GLM-4.5/4.6 tokenizer treats as single added tokens. The tool-call markup
# tokens matter: the chat template writes them inside assistant turns.
GLM_SPECIAL_TOKENS = (
    ENDOFTEXT, "[MASK]", GMASK, "[sMASK]", SOP, "<eop>", SYSTEM, USER, ASSISTANT, OBSERVATION,
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>",
    "<|end_of_transcription|>", "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
    "/nothink", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
    "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
)

# Role tokens of the template; an assistant turn ends at the next USER / OBSERVATION / ENDOFTEXT.
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": OBSERVATION}
STOP_TOKENS = (ENDOFTEXT, USER, OBSERVATION)

# Ids in the real GLM-4.5/4.6 tokenizer (docs/ARCHITECTURE.md §6); tests of a user-supplied tokenizer.json
# can check them, nothing else hard-codes them.
KNOWN_GLM45_IDS = {ENDOFTEXT: 151329, GMASK: 151331, USER: 151336, OBSERVATION: 151338}
