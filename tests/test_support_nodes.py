"""A test-only ComfyUI node that hands Python objects (tensors, conditionings) into a prompt.

It is registered into ComfyUI's NODE_CLASS_MAPPINGS by the tests only; the pack never ships it.
"""

from __future__ import annotations

import itertools

_VALUES: dict[str, object] = {}
_COUNTER = itertools.count()


def stash(value) -> str:
    key = f"v{next(_COUNTER)}"
    _VALUES[key] = value
    return key


class LCMTestValue:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("*",)
    FUNCTION = "get"
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, key):
        return key

    def get(self, key):
        return (_VALUES[key],)


def register(nodes_module) -> None:
    nodes_module.NODE_CLASS_MAPPINGS.setdefault("LCMTestValue", LCMTestValue)
