"""Where a zoo lives: a root that is a local path or any pyarrow filesystem URI (`s3://`, `gs://`...).

    ROOT/loras/<lora_id>/step-<r:06d>/pytorch_lora_weights.safetensors   one LoRA per snapshot r
    ROOT/loras/<lora_id>/finetune.json                                    the fine-tune's full record
    ROOT/parts/<lora_id>.parquet                                          that fine-tune's manifest rows
    ROOT/manifest.parquet                                                 all parts, compacted by a build
    ROOT/zoo_config.json                                                  the ZooConfig of the last build

Every write is atomic: a file appears under its final name complete or not at all (a local rename,
or a single object PUT on object stores). Names starting with "." are in-progress writes; nothing
lists them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import InputError
from ..leftovers import is_temporary

LORAS_DIR = "loras"
PARTS_DIR = "parts"
MANIFEST_FILE = "manifest.parquet"
CONFIG_FILE = "zoo_config.json"


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in root:  # a plain local path, possibly relative
        return pafs.LocalFileSystem(), Path(root).expanduser().resolve().as_posix()
    try:
        return pafs.FileSystem.from_uri(root)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise InputError(f"cannot open zoo root {root!r}: {e}") from None


def _is_leftover(name: str) -> bool:
    """What an interrupted writer leaves: `.<name>.tmp-<pid>-<id>` files and `.stage-...` directories (the
    private names loraleak.leftovers lists)."""
    return is_temporary(name)


def _private_name(path: str) -> str:
    """A sibling of `path` that listings skip (leading dot) and no other writer picks."""
    parent, _, name = path.rpartition("/")
    return f"{parent}/.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ZooStore:
    """The files of one zoo root, through a pyarrow filesystem (local paths need no special case)."""

    def __init__(self, root: str | Path):
        self.uri = str(root)
        self.fs, self.path = _filesystem(self.uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def abs(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    @property
    def manifest_path(self) -> str:
        return self.abs(MANIFEST_FILE)

    @property
    def config_path(self) -> str:
        return self.abs(CONFIG_FILE)

    @property
    def parts_dir(self) -> str:
        return self.abs(PARTS_DIR)

    def part_path(self, lora_id: str) -> str:
        return self.abs(f"{PARTS_DIR}/{lora_id}.parquet")

    @staticmethod
    def lora_relative_dir(lora_id: str) -> str:
        return f"{LORAS_DIR}/{lora_id}"

    # --- queries -------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def file_sizes(self, relative_dir: str) -> dict[str, int]:
        """Size of every file under `relative_dir`, keyed by path relative to the root (one listing)."""
        selector = pafs.FileSelector(self.abs(relative_dir), recursive=True, allow_not_found=True)
        prefix = self.path + "/"
        return {info.path.removeprefix(prefix): info.size for info in self.fs.get_file_info(selector)
                if info.type == pafs.FileType.File and "/." not in info.path.removeprefix(prefix)}

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.abs(relative)) as f:
            return f.read()

    @contextmanager
    def local_file(self, relative: str) -> Iterator[Path]:
        """A local path holding the file `relative` (itself when local, else a temporary copy)."""
        if self.is_local:
            yield Path(self.abs(relative))
            return
        with tempfile.TemporaryDirectory(prefix="loraleak-zoo-") as tmp:
            local = Path(tmp) / Path(relative).name
            local.write_bytes(self.read_bytes(relative))
            yield local

    # --- atomic writes -------------------------------------------------------------------------

    def remove_leftovers(self) -> int:
        """Delete the temporary files and staging directories of killed writers; call it only while
        no other build writes to this root. Returns how many were removed."""
        removed = 0
        for directory in (self.path, self.abs(PARTS_DIR), self.abs(LORAS_DIR)):
            for info in self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)):
                if not _is_leftover(info.base_name):
                    continue
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)
                removed += 1
        return removed

    def _commit(self, tmp: str, final: str) -> None:
        try:
            self.fs.move(tmp, final)
        except BaseException:
            self.delete_file(tmp)
            raise

    def write_bytes(self, relative: str, data: bytes) -> None:
        final = self.abs(relative)
        self.fs.create_dir(final.rpartition("/")[0], recursive=True)
        tmp = _private_name(final)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self._commit(tmp, final)

    def write_table(self, path: str, table: pa.Table) -> None:
        self.fs.create_dir(path.rpartition("/")[0], recursive=True)
        tmp = _private_name(path)
        pq.write_table(table, tmp, filesystem=self.fs)
        self._commit(tmp, path)

    def delete_file(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    @contextmanager
    def staging_dir(self, lora_id: str) -> Iterator[Path]:
        """A local directory to write a fine-tune's files into before `publish_dir`.

        Local roots stage inside the root, so publishing is one rename on the same filesystem.
        """
        if self.is_local:
            loras = Path(self.abs(LORAS_DIR))
            loras.mkdir(parents=True, exist_ok=True)
            stage = loras / f".stage-{lora_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            stage.mkdir()
        else:
            stage = Path(tempfile.mkdtemp(prefix=f"loraleak-{lora_id}-"))
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def publish_dir(self, stage: Path, relative_dir: str) -> None:
        """Replace ROOT/relative_dir by the staged directory's files."""
        dest = self.abs(relative_dir)
        if self.exists(dest):
            self.fs.delete_dir(dest)
        if self.is_local:
            os.replace(stage, dest)
        else:  # one PUT per file: each object appears whole
            pafs.copy_files(stage.as_posix(), dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
