"""--cache DIR: every image decoded and resized once, read back as raw pixels afterwards.

An entry holds the uint8 (C, H, W) pixels of `Resize((size, size))(load_image(path, size))`,
exactly what the uncached pipeline feeds to its next transform (resizing an image to its
own size is the identity), so a cached run computes what an uncached one does. The bytes
are read straight into a tensor: no image library and no header to parse. Entries are named
by a hash of the source's absolute path, byte size, modification and change times and inode
and of the size, so an edited or replaced image is decoded again. Each entry is written to a
temporary file and renamed into place: concurrent workers and processes never read a
partial entry. The pixels are followed by their CRC-32: an entry of the wrong length, or of
the right length with other bytes (zeros, as a power cut can leave a renamed file on some
file systems), is simply rebuilt.
"""
import hashlib
import multiprocessing
import os
import tempfile
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch
from torchvision.transforms import functional as TF

from tgn.data import load_image
from tgn.errors import UserError

SUFFIX = ".chwc"  # raw pixels and their CRC-32; earlier versions' .npy and .chw entries are not read
CRC_BYTES = 4


class ResizeCache:
    def __init__(self, root, size, draft=True):
        # Images decoded in full (--full-decode) differ by a few levels: kept apart.
        self.root = Path(root) / f"{int(size)}px{'' if draft else '-full'}"
        self.size, self.draft = int(size), draft
        # Shared with forked DataLoader workers (started again every evaluation): one warning
        # in the run, not one per worker and epoch. Spawned ones (macOS, Windows) get a copy
        # (__getstate__); they are kept between epochs, so each says it once at most.
        self.said_unwritable = multiprocessing.RawValue("b", 0)
        try:  # checked once here, so that a wrong --cache is one line at start-up
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as exc:
            raise UserError(f"--cache {root}: cannot write there ({exc.strerror or exc}); "
                            "pass a writable folder") from exc

    def __getstate__(self):
        return {**self.__dict__, "said_unwritable": SimpleNamespace(value=self.said_unwritable.value)}

    def entry(self, path):
        path = os.path.abspath(path)
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc.strerror or exc}") from exc
        # The change time too: a file replaced with the same size and its old mtime (cp -p,
        # rsync -t, unpacking an archive) still gets a new ctime, which cannot be set back.
        identity = f"{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}"
        key = hashlib.sha1(f"{path}\0{identity}\0{self.size}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def load(self, path):
        """The RGB image at `path`, resized to size x size, as a uint8 (3, size, size) tensor."""
        entry = self.entry(path)
        pixels = torch.empty(3, self.size, self.size, dtype=torch.uint8)
        raw = memoryview(pixels.numpy()).cast("B")
        try:
            with open(entry, "rb") as handle:
                # One byte more than an entry holds: a longer file is not an entry either.
                if handle.readinto(raw) == len(raw):
                    crc = handle.read(CRC_BYTES + 1)
                    if len(crc) == CRC_BYTES and int.from_bytes(crc, "little") == zlib.crc32(raw):
                        return pixels
        except OSError:
            pass  # missing or unreadable: (re)build it
        image = load_image(path, self.size if self.draft else None)
        pixels = TF.pil_to_tensor(TF.resize(image, [self.size, self.size])).contiguous()
        tmp = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(pixels.numpy().data)
                handle.write(zlib.crc32(pixels.numpy().data).to_bytes(CRC_BYTES, "little"))
            os.replace(tmp, entry)
        except OSError as exc:  # a full disk costs speed, not the run
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            # Said once (another process may have written the entry meanwhile: then all is well).
            if not self.said_unwritable.value and not os.path.exists(entry):  # exists() may raise: this cannot
                self.said_unwritable.value = 1
                warnings.warn(f"--cache: cannot write {entry} ({exc.strerror or exc}): the images it cannot keep are "
                              "decoded again every epoch (a full disk? on Windows, a path over 260 characters: "
                              "a shorter --cache)")
        return pixels
