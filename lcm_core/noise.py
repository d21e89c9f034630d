"""A seeded noise stream that reproduces diffusers' LCM pipelines.

Diffusers' LCM pipelines draw, from one ``torch.Generator("cpu")``, first the initial noise (the
whole batch in one ``randn``) and then one noise tensor per step except the last, in the model's dtype.
:class:`NoiseStream` draws the same numbers in the same order, so ``seed`` here and
``generator=torch.Generator("cpu").manual_seed(seed)`` there give the same image. Drawing on the CPU
keeps results identical across devices, as ComfyUI's own ``prepare_noise`` does; the stream is drawn in
full before sampling so the loop needs no host round-trip per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LCMInputError

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class NoiseStream:
    """Initial and per-step noise for one sampling run.

    Attributes:
        initial: noise for the start latent, shape of the latent batch.
        steps: noise for re-noising after step ``i`` (``len == num_steps - 1``).
    """

    initial: torch.Tensor
    steps: tuple[torch.Tensor, ...]


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is an int in [0, 2**64 - 1], else raise LCMInputError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LCMInputError(f"seed={seed!r} is out of range: use a whole number from 0 to {MAX_SEED}.")
    return seed


class SeededNoise:
    """The same sequence as :func:`draw_noise`, drawn one tensor at a time.

    The sampler draws each step's noise while the GPU computes that step, instead of all of it before
    the first step. The first :meth:`draw` is the initial noise, then one per step, in diffusers' order.
    """

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
        check_seed(seed)
        self.shape = tuple(shape)
        self.dtype = dtype
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def draw(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype)


def draw_noise(seed: int, shape: tuple[int, ...], num_steps: int, dtype: torch.dtype = torch.float32) -> NoiseStream:
    """Draw the noise diffusers' LCM pipelines draw for ``num_steps`` steps on a latent of ``shape``.

    ``dtype`` is the dtype diffusers would sample in (the pipeline's ``prompt_embeds`` dtype, i.e. the
    model's); values are returned in that dtype on the CPU.
    """
    check_seed(seed)
    if num_steps < 1:
        raise LCMInputError(f"num_steps={num_steps} must be at least 1.")
    # torch.Generator.manual_seed takes the seed as uint64 bits; diffusers users pass the same int.
    noise = SeededNoise(seed, shape, dtype)
    initial = noise.draw()
    steps = tuple(noise.draw() for _ in range(num_steps - 1))
    return NoiseStream(initial=initial, steps=steps)
