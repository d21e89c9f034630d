"""What a PNG costs: ComfyUI's Save Image (PIL, one thread) against LCM Save Image's parallel encoder, per image.

Both encode the same 1024x1024 picture at compression levels 1 and 4 in this process (median of a few runs); the
picture looks natural (photographs, or smooth fields with grain where scikit-image is missing), since PNG's cost
depends on the content.
"""

from __future__ import annotations

import io
import logging
import os
import statistics
import time

from common import pack

log = logging.getLogger("lcm_bench")


def natural_pixels(size: int = 1024):
    """A natural-looking image: a mosaic of photographs bundled with scikit-image when it is installed, else
    smooth colour fields with edges and grain (noted in the result)."""
    import numpy as np

    try:
        from skimage import data, transform

        tiles = []
        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            img = getattr(data, name)()
            h, w = img.shape[:2]
            s = min(h, w)
            img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            tiles.append(transform.resize(img, (size // 2, size // 2), anti_aliasing=True).astype(np.float32))
        top, bottom = np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)
        return np.concatenate([top, bottom], 0), "scikit-image photo mosaic (astronaut, coffee, chelsea, rocket)"
    except ImportError:
        g = np.random.default_rng(0)
        coarse = g.random((size // 32, size // 32, 3))
        img = np.kron(coarse, np.ones((32, 32, 1)))
        img += 0.02 * g.standard_normal(img.shape)
        return img.astype(np.float32), "synthetic smooth colour fields (scikit-image not installed)"


def png_costs(reps: int = 5) -> dict:
    """Median ms and MB of one PNG per encoder and compression level, with the picture and the CPU it ran on."""
    import numpy as np
    import torch
    from PIL import Image

    save = pack("lcm_comfy.save")
    pixels, what = natural_pixels()
    image = torch.from_numpy(pixels)
    out = {"pixels": what, "cpu_cores": os.cpu_count(), "encoder_threads": save.ENCODER.workers}

    def best(fn):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            r = fn()
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 1), r

    for level in (1, 4):
        def pil(level=level):
            buf = io.BytesIO()
            Image.fromarray(np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)).save(buf, format="PNG", compress_level=level)
            return len(buf.getvalue())

        ms, size = best(pil)
        out[f"saveimage_pil_level{level}"] = {"ms": ms, "mb": round(size / 1e6, 3)}
        ms, data = best(lambda level=level: save.ENCODER.encode(image, level))
        out[f"lcm_parallel_level{level}"] = {"ms": ms, "mb": round(len(data) / 1e6, 3)}
    log.info("PNG cost: %s", out)
    return out
