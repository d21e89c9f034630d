"""A seeded noise stream that reproduces diffusers' LCM pipelines.

Diffusers' LCM pipelines draw, from one ``torch.Generator("cpu")``, first the initial noise (the
whole batch in one ``randn``) and then one noise tensor per step except the last, in the model's dtype.
:class:`SeededNoise` draws the same numbers in the same order, so ``seed`` here and
``generator=torch.Generator("cpu").manual_seed(seed)`` there give the same image. Drawing on the CPU
keeps results identical across devices, as ComfyUI's own ``prepare_noise`` does.
"""

from __future__ import annotations

import torch

from .errors import LCMInputError

MAX_SEED = 2**64 - 1


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is an int in [0, 2**64 - 1], else raise LCMInputError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LCMInputError(f"seed={seed!r} is out of range: use a whole number from 0 to {MAX_SEED}.")
    return seed


class SeededNoise:
    """diffusers' noise sequence for one run, drawn one tensor at a time.

    The first :meth:`draw` is the initial noise (the whole batch in one ``randn``), then one per re-noising step,
    in diffusers' order, shape and dtype. The sampler draws each step's noise while the GPU computes that step.
    """

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
        check_seed(seed)
        self.shape = tuple(shape)
        self.dtype = dtype
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def draw(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype)
