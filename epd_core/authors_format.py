"""Read the authors' released predictor pickles without running them.

Each file is a pickle of a dict whose ``model`` entry is an EDM "persistent"
object (``torch_utils.persistence``): its class source code travels in the
file and a normal ``pickle.load`` executes it. Here the file goes through
:mod:`epd_core.safe_pickle` with an allow-list of the few tensor and container
constructors these files use; the embedded source is ignored, tensors are
rebuilt from their raw bytes on the CPU, and references to the training
code's functions (the ICCV ``loss_fn`` entry) stay inert names.
"""

from __future__ import annotations

from typing import Any

import torch

from .params import shown
from .safe_pickle import Global, Opaque, PickleRefused, load_one

__all__ = ["read_authors_pickle"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_TENSOR_DIMS = 8
_MAX_TENSOR_ELEMENTS = 1 << 20  # EPD tables hold a few dozen values
_MAX_BUILT_BYTES = 64 << 20  # all tensors and storages one file builds (a memo reference rebuilds one again)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
}

# Functions of the authors' training code referenced by the ICCV ``loss_fn``.
_INERT_NAMES = [
    f"{module}.{fn}"
    for module in ("solvers", "solver_tea")
    for fn in (
        "epd_sampler",
        "epd_parallel_sampler",
        "ipndm_sampler",
        "heun_sampler",
        "dpm_sampler",
        "dpm_sampler_2",
        "dpmpp_sampler",
        "euler_sampler",
        "edm_sampler",
    )
]


class _Budget:
    """Bytes of tensors and storages built so far for one file: memory bounded whatever the file repeats."""

    def __init__(self) -> None:
        self.used = 0
        self.decoded: dict[int, tuple[bytes, torch.Tensor]] = {}  # legacy storages by their bytes object

    def charge(self, nbytes: int) -> None:
        self.used += nbytes
        if self.used > _MAX_BUILT_BYTES:
            raise PickleRefused(f"the tensors built exceed {_MAX_BUILT_BYTES >> 20} MiB; not an EPD table")


class _StorageRef:
    """A typed storage from the legacy format; ``data`` is a 1-D CPU tensor."""

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.data: torch.Tensor | None = None


def _args(args: tuple, n: int | tuple[int, ...], what: str) -> tuple:
    allowed = (n,) if isinstance(n, int) else n
    if len(args) not in allowed:
        raise PickleRefused(f"{what} takes {n} arguments, got {len(args)}")
    return args


def _int(value: Any, what: str, lo: int = 0, hi: int = 2**40) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PickleRefused(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _storage_dtype(ref: Any) -> torch.dtype:
    if not isinstance(ref, Global):
        raise PickleRefused("storage type is not a global")
    short = ref.name.rsplit(".", 1)[-1]
    if short not in _STORAGE_DTYPES:
        raise PickleRefused(f"unsupported storage type {shown(ref.name)}")
    return _STORAGE_DTYPES[short]


def _load_legacy_storage(args: tuple, budget: _Budget) -> torch.Tensor:
    """``torch.storage._load_from_bytes``: the legacy ``torch.save`` stream of one storage."""
    (blob,) = _args(args, 1, "_load_from_bytes")
    if not isinstance(blob, bytes):
        raise PickleRefused("_load_from_bytes needs bytes")
    if id(blob) in budget.decoded:  # one blob named again by memo: decoded once (each decode cost 170 us)
        return budget.decoded[id(blob)][1]
    budget.charge(len(blob))
    no_globals: dict = {}
    magic, pos = load_one(blob, no_globals)
    if magic != _LEGACY_MAGIC:
        raise PickleRefused("legacy tensor bytes have a wrong magic number")
    version, pos = load_one(blob, no_globals, pos=pos)
    if version != _LEGACY_PROTOCOL:
        raise PickleRefused(f"legacy tensor protocol {version!r} is not supported")
    sys_info, pos = load_one(blob, no_globals, pos=pos)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise PickleRefused("legacy tensor bytes are not little-endian")

    storages: dict[str, _StorageRef] = {}

    def persistent_load(pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise PickleRefused("unsupported persistent id in tensor bytes")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(key, str) or view is not None:
            raise PickleRefused("malformed storage reference")
        ref = _StorageRef(_storage_dtype(storage_type), _int(numel, "storage size", hi=len(blob)))
        if key in storages:
            raise PickleRefused(f"storage {shown(key)} declared twice")
        storages[key] = ref
        return ref

    storage_types = {f"torch.{name}": _storage_dtype for name in _STORAGE_DTYPES}
    root, pos = load_one(blob, storage_types, pos=pos, persistent_load=persistent_load)
    keys, pos = load_one(blob, no_globals, pos=pos)
    if not isinstance(keys, list) or sorted(keys) != sorted(storages):
        raise PickleRefused("legacy tensor bytes list the wrong storages")
    for key in keys:
        ref = storages[key]
        if pos + 8 > len(blob):
            raise PickleRefused("legacy tensor bytes are truncated")
        count = int.from_bytes(blob[pos : pos + 8], "little", signed=True)
        pos += 8
        itemsize = torch.empty((), dtype=ref.dtype).element_size()
        if count != ref.numel or pos + count * itemsize > len(blob):
            raise PickleRefused("legacy tensor bytes lie about their size")
        raw = bytearray(blob[pos : pos + count * itemsize])
        pos += count * itemsize
        ref.data = torch.frombuffer(raw, dtype=ref.dtype) if count else torch.empty(0, dtype=ref.dtype)
    if pos != len(blob):
        raise PickleRefused("trailing bytes after legacy tensor data")
    if not isinstance(root, _StorageRef) or root.data is None:
        raise PickleRefused("legacy tensor bytes do not hold a storage")
    budget.decoded[id(blob)] = (blob, root.data)  # the blob kept alive, so its id stays its own
    return root.data


def _rebuild_tensor(args: tuple, budget: _Budget) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` with bounds checks."""
    storage, offset, size, stride = _args(args, (6, 7), "_rebuild_tensor_v2")[:4]
    if not isinstance(storage, torch.Tensor):
        raise PickleRefused("tensor storage is not a storage")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise PickleRefused("tensor size and stride disagree")
    if len(size) > _MAX_TENSOR_DIMS:
        raise PickleRefused("tensor has too many dimensions")
    offset = _int(offset, "tensor offset")
    size = tuple(_int(s, "tensor size") for s in size)
    stride = tuple(_int(s, "tensor stride") for s in stride)
    numel = 1
    for s in size:
        numel *= s
    if numel > _MAX_TENSOR_ELEMENTS:
        raise PickleRefused(f"tensor of {numel} elements is too large for an EPD table")
    if numel:
        last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=False))
        if last >= storage.numel():
            raise PickleRefused("tensor reaches past its storage")
    budget.charge(numel * storage.element_size())
    return torch.as_strided(storage, size, stride, offset).clone()


def _rebuild_parameter(args: tuple) -> torch.Tensor:
    tensor = _args(args, 3, "_rebuild_parameter")[0]
    if not isinstance(tensor, torch.Tensor):
        raise PickleRefused("parameter does not hold a tensor")
    return tensor


def _ordered_dict(args: tuple) -> dict:
    _args(args, 0, "OrderedDict")
    return {}


def _persistent_obj(args: tuple) -> Opaque:
    (meta,) = _args(args, 1, "_reconstruct_persistent_obj")
    if not isinstance(meta, dict):
        raise PickleRefused("persistent object metadata is not a dict")
    name = meta.get("class_name")
    if not isinstance(name, str):
        raise PickleRefused("persistent object class_name is not text")
    return Opaque(name=name, state=meta.get("state"))


def _module_stub(name: str):
    def make(args: tuple) -> Opaque:
        _args(args, 0, name)
        return Opaque(name=name)

    return make


def _inert(name: str):
    def refuse(args: tuple) -> Any:
        raise PickleRefused(f"{name} may be referenced but not called")

    return refuse


def _handlers() -> dict[str, Any]:
    """The allow-list, with a fresh :class:`_Budget` for one file."""
    budget = _Budget()
    return {
        "torch_utils.persistence._reconstruct_persistent_obj": _persistent_obj,
        "torch._utils._rebuild_tensor_v2": lambda args: _rebuild_tensor(args, budget),
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch.storage._load_from_bytes": lambda args: _load_legacy_storage(args, budget),
        "collections.OrderedDict": _ordered_dict,
        "torch.nn.modules.activation.Sigmoid": _module_stub("Sigmoid"),
        "torch.nn.modules.activation.Softmax": _module_stub("Softmax"),
        **{name: _inert(name) for name in _INERT_NAMES},
    }


def read_authors_pickle(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the predictor's raw tables and its hyper-parameters (``state`` minus tables)."""
    root, end = load_one(data, _handlers())
    if end != len(data):
        raise PickleRefused("trailing bytes after the pickle")
    if not isinstance(root, dict) or "model" not in root:
        raise PickleRefused("not an EPD predictor file (no 'model' entry)")
    model = root["model"]
    if not isinstance(model, Opaque) or model.name != "EPD_predictor" or not isinstance(model.state, dict):
        raise PickleRefused("'model' is not a persistent EPD_predictor")
    state = model.state
    tables = state.get("_parameters")
    if not isinstance(tables, dict):
        raise PickleRefused("predictor state has no parameter tables")
    if not all(isinstance(k, str) for k in (*state, *tables)):
        raise PickleRefused("predictor state has a key that is not text")
    for name, value in tables.items():
        if not isinstance(value, torch.Tensor):
            raise PickleRefused(f"table {name!r} is not a tensor")
    hyper = {k: v for k, v in state.items() if not k.startswith("_") and k != "training"}
    return dict(tables), hyper
