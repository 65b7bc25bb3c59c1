"""Atomic, protected output directories: nothing that looks complete until everything is written,
and nothing deleted that a conversion did not write.

Every writer works in ``<out>.partial`` and the directory is renamed to ``<out>`` only at the
end, so an interrupted conversion leaves a ``.partial`` directory that no loader accepts (and
that the next run removes), never a half-written ``<out>``. :func:`finish` leaves a
:data:`MARKER` in ``<out>`` listing what it wrote.

``--overwrite`` replaces an existing ``<out>`` only when everything in it was written by a
conversion: the entries its marker lists or, for outputs of older versions without a marker,
file names a conversion writes (weights, configs, tokenizer files). A run directory
(``iter_*``, ``latest``, logs, TensorBoard) or anything else is refused by name, as is an output
directory that is, or contains, one of the conversion's own inputs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

from ..models.config import ConfigError

MARKER = ".glm_megatron_output.json"
# What the converters write (torch_dist weights dirs, HF model dirs, PEFT adapters).
_WRITTEN_NAMES = ("*.safetensors", "model.safetensors.index.json", "config.json",
                  "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
                  "chat_template.jinja", "adapter_config.json", "*.distcp", ".metadata",
                  "metadata.json", "common.pt", "model_config.json", "glm_megatron.json",
                  "reward_model.json", "adapter_base.json", MARKER)


def partial_path(out_dir: str) -> str:
    return os.path.abspath(out_dir).rstrip("/") + ".partial"


def _contains(parent: str, child: str) -> bool:
    parent, child = os.path.realpath(parent), os.path.realpath(child)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def foreign_entries(out_dir: str) -> list[str]:
    """The entries of ``out_dir`` that no conversion wrote."""
    entries = sorted(os.listdir(out_dir))
    marker = os.path.join(out_dir, MARKER)
    written = None
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as fh:
                written = set(json.load(fh)["entries"]) | {MARKER}
        except (OSError, ValueError, KeyError, TypeError):
            written = None
    if written is not None:
        return [e for e in entries if e not in written]
    return [e for e in entries if os.path.isdir(os.path.join(out_dir, e))
            or not any(fnmatch.fnmatch(e, pattern) for pattern in _WRITTEN_NAMES)]


def check_output_dir(out_dir: str, overwrite: bool, inputs=()) -> None:
    """Refuse an existing non-empty output directory unless ``overwrite`` and it holds only what
    a conversion wrote; refuse an output directory that is or contains one of ``inputs``."""
    if os.path.isfile(out_dir):
        raise ConfigError(f"{out_dir}: exists and is a file, not a directory")
    for source in inputs:
        if source and os.path.exists(source) and _contains(out_dir, source):
            raise ConfigError(f"{out_dir}: the output directory holds this conversion's input "
                              f"{source}; write the output somewhere else")
    if not (os.path.isdir(out_dir) and os.listdir(out_dir)):
        return
    if not overwrite:
        raise ConfigError(
            f"{out_dir}: output directory exists and is not empty (pass --overwrite to replace it)"
        )
    foreign = foreign_entries(out_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{out_dir}: --overwrite refused: the directory holds {shown}, which no "
                          "conversion wrote (a training run or other files); choose a new or "
                          "empty output directory")


def start(out_dir: str) -> str:
    """Create a fresh ``<out>.partial`` (removing a stale one) and return it."""
    tmp = partial_path(out_dir)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def finish(out_dir: str) -> None:
    """Move ``<out>.partial`` into place, with its :data:`MARKER`; an old ``<out>`` is replaced
    (:func:`check_output_dir` allowed it)."""
    tmp = partial_path(out_dir)
    final = os.path.abspath(out_dir)
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:
        json.dump({"written_by": "glm_megatron.conversion",
                   "entries": sorted(os.listdir(tmp)) + [MARKER]}, fh)
    old = None
    if os.path.exists(final):
        old = final.rstrip("/") + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old)
