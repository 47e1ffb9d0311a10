"""Reading checkpoints without running code from them: every checkpoint reader goes through here.

Place in the data flow: checkpoint folders (train/checkpoint.py) -> here -> resume (the engines'
`load`) and `ddrl ckpt export`. A checkpoint may come from a shared run folder, a download or a
writable shared filesystem, so none of its files is trusted to be a plain pickle:

* `.pt` files (RNG state, trainer state, schedule, EMA partitions, Megatron shards) are read with
  `torch.load(weights_only=True)` through `load_pt`, which names the file when torch refuses one;
* DCP's `.metadata` is a pickle: `SafeFileSystemReader` reads it with an unpickler that knows only
  DCP's metadata classes, `torch.Size`, dtypes, layouts and paths (what a legitimate checkpoint of
  the "none" and "fsdp2" engines holds); its byte items (the optimizer's param-group values) are
  read with `weights_only=True` by `SafeLoadPlanner` instead of DCP's default `weights_only=False`;
* DeepSpeed reads its own files with `torch.load(weights_only=False)` (its checkpoint engine and
  `zero_to_fp32`): `deepspeed_weights_only` forces `weights_only=True` on those calls, with the few
  non-tensor classes a DeepSpeed ZeRO-2/3 checkpoint holds allowed for that call only.

A refused file raises `CheckpointRefusedError` naming the file and why; nothing from it has run.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem


class CheckpointRefusedError(ValueError):
    """A checkpoint file holds something other than tensors and plain data (it could run code)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"checkpoint file '{path}' refused: {reason}. Only tensors and plain data are "
                         f"read from checkpoints (no pickled code); if this file is yours, it was "
                         f"written by another program or has been tampered with")


def _refusal(path: str | Path, error: BaseException) -> CheckpointRefusedError:
    first_line = str(error).strip().splitlines()
    reason = next((line for line in first_line if "GLOBAL" in line or "global" in line),
                  first_line[0] if first_line else type(error).__name__)
    return CheckpointRefusedError(path, f"it is not plain tensor data ({reason.strip()})")


def load_pt(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; a file that needs more than tensors and plain data
    (a planted pickle) raises CheckpointRefusedError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal(path, error) from None


# -- DCP ---------------------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise pickle.UnpicklingError(f"torch.{name} is not a dtype")
    return value


# module -> names an unpickled `.metadata` may refer to; dtypes are checked by _dtype
_METADATA_GLOBALS: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {*dcp_metadata.__all__, "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by name (torch.strided)
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # the checkpoint id
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals of DCP metadata; anything else (os.system, builtins.eval, a class
    with a __reduce__) is refused before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name not in _METADATA_GLOBALS["torch"]:
            return _dtype(name)
        if name in _METADATA_GLOBALS.get(module, ()):
            if module == "pathlib":
                return getattr(pathlib, name)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` unpickled by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except (pickle.UnpicklingError, AttributeError, EOFError, TypeError) as error:
                raise _refusal(path, error) from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointRefusedError(path, f"expected DCP Metadata, got {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def data_file(self, read_item: ReadItem) -> Path:
        """The `.distcp` file holding `read_item` (after `set_up_storage_reader`)."""
        return Path(self.path) / self.storage_data[read_item.storage_index].relative_path


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load plan, with non-tensor items read by `torch.load(weights_only=True)`."""

    def __init__(self, reader: SafeFileSystemReader, **kwargs: Any):
        super().__init__(**kwargs)
        self.reader = reader

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            where = f"{self.reader.data_file(read_item)} (item '{read_item.dest_index.fqn}')"
            raise _refusal(where, error) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def dcp_load(state: dict, directory: str | Path, no_dist: bool) -> None:
    """`dcp.load(state, checkpoint_id=directory)` through the safe reader and planner; a refused
    file raises CheckpointRefusedError (DCP would wrap it in a CheckpointException per rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeFileSystemReader(str(directory))
    reader.read_metadata()  # refused here, by name, before DCP falls back to per-rank metadata
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(reader), no_dist=no_dist)
    except CheckpointException as error:
        refused = [failure for failure, _ in error.failures.values()
                   if isinstance(failure, CheckpointRefusedError)]
        if refused:
            raise refused[0] from None
        raise


def read_dcp_metadata(directory: str | Path) -> dcp_metadata.Metadata:
    return SafeFileSystemReader(str(directory)).read_metadata()


# -- DeepSpeed ---------------------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """The non-tensor classes a DeepSpeed ZeRO-2/3 checkpoint of this project holds (found by
    loading real ones: ZeRO-3's stage enum, the optimizer's loss scaler and ZeRO-2's (numel, start) fragment
    addresses: plain attribute holders)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def check_deepspeed_files(folder: str | Path) -> None:
    """Every `.pt` of a DeepSpeed checkpoint tag folder loads under weights_only (memory-mapped, so
    only the pickles are read): every rank calls it before DeepSpeed's collective load, so all
    reach the same verdict and none is left waiting in a collective for a rank that refused."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for path in sorted(Path(folder).glob("*.pt")):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as error:
                raise _refusal(path, error) from None


@contextlib.contextmanager
def deepspeed_weights_only() -> Iterator[None]:
    """While DeepSpeed reads a checkpoint: its `torch.load(..., weights_only=False)` calls run with
    weights_only=True (and its few classes allowed); a refused file raises CheckpointRefusedError."""
    original: Callable[..., Any] = torch.load

    def guarded(file, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(file, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise _refusal(file if isinstance(file, str | Path) else repr(file), error) from None

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = original
