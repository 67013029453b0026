"""Where a run's files live: a local path, or an object-store URI (`s3://bucket/key`, `gs://…`:
anything `pyarrow.fs.FileSystem.from_uri` takes).

`path(x)` gives a `pathlib.Path` for a local path, so local runs go through the standard library
exactly as they always have, and a `RemotePath` for a URI: the part of pathlib the pipeline uses,
over the same pyarrow filesystem that Ray Data and pyarrow.parquet open for that URI (one client,
one configuration: credentials, region and endpoint come from the usual `AWS_*` variables, on
the driver and on every worker). What pathlib has no method for is a function here: `rmtree`,
`replace_dir`, `copy_file`, `link_or_copy`, `copytree`, `dataset_files`.

Object stores have no directories and no atomic rename. A "directory" is a key prefix (`mkdir`
writes an empty marker so that a new, empty folder exists); `replace_dir` copies a finished
stage's files into place with the one named `last` (its manifest) copied after all others, so
a folder counts as complete only once that file is there, as with a local rename.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Union


def is_uri(p) -> bool:
    """A URI with a scheme other than `file://` (that one is a local path)."""
    s = str(p)
    return "://" in s and not s.startswith("file://")


def path(p) -> "Union[Path, RemotePath]":
    """`p` (a str, Path, RemotePath or URI) as a Path for local storage, else a RemotePath."""
    if isinstance(p, (Path, RemotePath)):
        return p
    s = os.fspath(p) if not isinstance(p, str) else p
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return RemotePath(s) if is_uri(s) else Path(s)


def is_remote(p) -> bool:
    return isinstance(p, RemotePath) or (not isinstance(p, Path) and is_uri(p))


@lru_cache(maxsize=None)
def _filesystem(root: str):
    """The pyarrow filesystem of `scheme://bucket`, made once per process (S3 resolves the
    bucket's region on creation)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root)[0]


class _Stat:
    def __init__(self, size: int, mtime_ns: int):
        self.st_size, self.st_mtime_ns, self.st_mtime = size, mtime_ns, mtime_ns / 1e9


class RemotePath:
    """An object-store location with the pathlib methods the pipeline calls. Pickles as its URI
    (a worker opens its own filesystem)."""

    __slots__ = ("_uri",)

    def __init__(self, uri: str):
        scheme, rest = uri.split("://", 1)
        self._uri = f"{scheme}://{rest.strip('/')}"

    # ---- names ----------------------------------------------------------------------------
    def __str__(self) -> str:
        return self._uri

    def __repr__(self) -> str:
        return f"RemotePath({self._uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other._uri == self._uri

    def __lt__(self, other: "RemotePath") -> bool:
        return self._uri < other._uri

    def __hash__(self) -> int:
        return hash(self._uri)

    def __reduce__(self):
        return RemotePath, (self._uri,)

    def __truediv__(self, other) -> "RemotePath":
        return RemotePath(f"{self._uri}/{str(other).strip('/')}")

    @property
    def _root(self) -> str:
        scheme, rest = self._uri.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}"

    @property
    def fs_path(self) -> str:
        """The path the pyarrow filesystem takes (`bucket/key`)."""
        return self._uri.split("://", 1)[1]

    @property
    def fs(self):
        return _filesystem(self._root)

    @property
    def name(self) -> str:
        return posixpath.basename(self.fs_path)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self._uri.rsplit("/", 1)[0]) if "/" in self.fs_path else self

    def with_suffix(self, suffix: str) -> "RemotePath":
        return self.parent / (self.stem + suffix)

    def relative_to(self, other) -> PurePosixPath:
        base = str(other).rstrip("/") + "/"
        if not self._uri.startswith(base):
            raise ValueError(f"{self._uri} is not under {other}")
        return PurePosixPath(self._uri[len(base):])

    def resolve(self) -> "RemotePath":
        return self

    # ---- queries --------------------------------------------------------------------------
    def _info(self):
        return self.fs.get_file_info(self.fs_path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def stat(self) -> _Stat:
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(self._uri)
        return _Stat(info.size, info.mtime_ns or 0)

    def _walk(self, recursive: bool):
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive)
        return self.fs.get_file_info(sel)

    def _child(self, info) -> "RemotePath":
        return RemotePath(f"{self._uri.split('://', 1)[0]}://{info.path}")

    def iterdir(self):
        return iter(sorted(self._child(i) for i in self._walk(False)))

    def glob(self, pattern: str):
        """Entries whose path below this one matches `pattern` part by part (`*`, `?`, `[…]`;
        `**` is `rglob`'s)."""
        parts = pattern.split("/")
        infos = self._walk(recursive=len(parts) > 1)
        base = len(self.fs_path) + 1
        out = []
        for i in infos:
            rel = i.path[base:].split("/")
            if len(rel) == len(parts) and all(fnmatch.fnmatchcase(r, p) for r, p in zip(rel, parts)):
                out.append(self._child(i))
        return iter(sorted(out))

    def files(self) -> list["RemotePath"]:
        """Every file below this folder (no directory entries), sorted."""
        import pyarrow.fs as pafs

        return sorted(self._child(i) for i in self._walk(True) if i.type == pafs.FileType.File)

    def rglob(self, pattern: str):
        return iter(sorted(self._child(i) for i in self._walk(True)
                           if fnmatch.fnmatchcase(posixpath.basename(i.path), pattern)))

    # ---- reads and writes -----------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.fs_path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with self.fs.open_output_stream(self.fs_path) as f:
            f.write(data)
        return len(data)

    def write_text(self, data: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(data.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.fs_path, recursive=True)

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.delete_file(self.fs_path)

    def replace(self, target) -> "RemotePath":
        """A file moved over `target` (a copy and a delete: one object's PUT is atomic)."""
        target = path(target)
        self.fs.move(self.fs_path, target.fs_path)
        return target


# ---- what pathlib has no method for -----------------------------------------------------------
def files(p) -> list:
    """Every file below the folder `p`, sorted."""
    p = path(p)
    return p.files() if isinstance(p, RemotePath) else sorted(f for f in p.rglob("*") if f.is_file())


def rmtree(p) -> None:
    """Delete the folder `p` and everything under it; nothing when it is absent."""
    p = path(p)
    if isinstance(p, RemotePath):
        if p.exists():
            p.fs.delete_dir(p.fs_path)
    else:
        shutil.rmtree(p, ignore_errors=True)


def copy_file(src, dst) -> None:
    src, dst = path(src), path(dst)
    if isinstance(src, RemotePath) and isinstance(dst, RemotePath) and src._root == dst._root:
        src.fs.copy_file(src.fs_path, dst.fs_path)  # server-side
    elif isinstance(src, Path) and isinstance(dst, Path):
        shutil.copy2(src, dst)
    else:
        dst.write_bytes(src.read_bytes())


def link_or_copy(src, dst) -> None:
    """`src` at `dst` too: a hard link on a local filesystem that has them, else a copy."""
    src, dst = path(src), path(dst)
    if isinstance(src, Path) and isinstance(dst, Path):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    copy_file(src, dst)


def copytree(src, dst) -> None:
    src, dst = path(src), path(dst)
    if isinstance(src, Path) and isinstance(dst, Path):
        shutil.copytree(src, dst)
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in files(src):
        copy_file(f, dst / f.relative_to(src).as_posix())


def replace_dir(src, dst, last: str | None = None) -> None:
    """Move the folder `src` to `dst`, replacing what `dst` held. Local: one atomic rename. On an
    object store: `dst/last` is deleted first and copied last, so `dst` never holds `last`
    beside a partial or mixed set of files; `src` is deleted after."""
    src, dst = path(src), path(dst)
    if isinstance(src, Path) and isinstance(dst, Path):
        if dst.exists():
            shutil.rmtree(dst)
        src.replace(dst)
        return
    if last:
        (dst / last).unlink(missing_ok=True)
    rmtree(dst)
    todo = sorted(files(src), key=lambda f: (f.relative_to(src).as_posix() == last, str(f)))
    dst.mkdir(parents=True, exist_ok=True)
    for f in todo:
        copy_file(f, dst / f.relative_to(src).as_posix())
    rmtree(src)


def dataset_files(files: list) -> tuple[object, list[str]]:
    """Parquet files as `(filesystem, paths)` for `pyarrow.parquet.ParquetDataset`, which takes
    URIs only one at a time: (None, the paths) for local files."""
    files = [path(f) for f in files]
    if files and isinstance(files[0], RemotePath):
        return files[0].fs, [f.fs_path for f in files]
    return None, [str(f) for f in files]


def local_copy(src, dest: Path | None = None) -> Path:
    """A copy of the folder `src` (an object-store URI) on this node's disk, made once: the
    models load from local files (transformers, safetensors). `dest` defaults to a folder under
    $AUTOKNOW_CACHE_DIR (else the system's temp dir) named by a hash of the URI and its
    manifest, so another fit at the same URI is another copy. Several processes may ask at once:
    each copies into a folder of its own and the first rename wins; a folder without its
    `.complete` marker (a copy that died) is copied again."""
    import hashlib
    import tempfile

    src = path(src)
    if isinstance(src, Path):
        return src
    if dest is None:
        manifest = src / "manifest.json"
        key = hashlib.sha256(str(src).encode()
                             + (manifest.read_bytes() if manifest.exists() else b"")).hexdigest()[:20]
        root = Path(os.environ.get("AUTOKNOW_CACHE_DIR") or Path(tempfile.gettempdir()) / "autoknow-cache")
        dest = root / "models" / key
    dest = Path(dest)
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in files(src):
        target = tmp / f.relative_to(src).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    (tmp / ".complete").write_text(str(src))
    if (dest / ".complete").exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    shutil.rmtree(dest, ignore_errors=True)  # an unfinished copy of a process that died
    try:
        tmp.replace(dest)
    except OSError:  # another process renamed its copy in between
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def require_local(p, what: str) -> None:
    """Stop with a clear error where `p` is an object-store URI but must be a local folder."""
    if is_remote(p):
        raise ValueError(
            f"the {what} folder must be a local path (on storage every node mounts), not {p}: "
            "the module models are loaded from local files; fit them into such a folder and "
            "pass it as --models")
