"""Finding a dataset's shards for `latentcrafter stats`: folders, globs, brace patterns, fsspec URLs."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import fsspec
from braceexpand import braceexpand

from shards.format import ERRORS_SUFFIX, INDEX_SUFFIX, TAR_SUFFIX, parse_shard_stem

_SUFFIXES = {TAR_SUFFIX: "tar", INDEX_SUFFIX: "index", ERRORS_SUFFIX: "errors"}


@dataclass
class ShardFiles:
    """The files found for one shard stem; a missing file is None."""

    dir: str  # folder URL (no trailing slash)
    stem: str  # "{source}-{WxH}-{NNNNNN}"
    source: str
    stage: str
    shard: int
    tar: str | None = None
    index: str | None = None
    errors: str | None = None
    tar_bytes: int = 0  # size of the tar file on disk (0 when absent)

    @property
    def name(self) -> str:
        return self.stem + TAR_SUFFIX


@dataclass
class Discovery:
    """Every shard found, plus the inputs that matched nothing."""

    shards: list[ShardFiles] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


def _kind_of(name: str) -> tuple[str, str] | None:
    """(stem, 'tar'|'index'|'errors') for a shard file name; None for anything else (temp files, ...)."""
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            try:
                parse_shard_stem(stem)
            except ValueError:
                return None
            return stem, kind
    return None


def _unstrip(fs, path: str) -> str:
    """A path returned by fs back to a URL the user can open (plain path for local files)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


class _Finder:
    """Collects shard files by (folder, stem); lists each folder at most once."""

    def __init__(self, storage_options: dict | None):
        self.storage_options = storage_options or {}
        self.found: dict[tuple[str, str], ShardFiles] = {}
        self._listed: dict[str, list[dict]] = {}

    def add_file(self, fs, path: str, size: int | None) -> bool:
        hit = _kind_of(posixpath.basename(path))
        if hit is None:
            return False
        stem, kind = hit
        folder = _unstrip(fs, posixpath.dirname(path))
        entry = self.found.get((folder, stem))
        if entry is None:
            parsed = parse_shard_stem(stem)
            entry = ShardFiles(dir=folder, stem=stem, **parsed)
            self.found[(folder, stem)] = entry
        setattr(entry, kind, _unstrip(fs, path))
        if kind == "tar":
            entry.tar_bytes = int(size or 0)
        return True

    def add_dir(self, fs, path: str) -> int:
        n = 0
        for p, info in sorted(fs.find(path, detail=True).items()):
            if info.get("type") != "directory":
                n += self.add_file(fs, p, info.get("size"))
        return n

    def _listing(self, fs, folder: str) -> list[dict]:
        if folder not in self._listed:
            try:
                self._listed[folder] = fs.ls(folder, detail=True)
            except FileNotFoundError:
                self._listed[folder] = []
        return self._listed[folder]

    def add_stem(self, fs, path: str) -> int:
        """A named shard file (tar, index or errors): find its siblings in the same folder."""
        hit = _kind_of(posixpath.basename(path))
        if hit is None:
            return 0
        stem, _ = hit
        n = 0
        for info in self._listing(fs, posixpath.dirname(path)):
            name = posixpath.basename(info["name"].rstrip("/"))
            if name.startswith(stem + ".") and info.get("type") != "directory":
                n += self.add_file(fs, info["name"], info.get("size"))
        return n


def discover(inputs: list[str], storage_options: dict | None = None) -> Discovery:
    """Shards from folders (searched recursively), globs, brace patterns and URLs, sorted by name.

    Any of a shard's three files names the shard: `x-256x256-000001.tar` finds its index and errors
    parquet too, so a tar without an index (or an index without a tar) is reported, not skipped.
    """
    finder = _Finder(storage_options)
    out = Discovery()
    for pattern in inputs:
        for url in braceexpand(pattern):
            fs, path = fsspec.core.url_to_fs(url, **finder.storage_options)
            path = path.rstrip("/") or "/"
            n = 0
            if any(c in path for c in "*?["):
                for match in sorted(fs.glob(path)):
                    n += finder.add_dir(fs, match) if fs.isdir(match) else finder.add_stem(fs, match)
            elif fs.isdir(path):
                n = finder.add_dir(fs, path)
            else:
                n = finder.add_stem(fs, path)
            if n == 0:
                out.not_found.append(url)
    out.shards = sorted(finder.found.values(), key=lambda s: (s.source, s.stage, s.shard, s.dir))
    return out
