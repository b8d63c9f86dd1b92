"""Files: crash-safe writes, and reading the small text files a user names with one-line errors.

Writes: a reader sees either the old file or the complete new one, never a part. Files and folders made here
get the permissions the user's umask gives new files (as `open` and `mkdir` would), not the private 0600 / 0700
of Python's temporary files.

Reads (`read_text_file`): a file that is missing, a directory, unreadable, empty, binary or not UTF-8 is a
one-line `LingmaoError` naming it (and the line, for text that is not UTF-8), never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from lingmao.errors import LingmaoError

NOT_UTF8_HINT = "convert the file, e.g. iconv -f GB18030 -t UTF-8"


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new file under the user's umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Permissions of a new folder under the user's umask."""
    return 0o777 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in `parent`, with the umask's permissions."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, dir_mode())
    return path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a file of the user's (missing, a directory, unreadable, empty), or None."""
    path = Path(path)
    if not path.exists():
        return f"{path}: file not found"
    if path.is_dir():
        return f"{path}: is a directory, expected a file"
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as exc:
        return f"{path}: cannot read the file ({exc.strerror or exc})"
    return None if first else f"{path}: the file is empty"


def decode_utf8(data: bytes, where: str, first_line: int = 1) -> str:
    """`data` as UTF-8 text (a leading BOM dropped); binary data or text in another encoding is a one-line
    LingmaoError naming `where` and, for text, the line (`data` starting at line `first_line`)."""
    if b"\x00" in data:  # no text file holds NUL bytes; UTF-16 files and binaries do
        raise LingmaoError(f"{where}: a binary file, not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + first_line
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
        raise LingmaoError(f"{where}:{line}: not UTF-8 (byte {column}); {NOT_UTF8_HINT}") from None


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of a file the user named (see the module docstring for the one-line errors)."""
    path = Path(path)
    problem = input_file_problem(path)
    if problem:
        raise LingmaoError(problem)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LingmaoError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return decode_utf8(data, str(path))


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on file `path` (created if missing, never deleted) while the block runs: processes
    that prepare the same files (the ranks of a multi-process run, on one machine or on a shared file system that
    supports locks) take turns, and the later ones find the work done. No lock where `fcntl` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
