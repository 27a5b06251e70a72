"""The dtypes snapshots store: their safetensors names, sizes, and the names the API and CLI accept."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "FLOATING_DTYPES", "ITEMSIZE", "SAFETENSORS_DTYPES", "dtype_name", "parse_dtype"]

#: The safetensors name of each torch dtype a snapshot may hold.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
#: Safetensors names of floating dtypes (the tensors that are averaged) and their torch dtypes.
FLOATING_DTYPES: dict[str, torch.dtype] = {n: t for t, n in SAFETENSORS_DTYPES.items() if t.is_floating_point}
#: Bytes per element of each safetensors dtype.
ITEMSIZE: dict[str, int] = {n: t.itemsize for t, n in SAFETENSORS_DTYPES.items()}

#: Floating dtypes by the names the API and CLI accept.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A floating dtype from its name (``"bfloat16"``) or itself."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")
