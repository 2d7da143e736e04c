"""Control tokens found by their text in the real SmolLM2 vocabulary (tool-call markers)."""

from __future__ import annotations

from lmserve.engine.runner import Model


def test_control_tokens_are_found_by_their_text(model_path):
    model = Model(model_path)
    try:
        start, end = model.control_tokens({"<|im_start|>"}), model.control_tokens({"<|im_end|>"})
        assert len(start) == 1 and len(end) == 1 and start != end
        assert model.token_bytes(next(iter(start))) == b"<|im_start|>"
        # Plain words and multi-token strings are not control tokens.
        assert model.control_tokens({"hello", "<tool_call>"}) == frozenset()
    finally:
        model.close()
