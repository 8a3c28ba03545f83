"""Seed corpus for fuzz_safetensors: small valid files written by the reference implementation
(pip install safetensors numpy), plus a few edge cases of the format written by hand.

    python3 fuzz/make_safetensors_seeds.py     # from the repository root; writes fuzz/seeds/fuzz_safetensors/
"""
import json
import struct
from pathlib import Path

import numpy as np
import safetensors
from safetensors.numpy import save

OUT = Path(__file__).resolve().parent / "seeds" / "fuzz_safetensors"
rng = np.random.default_rng(7)


def raw(header, data=b""):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    seeds = {
        "floats.safetensors": save({
            "w.f32": rng.normal(size=(3, 4)).astype(np.float32),
            "w.f16": rng.normal(size=(2, 5)).astype(np.float16),
            "s": np.array(1.5, np.float32),
        }, metadata={"format": "pt"}),
        "ints.safetensors": save({
            "qweight": rng.integers(-2**31, 2**31, (2, 3), dtype=np.int32),
            "g_idx": np.arange(4, dtype=np.int64),
            "b": np.array([True, False]),
            "u": np.arange(3, dtype=np.uint8),
            "e": np.zeros((0, 2), np.float64),
        }),
        "empty.safetensors": raw({}),
        "meta_only.safetensors": raw({"__metadata__": {"a": "b"}}),
    }
    # BF16 and F8 have no numpy dtype: write their raw bytes through TensorSpec.
    bf16 = rng.integers(0, 2**16, 6, dtype=np.uint16)
    f8 = rng.integers(0, 256, 4, dtype=np.uint8)
    specs = {
        "w.bf16": safetensors.TensorSpec(dtype="bfloat16", shape=[2, 3], data_ptr=bf16.ctypes.data,
                                         data_len=bf16.nbytes),
        "w.f8": safetensors.TensorSpec(dtype="float8_e4m3fn", shape=[4], data_ptr=f8.ctypes.data,
                                       data_len=f8.nbytes),
    }
    seeds["bf16_f8.safetensors"] = bytes(safetensors.serialize(specs))
    for name, data in seeds.items():
        (OUT / name).write_bytes(data)
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
