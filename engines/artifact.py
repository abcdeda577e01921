"""Reading an artifact folder: the contract between ``export`` (which writes it) and every runtime.

``manifest.json`` names every file in the folder with its sha256; opening an artifact checks them all, so a
changed, truncated or missing file is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from .base import GraphSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact folder that cannot be used as it is; the message names the file."""


def sha256_file(path: Path, progress: Callable[[int], object] | None = None, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks; ``progress(n)`` is told of every ``n`` bytes read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Artifact:
    folder: Path
    manifest: dict

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec.from_dict(self.manifest["graph"])

    def path(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.folder / MANIFEST} lists no file {name!r}")
        return self.folder / name

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True) -> "Artifact":
        """Read the manifest and (with ``verify``) check every listed file's size and sha256."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not folder.is_dir():
            raise ArtifactError(f"{folder}: not a folder; pass the artifact folder that `python -m export` wrote")
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{folder}: no {MANIFEST}; is this an artifact folder written by "
                                "`python -m export`?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{manifest_path}: not valid JSON ({e})") from None
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{manifest_path}: format_version {version!r}; this release reads "
                                f"{FORMAT_VERSION}. Re-export with this release.")
        if verify:
            for name, entry in manifest["files"].items():
                path = folder / name
                if not path.is_file():
                    raise ArtifactError(f"{path}: listed in {MANIFEST} but missing")
                if path.stat().st_size != entry["bytes"]:
                    raise ArtifactError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}; "
                                        "the file was changed or truncated. Re-export.")
                if sha256_file(path) != entry["sha256"]:
                    raise ArtifactError(f"{path}: sha256 differs from {MANIFEST}; the file was changed. Re-export.")
        return cls(folder, manifest)
