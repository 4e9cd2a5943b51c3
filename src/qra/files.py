"""Atomic writes and sha256 digests: the one place that knows how qra writes a file or folder and hashes
a state, a text or files.

Writers never leave a half-written file or folder: they write under a unique temporary name in the
target's own folder (unique, so two processes writing the same target never take each other's file), then
rename it into place. Digests name what a cached result depends on (sha256 over the canonical JSON of it)
and what a plan, a model or a package holds (sha256 over a text, or over files' names and bytes).
"""

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path


def text_digest(text: str) -> str:
    """sha256 (hex) of `text` as UTF-8."""
    return hashlib.sha256(text.encode()).hexdigest()


def digest(identity: object, length: int = 64) -> str:
    """sha256 (hex, first `length` characters) of `identity` as canonical JSON (sorted keys)."""
    return text_digest(json.dumps(identity, sort_keys=True, default=str))[:length]


def files_digest(labelled: Iterable[tuple[str, Path]]) -> str:
    """sha256 (hex) over each (label, file) in turn: the label as UTF-8, then the file's bytes."""
    hasher = hashlib.sha256()
    for label, path in labelled:
        hasher.update(label.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                hasher.update(chunk)
    return hasher.hexdigest()


def content_digest(path: Path) -> str:
    """sha256 (hex) of a file's bytes, or of a folder's files: each one's path relative to the folder, a NUL
    and its bytes, in sorted order."""
    if not path.is_dir():
        return files_digest([("", path)])
    files = sorted(item for item in path.rglob("*") if item.is_file())
    return files_digest((item.relative_to(path).as_posix() + "\0", item) for item in files)


def _temporary(target: Path, suffix: str = ".tmp") -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `target` to write a file to; renamed onto `target` when the block ends
    without an error, removed when it fails. `suffix` keeps an extension writers look at (".png")."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(target, suffix)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    """Write `text` to `target` atomically (flushed to disk before the rename)."""
    with atomic_path(target) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `target` to fill; it replaces `target` (which is removed, if any)
    when the block ends without an error, and is removed when it fails."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary(target)
    staging.mkdir()
    try:
        yield staging
        previous = None
        if target.exists():
            previous = _temporary(target, ".old")
            os.replace(target, previous)
        os.replace(staging, target)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
