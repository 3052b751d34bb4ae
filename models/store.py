"""The model store: install, verify, list, activate and remove versioned model packages.

Layout under ``root``::

    .staging/<random>/    installs in progress (removed on failure; leftovers are cleared on start)
    .lock                 cross-process lock (the CLI and the agent may both write)
    <name>/<version>/     an installed package: manifest + files, every sha256 verified
    <name>/.active        the version in use (written atomically)

A package becomes visible only by ``rename`` of a fully verified staging directory, so a crash leaves either the
old state or the new one, never a half-copied model.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from agent.storage import fsync_dir
from models.config import ModelsConfig
from models.fsutil import (
    UnsafePackage,
    atomic_write_text,
    check_tree,
    copy_stream,
    copy_tree,
    extract_tar,
    is_within,
    sha256_file,
)
from models.manifest import NAME_RE, VERSION_RE, ManifestError, ModelManifest, load_manifest, manifest_path

# progress(phase, done, total): phase is "download", "verify" or "install"; total is None when unknown.
Progress = Callable[[str, int, Optional[int]], None]

ACTIVE = ".active"


class StoreError(Exception):
    """An install/remove/activate failed; the message says what to do."""

    def __init__(self, message: str, code: str = "store_error"):
        super().__init__(message)
        self.code = code


class InstallResult(BaseModel):
    name: str
    version: str
    path: str
    activated: bool
    previous: Optional[str] = None
    already_installed: bool = False


class ModelSummary(BaseModel):
    name: str
    active: Optional[str]
    versions: list[str]
    task: Optional[str] = None
    description: str = ""
    formats: list[str] = []


@dataclass
class Staged:
    """A verified package in a staging directory, not yet visible in the store."""

    dir: Path
    manifest: ModelManifest
    workdir: Path


def _version_key(v: str) -> tuple:
    # Numeric parts compare as numbers so that 1.10 sorts after 1.9.
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+_-]", v))


def verify_package(pkg: Path, manifest: ModelManifest) -> None:
    """Every listed file exists inside the package, is a regular file and has the manifest's sha256."""
    for ref in manifest.all_files():
        p = pkg / ref.path
        if not is_within(pkg, p):
            raise UnsafePackage(f"{ref.path} leads outside the package")
        if not p.is_file():
            raise StoreError(f"package lists {ref.path} but does not contain it", "missing_file")
        if ref.size is not None and p.stat().st_size != ref.size:
            raise StoreError(f"{ref.path}: size {p.stat().st_size} != manifest {ref.size}", "checksum_mismatch")
        digest = sha256_file(p)
        if digest != ref.sha256:
            raise StoreError(
                f"{ref.path}: sha256 {digest} does not match the manifest ({ref.sha256}); the file is corrupt or "
                "the manifest is stale",
                "checksum_mismatch",
            )


class ModelStore:
    def __init__(self, root: Path, config: Optional[ModelsConfig] = None):
        self.root = Path(root)
        self.config = config or ModelsConfig()
        self._lock = threading.RLock()
        self.root.mkdir(parents=True, exist_ok=True)
        self._clear_staging()

    # --- locking and paths -------------------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Thread lock plus an flock on root/.lock, so the CLI and a running agent never interleave writes."""
        with self._lock:
            with open(self.root / ".lock", "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def _staging(self) -> Path:
        d = self.root / ".staging" / uuid.uuid4().hex
        d.mkdir(parents=True)
        return d

    def _clear_staging(self) -> None:
        st = self.root / ".staging"
        if st.is_dir():
            for d in st.iterdir():
                shutil.rmtree(d, ignore_errors=True)

    def model_dir(self, name: str) -> Path:
        if not NAME_RE.match(name):
            raise StoreError(f"invalid model name {name!r}", "invalid_name")
        return self.root / name

    def version_dir(self, name: str, version: str) -> Path:
        if not VERSION_RE.match(version) or version in (".", ".."):
            raise StoreError(f"invalid version {version!r}", "invalid_version")
        return self.model_dir(name) / version

    # --- queries -----------------------------------------------------------------------------------------------
    def versions(self, name: str) -> list[str]:
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        vs = [p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(vs, key=_version_key)

    def active_version(self, name: str) -> Optional[str]:
        try:
            v = (self.model_dir(name) / ACTIVE).read_text().strip()
        except OSError:
            return None
        return v if v in self.versions(name) else None

    def manifest(self, name: str, version: Optional[str] = None) -> ModelManifest:
        version = version or self.active_version(name)
        if version is None:
            raise StoreError(f"model {name!r} is not installed (see `cv-worker models list`)", "not_found")
        d = self.version_dir(name, version)
        if not d.is_dir():
            have = ", ".join(self.versions(name)) or "none"
            raise StoreError(f"model {name!r} has no version {version!r} (has: {have})", "not_found")
        return load_manifest(d)

    def package_dir(self, name: str, version: Optional[str] = None) -> Path:
        version = version or self.active_version(name)
        if version is None:
            raise StoreError(f"model {name!r} is not installed", "not_found")
        return self.version_dir(name, version)

    def list(self) -> list[ModelSummary]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir() or not NAME_RE.match(d.name):
                continue
            active = self.active_version(d.name)
            summary = ModelSummary(name=d.name, active=active, versions=self.versions(d.name))
            if active:
                try:
                    m = load_manifest(d / active)
                    summary.task, summary.description, summary.formats = m.task, m.description, list(m.files)
                except ManifestError:
                    summary.description = "(manifest unreadable)"
            out.append(summary)
        return out

    def verify(self, name: str, version: Optional[str] = None) -> None:
        """Re-hash an installed version (after a power cut, or before trusting an old SD card)."""
        d = self.package_dir(name, version)
        verify_package(d, load_manifest(d))

    # --- staging -----------------------------------------------------------------------------------------------
    def stage(
        self, source: str | Path, progress: Optional[Progress] = None, sha256: Optional[str] = None
    ) -> Staged:
        """Bring a package into a staging directory and verify it; nothing in the store changes."""
        work = self._staging()
        try:
            pkg = self._fetch(str(source), work, progress, sha256)
            check_tree(pkg)
            manifest = load_manifest(pkg)
            if progress:
                progress("verify", 0, len(manifest.all_files()))
            verify_package(pkg, manifest)
            return Staged(pkg, manifest, work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def _fetch(self, source: str, work: Path, progress: Optional[Progress], sha256: Optional[str]) -> Path:
        from models import catalog

        pkg = work / "pkg"
        if source.startswith(("http://", "https://")):
            archive = work / "download.tar.gz"
            self._download(source, archive, progress, sha256)
            extract_tar(archive, pkg, self.config.max_unpacked_bytes)
            archive.unlink()
            return _package_root(pkg)
        p = Path(source).expanduser()
        if p.is_dir():
            copy_tree(p, pkg, self.config.max_unpacked_bytes)
            return pkg
        if p.is_file():
            if sha256:
                _check_sha(sha256_file(p), sha256, str(p))
            extract_tar(p, pkg, self.config.max_unpacked_bytes)
            return _package_root(pkg)
        if source in catalog.CATALOG:
            catalog.build_package(source, pkg)
            return pkg
        raise StoreError(
            f"{source!r} is not a directory, a .tar.gz file, an http(s) URL or a catalog model "
            f"({', '.join(sorted(catalog.CATALOG))})",
            "bad_source",
        )

    def _download(self, url: str, dest: Path, progress: Optional[Progress], sha256: Optional[str]) -> None:
        import requests

        limit = self.config.max_download_bytes
        t = self.config.download_timeout_s
        try:
            with requests.get(url, stream=True, timeout=(t, t)) as r:
                if r.status_code != 200:
                    raise StoreError(f"download failed: HTTP {r.status_code} from {url}", "download_failed")
                total = int(r.headers["Content-Length"]) if r.headers.get("Content-Length", "").isdigit() else None
                if total is not None and total > limit:
                    raise StoreError(
                        f"{url} is {total} bytes, over the {limit} byte limit (models.max_download_bytes)", "too_large"
                    )
                r.raw.decode_content = True
                with open(dest, "wb") as f:
                    n, digest = copy_stream(
                        r.raw, f, limit, (lambda done: progress("download", done, total)) if progress else None
                    )
        except UnsafePackage as e:
            raise StoreError(f"download of {url} stopped: {e} (models.max_download_bytes)", "too_large") from None
        except requests.RequestException as e:
            raise StoreError(f"download of {url} failed: {e}", "download_failed") from None
        if total is not None and n != total:
            raise StoreError(f"download of {url} truncated: {n} of {total} bytes", "download_failed")
        if sha256:
            _check_sha(digest, sha256, url)

    # --- changing the store ------------------------------------------------------------------------------------
    def commit(self, staged: Staged, activate: bool = True) -> InstallResult:
        """Move a verified staged package into place (one rename) and optionally make it the active version."""
        m = staged.manifest
        try:
            with self.locked():
                target = self.version_dir(m.name, m.version)
                previous = self.active_version(m.name)
                already = False
                if target.exists():
                    old = load_manifest(target)
                    if [f.sha256 for f in old.all_files()] != [f.sha256 for f in m.all_files()]:
                        raise StoreError(
                            f"{m.name} {m.version} is already installed with different files: give the new package a "
                            f"new version, or remove the old one first (cv-worker models remove {m.name} "
                            f"--version {m.version})",
                            "version_conflict",
                        )
                    already = True
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(staged.dir, target)
                    fsync_dir(target.parent)
                if activate:
                    self._set_active(m.name, m.version)
                    self._prune(m.name)
                return InstallResult(
                    name=m.name, version=m.version, path=str(target), activated=activate, previous=previous,
                    already_installed=already,
                )
        finally:
            shutil.rmtree(staged.workdir, ignore_errors=True)

    def install(
        self,
        source: str | Path,
        progress: Optional[Progress] = None,
        activate: bool = True,
        sha256: Optional[str] = None,
    ) -> InstallResult:
        """Install from a directory, a .tar.gz, an http(s) URL or a catalog name; verified before it is visible."""
        return self.commit(self.stage(source, progress, sha256), activate=activate)

    def _set_active(self, name: str, version: str) -> None:
        atomic_write_text(self.model_dir(name) / ACTIVE, version + "\n")

    def activate(self, name: str, version: str) -> Optional[str]:
        """Make ``version`` the active one; returns the previously active version."""
        with self.locked():
            if version not in self.versions(name):
                raise StoreError(f"model {name!r} has no version {version!r}", "not_found")
            previous = self.active_version(name)
            self._set_active(name, version)
            return previous

    def _prune(self, name: str) -> None:
        active = self.active_version(name)
        others = [v for v in self.versions(name) if v != active]
        # Keep the newest (keep_versions - 1) non-active versions for rollback.
        for v in others[: max(0, len(others) - (self.config.keep_versions - 1))]:
            self._delete(self.version_dir(name, v))

    def _delete(self, path: Path) -> None:
        # Rename first so that the version vanishes atomically; then delete at leisure.
        trash = self.root / ".staging" / f"trash-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, name: str, version: Optional[str] = None) -> list[str]:
        """Remove one version, or the whole model; returns the versions removed."""
        with self.locked():
            versions = self.versions(name)
            if not versions:
                raise StoreError(f"model {name!r} is not installed", "not_found")
            if version is None:
                self._delete(self.model_dir(name))
                return versions
            if version not in versions:
                raise StoreError(f"model {name!r} has no version {version!r} (has: {', '.join(versions)})", "not_found")
            if version == self.active_version(name) and len(versions) > 1:
                raise StoreError(
                    f"{name} {version} is the active version: activate another one first, or remove the whole model",
                    "active_version",
                )
            if len(versions) == 1:
                self._delete(self.model_dir(name))
            else:
                self._delete(self.version_dir(name, version))
            return [version]

    def discard(self, name: str, version: str) -> None:
        """Roll back an install that failed after commit (used by hot-swap when the new version will not load)."""
        with self.locked():
            if version in self.versions(name) and version != self.active_version(name):
                if self.versions(name) == [version]:
                    self._delete(self.model_dir(name))  # it was the first install: leave no empty model behind
                else:
                    self._delete(self.version_dir(name, version))


def _check_sha(actual: str, expected: str, what: str) -> None:
    if actual != expected.lower():
        raise StoreError(f"sha256 of {what} is {actual}, expected {expected}", "checksum_mismatch")


def _package_root(extracted: Path) -> Path:
    """The manifest is at the archive's top level or inside its single top-level directory."""
    try:
        manifest_path(extracted)
        return extracted
    except ManifestError:
        entries = [p for p in extracted.iterdir() if not p.name.startswith("._")]
        if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
            manifest_path(entries[0])
            return entries[0]
        raise
