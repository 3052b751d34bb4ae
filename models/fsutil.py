"""Small filesystem helpers: hashing, atomic writes, durable renames, safe copying and tar extraction."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Optional

from agent.storage import atomic_write_bytes


class UnsafePackage(Exception):
    """A package or archive tries to reach outside itself (.., absolute paths, links, devices)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a torn file, even across a power cut."""
    atomic_write_bytes(path, text.encode())


def is_within(root: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_tree(root: Path) -> None:
    """Refuse symlinks that lead outside ``root`` and anything that is not a file, directory or inner link."""
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                if not is_within(root, p):
                    raise UnsafePackage(f"{p.relative_to(root)} is a symlink leading outside the package")
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise UnsafePackage(f"{p.relative_to(root)} is not a regular file")


def copy_tree(src: Path, dst: Path, max_bytes: int) -> None:
    """Copy a package directory, dereferencing inner symlinks (the store keeps no links), refusing outer ones."""
    check_tree(src)
    total = 0
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for n in dirnames:
            if (Path(dirpath) / n).is_symlink():  # an inner link to a directory: copy it as a real directory
                shutil.copytree(Path(dirpath) / n, dst / rel / n, symlinks=False)
        for n in filenames:
            s = Path(dirpath) / n
            total += s.stat().st_size
            if total > max_bytes:
                raise UnsafePackage(f"package is larger than the {max_bytes} byte limit")
            shutil.copyfile(s, dst / rel / n)


def _check_member(m: tarfile.TarInfo, dest: Path) -> None:
    name = m.name
    if name.startswith("/") or "\\" in name or ".." in Path(name).parts:
        raise UnsafePackage(f"archive member {name!r} has an absolute or '..' path")
    if m.islnk():
        raise UnsafePackage(f"archive member {name!r} is a hard link")
    if m.issym():
        target = (dest / Path(name).parent / m.linkname)
        if m.linkname.startswith("/") or not is_within(dest, target):
            raise UnsafePackage(f"archive member {name!r} is a symlink leading outside the package ({m.linkname})")
    elif not (m.isfile() or m.isdir()):
        raise UnsafePackage(f"archive member {name!r} is a device, fifo or other special file")


def extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract a .tar.gz after checking every member; total unpacked size is bounded (tar bombs)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            total = 0
            for m in members:
                _check_member(m, dest)
                total += m.size if m.isfile() else 0
                if total > max_bytes:
                    raise UnsafePackage(f"archive unpacks to more than the {max_bytes} byte limit")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tf.extractall(dest, members=members, **kwargs)  # noqa: S202 - members checked above
    except tarfile.TarError as e:
        raise UnsafePackage(f"not a readable tar archive: {e}") from None
    check_tree(dest)


def copy_stream(
    src: BinaryIO, dst: BinaryIO, max_bytes: int, progress: Optional[Callable[[int], None]] = None
) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    for block in iter(lambda: src.read(1 << 16), b""):
        n += len(block)
        if n > max_bytes:
            raise UnsafePackage(f"more than the {max_bytes} byte limit")
        h.update(block)
        dst.write(block)
        if progress:
            progress(n)
    return n, h.hexdigest()
