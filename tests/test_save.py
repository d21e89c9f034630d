"""LCM Save Image's atomic write (lcm_comfy/save.py): a file appears under its final name only complete.

``write_atomically`` writes a hidden temporary file in the same folder and renames it into place; a write that
fails midway leaves neither the temporary file nor a truncated file under the final name. The renames are watched
by wrapping ``os.replace`` and ``os.rename`` (either is an atomic rename on POSIX); at each one the folder is looked
at: only the hidden file may be there, already holding every byte.
"""

from __future__ import annotations

import errno
import importlib
import os
import threading

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def save(pack):
    """lcm_comfy.save as ComfyUI loaded it (the module the LCM Save Image node runs)."""
    return importlib.import_module(f"{pack.root}.lcm_comfy.save")


@pytest.fixture
def renames(monkeypatch):
    """Every rename made meanwhile, as (source, destination, what the destination's folder held just before)."""
    seen: list[tuple[str, str, list[str], bytes]] = []
    lock = threading.Lock()

    def spy(real):
        def rename(src, dst, *args, **kwargs):
            src, dst = os.fspath(src), os.fspath(dst)
            with lock:
                with open(src, "rb") as f:
                    seen.append((src, dst, sorted(os.listdir(os.path.dirname(dst) or ".")), f.read()))
            return real(src, dst, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "replace", spy(os.replace))
    monkeypatch.setattr(os, "rename", spy(os.rename))
    return seen


def assert_renamed_from_a_hidden_neighbour(seen, final: str, data: bytes, others: tuple[str, ...] = ()) -> None:
    """``final`` came into being by exactly one rename, from a hidden file of the same folder that held ``data``."""
    into = [s for s in seen if s[1] == final]
    assert len(into) == 1, f"{final} was renamed into {len(into)} times: {seen}"
    src, _, listing, content = into[0]
    name = os.path.basename(final)
    assert os.path.dirname(src) == os.path.dirname(final), (src, final)
    assert os.path.basename(src).startswith(".") and os.path.basename(src) != name, src
    assert name not in listing, f"{name} existed before its rename: it was written under its final name"
    assert content == data, "the temporary file was renamed before it held every byte"
    assert set(listing) <= {os.path.basename(src), *others}, listing


def test_the_final_name_appears_only_by_a_rename_from_a_hidden_file_beside_it(save, tmp_path, renames):
    data = os.urandom(300_000)
    final = str(tmp_path / "lcm_00001_.png")
    save.write_atomically(final, data)
    assert_renamed_from_a_hidden_neighbour(renames, final, data)
    assert sorted(os.listdir(tmp_path)) == ["lcm_00001_.png"]  # the hidden file is gone: it became the final one
    with open(final, "rb") as f:
        assert f.read() == data


class _FailsMidway:
    """A file object whose write puts half the bytes on disk, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_midway_leaves_neither_file(save, tmp_path, monkeypatch, renames):
    opened: list[str] = []

    def open_failing(path, mode="r", *args, **kwargs):
        opened.append(os.fspath(path))
        return _FailsMidway(open(path, mode, *args, **kwargs))

    monkeypatch.setattr(save, "open", open_failing, raising=False)  # the module's open, not the builtin for everyone
    with pytest.raises(OSError, match="No space left"):
        save.write_atomically(str(tmp_path / "lcm_00001_.png"), os.urandom(100_000))
    assert opened, "write_atomically no longer writes through open(): make this test break its write another way"
    assert os.listdir(tmp_path) == []
    assert renames == []


def test_a_rename_that_fails_leaves_neither_file_and_an_interrupt_none_either(save, tmp_path, monkeypatch):
    def no_rename(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", no_rename)
    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OSError, match="cross-device"):
        save.write_atomically(str(tmp_path / "a.png"), b"x" * 1000)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    class Stop(BaseException):  # Ctrl-C, SystemExit: not an Exception, still cleaned up
        pass

    def interrupted(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        f.write(b"partial")
        f.close()
        raise Stop

    monkeypatch.setattr(save, "open", interrupted, raising=False)
    with pytest.raises(Stop):
        save.write_atomically(str(tmp_path / "b.png"), b"y" * 1000)
    assert os.listdir(tmp_path) == []


def test_lcm_save_image_writes_every_image_of_a_batch_atomically(save, tmp_path, renames):
    """The node's save path (save_images, what LCM Save Image calls) goes through the same rename for each file."""
    from PIL import Image

    images = torch.rand(3, 40, 24, 3, generator=torch.Generator().manual_seed(0))
    results, subfolder = save.save_images(images, "atomic/batch", str(tmp_path), compress_level=1)
    folder = tmp_path / "atomic"
    names = [r["filename"] for r in results]
    assert subfolder == "atomic" and sorted(os.listdir(folder)) == sorted(names) and len(names) == 3
    for i, name in enumerate(names):
        with open(folder / name, "rb") as f:
            data = f.read()
        # other images of the batch are written at the same time: their files and hidden files may be there too
        assert_renamed_from_a_hidden_neighbour(renames, str(folder / name), data,
                                               others=tuple(n for n in names if n != name) + tuple(
                                                   os.path.basename(s[0]) for s in renames if s[1] != str(folder / name)))
        with Image.open(folder / name) as img:
            assert np.array_equal(np.asarray(img), save.to_uint8(images[i]))
