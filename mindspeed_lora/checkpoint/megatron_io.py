"""Megatron checkpoint layout (as MindSpeed-LLM writes it), read and written safely.

    save_dir/
      latest_checkpointed_iteration.txt        the iteration, e.g. "1" after conversion
      mindspeed_lora.json                      architecture (ModelArch), parallel layout, LoRA config: plain JSON
      hf_config/                               the HF config.json and tokenizer files, for later steps
      iter_0000001/
        mp_rank_TT/model_optim_rng.pt          PP == 1
        mp_rank_TT_PPP/model_optim_rng.pt      PP > 1

``model_optim_rng.pt`` is a dict: ``model`` (state dict), ``iteration``, ``checkpoint_version`` 3.0 and
``args`` -- args as a plain dict, so every file loads with ``torch.load(weights_only=True)``. Shards of
MindSpeed-LLM and Megatron-LM pickle an argparse.Namespace and numpy RNG state instead: ``safe_torch_load``
reads those too, still without running code from the file (``foreign`` describes such checkpoints).

Atomicity: an iteration is written into ``iter_XXXXXXX.tmp-<token>``, renamed to ``iter_XXXXXXX`` when
complete, and only then does ``latest_checkpointed_iteration.txt`` (itself replaced atomically) point at it.
Readers take that iteration unless they are given another (``--ckpt-step``, ``--refer-model-iter``).
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

from mindspeed_lora.errors import UserError

LATEST = "latest_checkpointed_iteration.txt"
METADATA = "mindspeed_lora.json"
HF_CONFIG_DIR = "hf_config"
CHECKPOINT_VERSION = 3.0
_ITER_DIR = re.compile(r"iter_(\d{7,})")


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def shard_path(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(iter_dir, shard_dir_name(tp_rank, pp_rank, pp_size), "model_optim_rng.pt")


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def staging_dir(save_dir: str, iteration: int, token: str) -> str:
    """Where an iteration is written before it is published."""
    return os.path.join(save_dir, f"{iteration_dir_name(iteration)}.tmp-{token}")


def publish_iteration(save_dir: str, iteration: int, token: str) -> str:
    """Rename the staged iteration into place, then point latest_checkpointed_iteration.txt at it."""
    staged = staging_dir(save_dir, iteration, token)
    final = os.path.join(save_dir, iteration_dir_name(iteration))
    if os.path.exists(final):  # re-saving the same iteration: keep the old until the new one is complete
        old = f"{final}.old-{token}"
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    atomic_write_text(os.path.join(save_dir, LATEST), str(iteration))
    return final


def read_latest_iteration(load_dir: str) -> int:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        raise UserError(f"{load_dir}: no {LATEST} (not a Megatron checkpoint directory)")
    text = open(path, encoding="utf-8").read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as e:
        raise UserError(f"{path}: expected an iteration number, found {text!r}") from e


def saved_iterations(load_dir: str) -> list[int]:
    """The iterations ``load_dir`` holds (``iter_XXXXXXX`` directories; staging leftovers are not), ascending."""
    names = os.listdir(load_dir) if os.path.isdir(load_dir) else []
    return sorted(int(m.group(1)) for m in (_ITER_DIR.fullmatch(n) for n in names)
                  if m and os.path.isdir(os.path.join(load_dir, m.group(0))))


def check_iteration_flag(flag: str, iteration: int | None) -> None:
    """A flag naming an iteration (--ckpt-step, --refer-model-iter) holds None or an iteration number."""
    if iteration is not None and iteration < 0:
        raise UserError(f"{flag} {iteration}: expected an iteration number (0 or more)")


def resolve_iteration_dir(load_dir: str, iteration: int | None = None, what: str = "") -> str:
    """The directory of ``iteration`` in ``load_dir``; None: the one latest_checkpointed_iteration.txt names.

    An iteration asked for that is not there is a UserError listing those that are, ``what`` (e.g.
    ``"--ckpt-step 3: --load"``) naming the flags that asked.
    """
    latest = iteration is None
    if latest:
        iteration = read_latest_iteration(load_dir)
    name = "release" if iteration == 0 and os.path.isdir(os.path.join(load_dir, "release")) \
        else iteration_dir_name(iteration)
    path = os.path.join(load_dir, name)
    if not os.path.isdir(path):
        if latest:
            raise UserError(f"{load_dir}: {LATEST} points at {name}, which does not exist")
        saved = saved_iterations(load_dir)
        held = f"saved iterations: {', '.join(map(str, saved))}" if saved else "no iter_* directory there"
        raise UserError(f"{what + ' ' if what else ''}{load_dir}: no iteration {iteration} (no {name}; {held})")
    return path


class Opaque:
    """What a class or function named in a foreign shard's pickle becomes (an enum in Megatron's pickled args,
    numpy's RNG state, a BytesIO of extra state): built from the pickle's arguments without importing or
    calling anything from the file's modules. Only its constructor arguments (``args``) and pickled state
    (``state``) are kept."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def safe_torch_load(path: str, map_location):
    """``torch.load(weights_only=True)``; for a file written by MindSpeed-LLM or Megatron-LM, whose pickle also
    names argparse.Namespace (the args), numpy (RNG state) or enums, those names are rebuilt as a plain
    Namespace or as ``Opaque``: loading never runs code from the file."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not names:
            raise
    import argparse

    allowed = [(argparse.Namespace if name == "argparse.Namespace" else Opaque, name) for name in names]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch blocks modules such as os and subprocess whatever is allowed
        lines = str(e).splitlines()
        detail = next((ln.strip() for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
        raise UserError(f"{path}: not loaded: {detail} (a checkpoint shard holds tensors, Megatron's args and "
                        "RNG state; nothing that runs code)") from None


def load_shard(path: str) -> dict:
    """Load one model_optim_rng.pt; never runs code from the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint shard missing (another TP/PP layout? see {METADATA})")
    try:
        return safe_torch_load(path, "cpu")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot load checkpoint shard ({e})") from e


def write_metadata(save_dir: str, metadata: dict) -> None:
    os.makedirs(save_dir, exist_ok=True)
    atomic_write_text(os.path.join(save_dir, METADATA), json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_metadata(load_dir: str) -> dict | None:
    path = os.path.join(load_dir, METADATA)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


# ---------------------------------------------------------------------------------------------- streaming

class ShardReader:
    """One ``model_optim_rng.pt`` read tensor by tensor: only the bytes of the tensor asked for are read.

    The file is opened once on the meta device (``weights_only``) to learn every tensor's shape, dtype and
    byte offset; ``read`` then reads that tensor's bytes with plain file I/O into fresh memory, so peak memory
    is one tensor, not the shard (an mmap would keep every page it touched resident until the shard closes).
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise UserError(f"{path}: checkpoint shard missing (another TP/PP layout? see {METADATA})")
        self.path = path
        try:
            state = safe_torch_load(path, "meta")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path}: cannot load checkpoint shard (truncated or not a torch checkpoint?): {e}") from e
        if isinstance(state, dict) and "model" not in state and "model0" in state:
            raise UserError(f"{path}: a checkpoint with virtual pipeline stages (model0, model1, ...), which this "
                            "project does not read; convert it to HF with the tool that wrote it, then from HF")
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise UserError(f"{path}: expected a dict with a 'model' state dict")
        self._meta: dict[str, torch.Tensor] = {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
        self.extra = {k: v for k, v in state.items() if k != "model"}
        size = os.path.getsize(path)
        for key, t in self._meta.items():
            start, nbytes = self._span(t)
            if start + nbytes > size:
                raise UserError(f"{path}: tensor {key!r} ends at byte {start + nbytes} of a {size}-byte file "
                                "(truncated shard)")

    @staticmethod
    def _span(t: torch.Tensor) -> tuple[int, int]:
        storage = t.untyped_storage()
        base = storage._checkpoint_offset
        if t.is_contiguous():
            return base + t.storage_offset() * t.element_size(), t.numel() * t.element_size()
        return base, storage.nbytes()

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key].dtype

    def read(self, key: str) -> torch.Tensor:
        if key not in self._meta:
            raise UserError(f"{self.path}: no tensor {key!r} in the shard")
        t = self._meta[key]
        start, nbytes = self._span(t)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != nbytes:
            raise UserError(f"{self.path}: tensor {key!r} is cut short ({got} of {nbytes} bytes; truncated shard)")
        if t.is_contiguous():
            return buf.view(t.dtype).view(t.shape)
        out = torch.empty(0, dtype=t.dtype)
        out.set_(buf.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        return out


def _placeholders(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict:
    # torch.empty on the CPU reserves address space only: no page is touched until written, and
    # skip_data never reads them (FakeTensors would do as well but import torch._dynamo, ~3 s)
    return {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in specs.items()}


def _zip_payloads(path: str) -> dict[int, tuple[str, int]]:
    """{payload offset: (record name, payload size)} of every record of a zip file."""
    import struct
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            out[info.header_offset + 30 + name_len + extra_len] = (info.filename, info.compress_size)
    return out


def _fix_zip_crcs(path: str, crcs: dict[int, int]) -> None:
    """Write the CRC-32 of each filled record (by payload offset) into its data descriptor and its
    central-directory entry.

    torch's ``skip_data`` save leaves CRC 0 for the records it did not write; torch.load never checks, but
    other zip readers do, and a file that claims a wrong checksum is a corrupt file.
    """
    import struct
    import zipfile

    payloads = _zip_payloads(path)
    by_name = {payloads[off][0]: crc for off, crc in crcs.items()}
    with zipfile.ZipFile(path) as z:
        central = z.start_dir
    with open(path, "r+b") as f:
        for off, crc in crcs.items():
            f.seek(off + payloads[off][1])
            if f.read(4) != b"PK\x07\x08":
                raise RuntimeError(f"{path}: record {payloads[off][0]} has no data descriptor where torch writes one")
            f.write(struct.pack("<I", crc))
        f.seek(central)
        while True:
            entry = f.tell()
            fixed = f.read(46)
            if fixed[:4] != b"PK\x01\x02":
                break
            name_len, extra_len, comment_len = struct.unpack("<HHH", fixed[28:34])
            name = f.read(name_len).decode("utf-8")
            if name in by_name:
                f.seek(entry + 16)
                f.write(struct.pack("<I", by_name[name]))
            f.seek(entry + 46 + name_len + extra_len + comment_len)


def write_shard_streaming(path: str, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], produce,
                          extra: dict) -> None:
    """Write ``{"model": {key: produce(key)}, **extra}`` as ``torch.save`` would, holding one tensor at a time.

    ``specs`` gives every key's shape and dtype up front (file order). The file's skeleton (the pickle and
    room for every tensor) is saved first with ``torch.serialization.skip_data``; then each tensor from
    ``produce`` is written into its room and dropped. Written under a temporary name, renamed when complete.
    """
    import zlib

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with torch.serialization.skip_data():
        torch.save({"model": _placeholders(specs), **extra}, tmp)
    meta = torch.load(tmp, map_location="meta", weights_only=True)["model"]
    crcs: dict[int, int] = {}
    with open(tmp, "r+b") as f:
        for key, (shape, dtype) in specs.items():
            t = produce(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            data = memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())
            offset = meta[key].untyped_storage()._checkpoint_offset
            f.seek(offset)
            f.write(data)
            crcs[offset] = zlib.crc32(data)
            del t, data
        f.flush()
        os.fsync(f.fileno())
    _fix_zip_crcs(tmp, crcs)
    os.replace(tmp, path)
