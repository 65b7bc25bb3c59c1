"""The GLM chat template: exact text, exact loss-mask spans, and code == Jinja (HF)."""
from __future__ import annotations

import json
import shutil

import jinja2
import numpy as np
import pytest

from glm_megatron.data.chat_template import (
    GLM4_0414_JINJA,
    GLM4_JINJA,
    GLM45_JINJA,
    JINJA_TEMPLATES,
    MODEL_TYPE_TEMPLATES,
    TEMPLATES,
    render_spans,
    render_text,
    template_for_model_type,
)
from glm_megatron.data.encoding import EncodeOptions, encode_sft, encode_spans
from glm_megatron.data.readers.schema import Conversation
from glm_megatron.data.tokenizer import load_tokenizer
from glm_megatron.data.tokenizer_training import train_bpe, train_sentencepiece

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "查询天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

# system + multi-turn + think (kept only after the last user turn) + tool call + 2 tool results
FULL = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "old thought"},
    {"role": "user", "content": "Weather in 北京?"},
    {"role": "assistant", "content": "Checking.", "reasoning_content": "Need the tool.",
     "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京", "days": 2}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "<think>\nIt is warm.\n</think>\n\nIt is 21°C and sunny."},
]
TOOLS_BLOCK = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "查询天气", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
    "</tools>\n\nFor each function call, output the function name and arguments within the "
    "following XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
    "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
    "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
# The supervised runs: what the model generates in each assistant turn + its terminator.
FULL_SUPERVISED = [
    "\n<think></think>\nHello!<|user|>",
    ("\n<think>Need the tool.</think>\nChecking.\n<tool_call>get_weather\n"
     "<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n"
     "<arg_value>2</arg_value>\n</tool_call><|observation|>"),
    "\n<think>It is warm.</think>\nIt is 21°C and sunny.<|endoftext|>",
]
FULL_EXPECTED = (
    "[gMASK]<sop>" + TOOLS_BLOCK + "<|system|>\nYou are helpful.<|user|>\nHi<|assistant|>"
    + FULL_SUPERVISED[0] + "\nWeather in 北京?<|assistant|>" + FULL_SUPERVISED[1]
    + '\n<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>\nsunny\n'
    "</tool_response><|assistant|>" + FULL_SUPERVISED[2])

SIMPLE = [{"role": "user", "content": "保持健康的三个提示。"},
          {"role": "assistant", "content": "以下是保持健康的三个提示：\n\n1. 运动。"}]

GLM4_TOOL = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather",
                                                          "arguments": {"city": "北京"}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny.", "reasoning_content": "dropped in glm4"},
]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    texts = [render_text(FULL, TOOLS), render_text(SIMPLE), "hello world 你好 北京 天气",
             render_text(FULL, TOOLS, template="glm4-0414")] * 3
    d = tmp_path_factory.mktemp("sp")
    train_sentencepiece(texts, str(d), 700)
    return load_tokenizer(str(d))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    texts = [render_text(FULL, TOOLS), render_text(SIMPLE), "hello world 你好",
             render_text(FULL, TOOLS, template="glm4-0414")] * 3
    d = tmp_path_factory.mktemp("hf")
    train_bpe(texts, str(d), 500)
    return str(d)


def _runs(ids, mask, tok, value):
    """Decoded maximal runs of tokens whose mask equals value."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m == value:
            cur.append(int(t))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_glm45_render_is_exact():
    assert render_text(FULL, TOOLS) == FULL_EXPECTED


def test_glm45_simple_and_generation_prompt():
    assert render_text(SIMPLE) == ("[gMASK]<sop><|user|>\n保持健康的三个提示。<|assistant|>\n"
                                   "<think></think>\n以下是保持健康的三个提示：\n\n1. 运动。"
                                   "<|endoftext|>")
    prompt = SIMPLE[:1]
    assert render_text(prompt, add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>\n保持健康的三个提示。<|assistant|>")
    assert render_text(prompt, add_generation_prompt=True, enable_thinking=False) == (
        "[gMASK]<sop><|user|>\n保持健康的三个提示。/nothink<|assistant|>\n<think></think>")


def test_glm4_template_is_exact():
    # The seed tutorial's printed GLM-4-9B format, plus the eos we supervise.
    assert render_text(SIMPLE, template="glm4") == (
        "[gMASK]<sop><|user|>\n保持健康的三个提示。<|assistant|>\n以下是保持健康的三个提示：\n\n1. 运动。"
        "<|endoftext|>")
    assert render_text(GLM4_TOOL, template="glm4") == (
        '[gMASK]<sop><|user|>\nWeather?<|assistant|>get_weather\n{"city": "北京"}'
        "<|observation|>\nsunny<|assistant|>\nSunny.<|endoftext|>")


@pytest.mark.parametrize("tokenizer", ["sp", "hf"])
def test_loss_mask_covers_exactly_the_assistant_spans(tokenizer, sp_tok, hf_dir):
    tok = sp_tok if tokenizer == "sp" else load_tokenizer(hf_dir)
    row, truncated = encode_sft(tok, Conversation(FULL, TOOLS), EncodeOptions())
    ids, mask = row["input_ids"], row["loss_mask"]
    assert not truncated
    assert tok.decode(ids) == FULL_EXPECTED
    assert _runs(ids, mask, tok, 1) == FULL_SUPERVISED
    # The terminators are single supervised special tokens.
    sup = set(ids[mask == 1].tolist())
    assert {tok.user_id, tok.observation_id, tok.eos_id} <= sup
    assert tok.assistant_id not in sup and tok.gmask_id not in sup
    # Span-wise tokenization equals tokenizing the whole text at once.
    assert ids.tolist() == tok.encode(FULL_EXPECTED)


def test_glm4_loss_mask(sp_tok):
    ids, mask, _ = encode_spans(sp_tok, render_spans(GLM4_TOOL, template="glm4"))
    assert _runs(ids, mask, sp_tok, 1) == ['get_weather\n{"city": "北京"}<|observation|>',
                                           "\nSunny.<|endoftext|>"]


def _tojson(x, ensure_ascii=False, indent=None):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent)


def _envs():
    """transformers' settings (sandboxed, trim/lstrip blocks) and jinja2's defaults: the
    template's output must not depend on them. Both get HF's tojson (no HTML escaping)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    envs = [ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True),
            jinja2.Environment()]
    for env in envs:
        env.filters["tojson"] = _tojson
    return envs


CASES = [(FULL, TOOLS), (FULL, None), (SIMPLE, None), (FULL[:4], None), (FULL[:6], TOOLS)]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("gen,thinking", [(False, None), (True, None), (True, False),
                                          (False, False), (True, True)])
def test_code_equals_jinja_in_plain_jinja2(case, gen, thinking):
    messages, tools = CASES[case]
    if gen and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    kw = {} if thinking is None else {"enable_thinking": thinking}
    for name, jinja in JINJA_TEMPLATES.items():
        if name == "glm4" and any(m.get("tool_calls") for m in messages):
            continue  # covered by GLM4_TOOL below (one call, no text)
        for env in _envs():
            text = env.from_string(jinja).render(messages=messages, tools=tools,
                                                 add_generation_prompt=gen, **kw)
            assert text == render_text(messages, tools, template=name,
                                       add_generation_prompt=gen, enable_thinking=thinking,
                                       add_eos=False), (name, env)


def test_code_equals_hf_apply_chat_template(hf_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_dir)
    ours = load_tokenizer(hf_dir)
    for messages, tools in CASES:
        text = hf.apply_chat_template(messages, tools=tools, tokenize=False)
        assert text == render_text(messages, tools, add_eos=False)
        # Our special-token-aware encode agrees with HF's tokenizer on the same text.
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    prompt = FULL[:4]
    for thinking in (None, False):
        kw = {} if thinking is None else {"enable_thinking": thinking}
        text = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kw)
        assert text == render_text(prompt, add_generation_prompt=True, enable_thinking=thinking)
    glm4 = hf.apply_chat_template(GLM4_TOOL, tokenize=False, chat_template=GLM4_JINJA)
    assert glm4 == render_text(GLM4_TOOL, template="glm4", add_eos=False)
    assert hf.chat_template == GLM45_JINJA  # train_tokenizer wrote it to tokenizer_config.json


def test_reasoning_in_content_is_split_like_the_official_template():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>\n\nthought\n</think>\n\n  answer  "}]
    assert render_text(msgs, add_eos=False).endswith(
        "<|assistant|>\n<think>thought</think>\nanswer")


def test_assistant_mask_is_zero_without_assistant_tokens(sp_tok):
    _, mask, _ = encode_spans(sp_tok, render_spans(FULL[:2], add_generation_prompt=True))
    assert not np.any(mask)


# --- GLM-4-0414 (model_type glm4) ---------------------------------------------------------------

# The oracle: the official GLM-4-0414 chat template (GLM-4-9B-0414 / GLM-4-32B-0414), verbatim as
# published in xorbitsai/inference, xinference/model/llm/llm_family.json (entry "glm4-0414").
OFFICIAL_GLM4_0414 = (
    '[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具\n'
    '{% for tool in tools %}{%- set function = tool.function if tool.get("function") else tool %}'
    '\n\n## {{ function.name }}\n\n{{ function | tojson(indent=4, ensure_ascii=False) }}\n'
    '在调用上述函数时，请使用 Json 格式表示调用的参数。{%- endfor %}{%- endif -%}'
    "{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n"
    "{{ msg.content }}{%- endif %}{%- endfor %}"
    "{%- for message in messages if message.role != 'system' %}{%- set role = message['role'] %}"
    "{%- set content = message['content'] %}{%- set meta = message.get(\"metadata\", \"\") %}"
    "{%- if role == 'user' %}<|user|>\n{{ content }}"
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ content }}"
    "{%- elif role == 'observation' %}<|observation|>\n{{ content }}"
    "{%- endif %}{%- endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

TOOLS2 = TOOLS + [{"type": "function", "function": {
    "name": "get_time", "description": "现在几点", "parameters": {"type": "object", "properties": {}}}}]
# A system message after the first turn: the 0414 template writes every system message first.
LATE_SYSTEM = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Time?"},
    {"role": "system", "content": "Answer briefly."},
]
# Two calls and no text in one assistant turn, two results.
TWO_CALLS = [
    {"role": "user", "content": "Weather and time?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "北京"}}, {"name": "get_time", "arguments": {}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "9:00"},
    {"role": "assistant", "content": "Sunny, 9:00."},
]
GLM4_0414_CASES = [(SIMPLE, None), (FULL[:4], None), (LATE_SYSTEM, None), (FULL, TOOLS),
                   (FULL, None), (GLM4_TOOL, TOOLS), (TWO_CALLS, TOOLS2)]

GLM4_0414_FULL_SUPERVISED = [
    "\nHello!<|user|>",
    '\nChecking.<|assistant|>get_weather \n{"city": "北京", "days": 2}<|observation|>',
    "\n<think>\nIt is warm.\n</think>\n\nIt is 21°C and sunny.<|endoftext|>",
]
GLM4_0414_FULL_EXPECTED = (
    "[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n"
    '{\n    "name": "get_weather",\n    "description": "查询天气",\n    "parameters": {\n'
    '        "type": "object",\n        "properties": {\n            "city": {\n'
    '                "type": "string"\n            }\n        }\n    }\n}'
    "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "<|system|>\nYou are helpful.<|user|>\nHi<|assistant|>" + GLM4_0414_FULL_SUPERVISED[0]
    + "\nWeather in 北京?<|assistant|>" + GLM4_0414_FULL_SUPERVISED[1]
    + '\n{"temp": 21}<|observation|>\nsunny<|assistant|>' + GLM4_0414_FULL_SUPERVISED[2])


def _official_messages(messages):
    """Our canonical messages in the shape the official 0414 template reads: a tool result is an
    "observation", a call an assistant message with metadata=name and content=arguments JSON."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if m["role"] == "tool":
            out.append({"role": "observation", "content": m["content"]})
        elif calls:
            if m["content"].strip():
                out.append({"role": "assistant", "content": m["content"]})
            out += [{"role": "assistant", "metadata": c["name"],
                     "content": json.dumps(c["arguments"], ensure_ascii=False)} for c in calls]
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def test_glm4_0414_render_is_exact():
    assert render_text(FULL, TOOLS, template="glm4-0414") == GLM4_0414_FULL_EXPECTED
    assert render_text(SIMPLE[:1], template="glm4-0414", add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>\n保持健康的三个提示。<|assistant|>")
    # The tools block: no persona line; one newline between two functions (HF's trim_blocks).
    text = render_text(SIMPLE[:1], TOOLS2, template="glm4-0414", add_generation_prompt=True)
    assert text.startswith("[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n{")
    assert "调用的参数。\n## get_time\n\n{" in text
    # System messages go first, in order.
    assert render_text(LATE_SYSTEM, template="glm4-0414") == (
        "[gMASK]<sop><|system|>\nYou are helpful.<|system|>\nAnswer briefly.<|user|>\nHi"
        "<|assistant|>\nHello!<|user|>\nTime?")


@pytest.mark.parametrize("case", range(len(GLM4_0414_CASES)))
@pytest.mark.parametrize("gen", [False, True])
def test_glm4_0414_equals_the_official_template_through_hf(hf_tok, case, gen):
    messages, tools = GLM4_0414_CASES[case]
    if gen and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ours = render_text(messages, tools, template="glm4-0414", add_generation_prompt=gen,
                       add_eos=False)
    kw = {"tools": tools, "tokenize": False, "add_generation_prompt": gen}
    assert hf_tok.apply_chat_template(messages, chat_template=GLM4_0414_JINJA, **kw) == ours
    official = hf_tok.apply_chat_template(_official_messages(messages),
                                          chat_template=OFFICIAL_GLM4_0414, **kw)
    assert official == ours


@pytest.mark.parametrize("tokenizer", ["sp", "hf"])
def test_glm4_0414_loss_mask_covers_exactly_the_assistant_spans(tokenizer, sp_tok, hf_dir):
    tok = sp_tok if tokenizer == "sp" else load_tokenizer(hf_dir)
    row, _ = encode_sft(tok, Conversation(FULL, TOOLS), EncodeOptions(template="glm4-0414"))
    ids, mask = row["input_ids"], row["loss_mask"]
    assert tok.decode(ids) == GLM4_0414_FULL_EXPECTED
    assert _runs(ids, mask, tok, 1) == GLM4_0414_FULL_SUPERVISED
    assert ids.tolist() == tok.encode(GLM4_0414_FULL_EXPECTED)
    # Of the <|assistant|> tokens only the one the model writes inside a turn (text, then a
    # call) is supervised; those opening a turn are the prompt's.
    assert mask[ids == tok.assistant_id].tolist() == [0, 0, 1, 0]
    assert tok.gmask_id not in ids[mask == 1]


def test_glm4_0414_loss_mask_with_two_calls(sp_tok):
    ids, mask, _ = encode_spans(sp_tok, render_spans(TWO_CALLS, TOOLS2, template="glm4-0414"))
    assert _runs(ids, mask, sp_tok, 1) == [
        'get_weather \n{"city": "北京"}<|assistant|>get_time \n{}<|observation|>',
        "\nSunny, 9:00.<|endoftext|>"]
    # The second result opens with its own <|observation|>, which ends no assistant turn.
    assert mask[ids == sp_tok.observation_id].tolist() == [1, 0]


def test_template_for_model_type():
    assert template_for_model_type("glm4_moe") == "glm4.5"
    assert template_for_model_type("glm") == "glm4"
    assert template_for_model_type("glm4") == "glm4-0414"
    assert set(MODEL_TYPE_TEMPLATES.values()) == set(TEMPLATES) == set(JINJA_TEMPLATES)
    with pytest.raises(ValueError, match="'llama'.*supported model types: glm4_moe, glm, glm4"):
        template_for_model_type("llama")


@pytest.mark.parametrize("model_type,jinja", [(None, GLM45_JINJA), ("glm4_moe", GLM45_JINJA),
                                              ("glm", GLM4_JINJA), ("glm4", GLM4_0414_JINJA)])
def test_export_writes_the_model_types_template(tmp_path, hf_dir, model_type, jinja):
    from glm_megatron.conversion.hf_export_files import copy_tokenizer

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    shutil.copyfile(f"{hf_dir}/tokenizer.json", src / "tokenizer.json")  # no template of its own
    args = () if model_type is None else (model_type,)
    assert "tokenizer_config.json" in copy_tokenizer(str(src), str(out), *args)
    with open(out / "tokenizer_config.json", encoding="utf-8") as fh:
        assert json.load(fh)["chat_template"] == jinja


def test_export_keeps_the_tokenizers_own_template(tmp_path, hf_dir):
    from glm_megatron.conversion.hf_export_files import copy_tokenizer

    copy_tokenizer(hf_dir, str(tmp_path), "glm4")
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as fh:
        assert json.load(fh)["chat_template"] == GLM45_JINJA  # train_tokenizer's, not glm4's
