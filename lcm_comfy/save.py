"""LCM Save Image: ComfyUI's SaveImage (same file names, same embedded workflow), with the PNG encoded in parallel.

ComfyUI's SaveImage encodes each PNG on the executor thread with one core (about 230 ms for a 1024² image at
its compress level 4 on the issue's 2-core host), and the GPU waits meanwhile, since the next prompt only starts
when this one has returned. Here the image is cut into horizontal strips; each strip is converted to bytes,
PNG-filtered (Paeth) and deflated on a thread of its own (numpy and zlib release the GIL), and the strips'
deflate streams are joined into one zlib stream (each ends on a byte boundary with a sync flush, as pigz does).

The file is what SaveImage would write, pixel for pixel: the float-to-byte conversion is SaveImage's own
``np.clip(255. * x, 0, 255).astype(np.uint8)``, the name comes from ``folder_paths.get_save_image_path``, and the
``prompt`` / ``extra_pnginfo`` entries are the same ``tEXt`` chunks (``json.dumps`` of each), so dragging the image
into ComfyUI loads its workflow. Only the compressed bytes differ (another filter choice and strip boundaries),
so files are a few per cent larger than PIL's at the same level.

A file is complete before its name is returned: each is written under a hidden temporary name in the output
folder and renamed (atomically, ``os.replace``) before the node returns its UI result, so a client that finds it
in ``/history`` and fetches it with ``/view`` never reads part of a file, and a crash leaves no truncated PNG
under a real name. Images that are not 3- or 4-channel float tensors go through PIL exactly as SaveImage does.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..lcm_core.errors import LCMInputError

log = logging.getLogger("lcm_nodes")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Rows per strip at least: below this, thread hand-off and lost deflate context cost more than they save.
MIN_STRIP_ROWS = 32
PAETH = 4


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """SaveImage's conversion of one IMAGE (H, W, C floats in [0, 1]) to bytes, operation for operation."""
    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else image
    return np.clip(255.0 * array, 0, 255).astype(np.uint8)


def _paeth_filter(rows: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """PNG filter type 4 of ``rows`` (n, stride) bytes, given the unfiltered row ``above`` them (zeros at the top).

    Paeth predicts each byte from its left (a), upper (b) and upper-left (c) neighbours, picking the one nearest
    to a + b - c (ties: a, then b). Vectorised over the whole strip: every neighbour is an unfiltered byte.
    """
    x = rows.astype(np.int16)
    b = np.empty_like(x)
    b[0] = above
    b[1:] = x[:-1]
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    c = np.zeros_like(x)
    c[:, bpp:] = b[:, :-bpp]
    pa = np.abs(b - c)  # |p - a| with p = a + b - c
    pb = np.abs(a - c)  # |p - b|
    pc = np.abs(a + b - 2 * c)  # |p - c|
    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return (x - pred).astype(np.uint8)


def _zlib_header(level: int) -> bytes:
    cmf = 0x78  # deflate, 32 KiB window
    flevel = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    flg = flevel << 6
    flg |= 31 - ((cmf << 8) | flg) % 31
    return bytes((cmf, flg))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(keyword: str, text: str) -> bytes:
    """A tEXt chunk, as PIL's ``PngInfo.add_text`` writes one for latin-1 text (json.dumps output always is)."""
    try:
        return _chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:  # as PIL does for text outside latin-1: an uncompressed iTXt chunk
        return _chunk(b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


class PngEncoder:
    """Encodes RGB/RGBA images to PNG bytes on a pool of threads.

    One instance serves the process (:data:`ENCODER`); its pool is created on first use under a lock and lives as
    long as the process (idle threads cost nothing). Any thread may call :meth:`encode`; calls may overlap.
    """

    def __init__(self, max_workers: int | None = None) -> None:
        self._max_workers = max_workers or max(1, min(16, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def workers(self) -> int:
        return self._max_workers

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="lcm-png")
            return self._pool

    def encode(self, image: torch.Tensor | np.ndarray, level: int = 4, texts: list[tuple[str, str]] = ()) -> bytes:
        """PNG bytes of one IMAGE (H, W, 3 or 4 floats in [0, 1], converted as SaveImage does) or uint8 array."""
        if not isinstance(level, int) or not 0 <= level <= 9:
            raise LCMInputError(f"compress_level={level!r} is out of range: use 0 (none, fastest) to 9 (smallest); SaveImage uses 4.")
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise LCMInputError(f"image has shape {tuple(array.shape)}; the parallel PNG encoder takes [height, width, 3 or 4].")
        height, width, channels = array.shape
        strips = max(1, min(self._max_workers, height // MIN_STRIP_ROWS))
        bounds = [round(i * height / strips) for i in range(strips + 1)]

        def strip(i: int) -> tuple[bytes, bytes]:
            r0, r1 = bounds[i], bounds[i + 1]
            lo = max(r0 - 1, 0)
            block = array[lo:r1] if array.dtype == np.uint8 else to_uint8(array[lo:r1])
            block = block.reshape(r1 - lo, width * channels)
            above = block[0] if r0 > 0 else np.zeros(width * channels, np.uint8)
            rows = block[1:] if r0 > 0 else block
            filtered = np.empty((r1 - r0, width * channels + 1), np.uint8)
            filtered[:, 0] = PAETH
            filtered[:, 1:] = _paeth_filter(rows, above, channels)
            raw = filtered.tobytes()
            deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
            last = i == strips - 1
            return raw, deflate.compress(raw) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

        parts = list(self._executor().map(strip, range(strips))) if strips > 1 else [strip(0)]
        adler = 1
        for raw, _ in parts:
            adler = zlib.adler32(raw, adler)
        color_type = 2 if channels == 3 else 6
        out = [PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))]
        out += [_text_chunk(k, v) for k, v in texts]
        idat = [_zlib_header(level) + parts[0][1]] + [p[1] for p in parts[1:]]
        idat[-1] += struct.pack(">I", adler & 0xFFFFFFFF)
        out += [_chunk(b"IDAT", data) for data in idat]
        out.append(_chunk(b"IEND", b""))
        return b"".join(out)


ENCODER = PngEncoder()


def metadata_texts(prompt: dict | None, extra_pnginfo: dict | None) -> list[tuple[str, str]]:
    """The text entries SaveImage embeds: ``prompt``, then each ``extra_pnginfo`` key (the UI's ``workflow``)."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return []
    texts = []
    if prompt is not None:
        texts.append(("prompt", json.dumps(prompt)))
    if extra_pnginfo is not None:
        texts += [(k, json.dumps(extra_pnginfo[k])) for k in extra_pnginfo]
    return texts


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file in the same folder, renamed into place."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _pil_png(image: torch.Tensor, level: int, texts: list[tuple[str, str]]) -> bytes:
    """SaveImage's own encoding (PIL), for images the parallel encoder does not take."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = None
    if texts:
        info = PngInfo()
        for k, v in texts:
            info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG", pnginfo=info, compress_level=level)
    return buf.getvalue()


def save_images(images: torch.Tensor, filename_prefix: str, output_dir: str, prompt: dict | None = None,
                extra_pnginfo: dict | None = None, compress_level: int = 4) -> tuple[list[dict], str]:
    """Save a batch of IMAGEs as SaveImage does; returns (one {filename, subfolder} per image, the subfolder).

    Every image of the batch is encoded at once (strips of all images share the pool), and every file is complete
    under its final name when this returns.
    """
    import folder_paths

    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise LCMInputError(f"images is {shape}, not an IMAGE batch [batch, height, width, channels]: connect a VAE Decode output.")
    if not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
        raise LCMInputError(f"compress_level={compress_level!r} is out of range: use 0 (none, fastest) to 9 (smallest); SaveImage uses 4.")
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, output_dir, images[0].shape[1], images[0].shape[0])
    texts = metadata_texts(prompt, extra_pnginfo)
    parallel = images.shape[-1] in (3, 4)
    names = [f"{filename.replace('%batch_num%', str(i))}_{counter + i:05}_.png" for i in range(images.shape[0])]

    def encode_and_write(i: int) -> None:
        data = ENCODER.encode(images[i], compress_level, texts) if parallel else _pil_png(images[i], compress_level, texts)
        write_atomically(os.path.join(folder, names[i]), data)

    if len(names) == 1:
        encode_and_write(0)
    else:  # the images' strips queue on the same pool; one helper thread per image just gathers them
        with ThreadPoolExecutor(min(len(names), 8), thread_name_prefix="lcm-save") as batch_pool:
            list(batch_pool.map(encode_and_write, range(len(names))))
    return [{"filename": n, "subfolder": subfolder} for n in names], subfolder
