"""Reads safetensors files (8-byte little-endian header length, JSON header, raw little-endian tensor bytes)."""
import json
import struct

import torch

DTYPES = {"F32": (torch.float32, 4), "I32": (torch.int32, 4), "I64": (torch.int64, 8)}


def read_header(f):
    """Returns the tensor entries by name and the file offset where the data section starts."""
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _tensor(f, data_start, entry):
    dtype, size = DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    f.seek(data_start + begin)
    raw = bytearray(f.read(end - begin))
    if len(raw) != end - begin:
        raise ValueError("safetensors file is truncated")
    return torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"]) if raw else torch.empty(entry["shape"], dtype=dtype)


def read_all(path):
    """Every tensor of a (small) file, by name."""
    with open(path, "rb") as f:
        header, start = read_header(f)
        return {name: _tensor(f, start, entry) for name, entry in header.items()}


def load_into(path, state):
    """
    Copies a file's tensors into `state` (a module's state_dict) one at a time, so that only one tensor is held twice.
    The file and the module must have the same names, and every shape must agree.
    """
    with open(path, "rb") as f:
        header, start = read_header(f)
        missing = sorted(set(state) - set(header))
        extra = sorted(set(header) - set(state))
        if missing or extra:
            raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, entry in header.items():
            target = state[name]
            if list(target.shape) != list(entry["shape"]):
                raise ValueError(f"{name}: file shape {entry['shape']}, model shape {list(target.shape)}")
            with torch.no_grad():
                target.copy_(_tensor(f, start, entry))
    return len(header)
