"""The pack's own exception types.

Every user-facing check raises one of these with the bad value, the allowed
range and the fix, so that ComfyUI shows a message a person can act on.
All derive from :class:`LCMError` (itself a ``ValueError``), so callers that
only care that *something* was wrong with the input can catch one type.
"""

from __future__ import annotations


class LCMError(ValueError):
    """Base class of every error this pack raises on purpose."""


class LCMInputError(LCMError):
    """A value given to a node or function is outside what it accepts."""


class LCMModelError(LCMError):
    """A model file or MODEL object cannot be used (wrong kind, broken, unsupported shape)."""


class LCMLoRAError(LCMError):
    """A LoRA file does not fit the model it is applied to, or cannot be parsed."""
