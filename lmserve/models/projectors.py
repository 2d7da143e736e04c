"""Which vision projector (mmproj GGUF) belongs to which model of a folder.

A projector is a GGUF whose file name contains `mmproj`; it is never a model. A folder can hold
several models and several projectors, so a projector is attached only where it belongs:

1. By name: `mmproj-NAME[-TAG].gguf` or `NAME-mmproj[-TAG].gguf`, where NAME is the model's file
   stem with or without its quantization tag (`gemma-3-4b-it-Q4_K_M.gguf` takes
   `mmproj-gemma-3-4b-it-f16.gguf`; both quantizations of one model take it). A projector
   that names a model exactly goes to it (or to each model that NAME is, without its tag);
   otherwise to the model with the longest name that it starts with (`mmproj-NAME-...`).
2. Else, in a folder with exactly one model (llama-server's router layout: a multimodal model
   in a subfolder of its own, with its `mmproj*.gguf`), or among the files of one Hugging Face
   repository (one model, several quantizations: `llama-server -hf` takes the repository's
   projector), the projector no name claims; with several, the first by name.
3. Else none: the projector is named in the log as attached to no model.

Ollama's store says it itself: a manifest's projector layer (models.library).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("lmserve.models")

# A quantization or precision tag at the end of a file stem: -Q4_K_M, .q8_0, -IQ2_XS, -UD-Q4_K_XL,
# -F16, -BF16, -f32, -MXFP4...
_TAG = re.compile(r"[-_.](?:ud[-_])?(?:i?q\d\w*|tq\d\w*|bf16|fp16|f16|f32|mxfp4\w*)$",
                  re.IGNORECASE)
_MARK = re.compile(r"(?:^|[-_.])mmproj(?:[-_.]|$)", re.IGNORECASE)
_SEPARATORS = "-_."


def is_projector(filename: str) -> bool:
    """Whether a file is a vision projector (not a model): a GGUF named *mmproj*."""
    name = filename.lower()
    return name.endswith(".gguf") and "mmproj" in name


def _untagged(stem: str) -> str:
    return _TAG.sub("", stem.lower())


def _names(stem: str) -> set[str]:
    """The names a projector may give a model by: its stem, and the stem without its tag."""
    return {n for n in (stem.lower(), _untagged(stem)) if n}


def _core(projector_stem: str) -> str:
    """What a projector's name says of its model: `mmproj-NAME-f16` and `NAME-mmproj-f16` both
    say NAME; `mmproj-F16` says nothing."""
    stem = projector_stem.lower()
    mark = _MARK.search(stem)
    if mark is None:  # "mmproj" inside a word: take the name as it is
        return _untagged(stem)
    before, after = stem[:mark.start()], stem[mark.end():]
    return before or _untagged("-" + after).lstrip(_SEPARATORS)


def match(models: Sequence[str], projectors: Sequence[Path], *, one_model: bool = False
          ) -> tuple[list[Path | None], list[Path]]:
    """The projector of each model of one folder (by the models' file stems, in order), and
    the projectors attached to none. `one_model`: the folder's models are quantizations of one
    model (a Hugging Face repository's files)."""
    chosen: list[Path | None] = [None] * len(models)
    claimed: set[Path] = set()
    names = [_names(stem) for stem in models]
    for projector in sorted(projectors):
        core = _core(projector.stem)
        if not core:
            continue
        owners = [i for i, n in enumerate(names) if core in n]
        if not owners:  # mmproj-NAME-more: the longest NAME it starts with
            best = 0
            for i, n in enumerate(names):
                for name in n:
                    if core.startswith(name) and core[len(name)] in _SEPARATORS:
                        if len(name) > best:
                            best, owners = len(name), [i]
                        elif len(name) == best and i not in owners:
                            owners.append(i)
        for i in owners:
            if chosen[i] is None:
                chosen[i] = projector
        if owners:
            claimed.add(projector)
    free = [p for p in sorted(projectors) if p not in claimed]
    takers = [i for i in range(len(models)) if chosen[i] is None]
    if free and takers and (len(models) == 1 or one_model):
        for i in takers:
            chosen[i] = free[0]
        claimed.add(free[0])
    return chosen, [p for p in sorted(projectors) if p not in claimed]


def report_unattached(projectors: Sequence[Path]) -> None:
    for projector in projectors:
        log.warning("vision projector %s is attached to no model: name it mmproj-MODEL.gguf "
                    "after its model's file, put the two in a folder of their own, or give it "
                    "with --mmproj (mmproj in the model's [models.NAME] section)", projector)
