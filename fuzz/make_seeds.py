"""Seed corpus for fuzz_gguf: small valid GGUF files written by gguf-py (pip install gguf numpy).

    python3 fuzz/make_seeds.py     # from the repository root; writes fuzz/seeds/fuzz_gguf/
"""
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

OUT = Path(__file__).resolve().parent / "seeds" / "fuzz_gguf"
rng = np.random.default_rng(7)


def write(name, tensors, alignment=None):
    w = gguf.GGUFWriter(str(OUT / name), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "Ġc"])
    w.add_token_types([1, 1, 3])
    w.add_token_scores([0.0, -1.0, -2.5])
    w.add_int64("x.i64", -5)
    w.add_float64("x.f64", 0.5)
    w.add_uint16("x.u16", 7)
    w.add_int8("x.i8", -3)
    for tname, qtype in tensors:
        block, size = GGML_QUANT_SIZES[qtype]
        if qtype == T.F32:
            data = rng.normal(size=(2, 32)).astype(np.float32)
            w.add_tensor(tname, data)
        elif block == 1:
            raw = rng.normal(size=(2, 32)).astype(np.float32)
            raw = gguf.quants.quantize(raw, qtype).view(np.uint8)
            w.add_tensor(tname, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            raw = rng.integers(0, 256, (1, size), dtype=np.uint8)
            raw[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
            w.add_tensor(tname, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    legacy = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
    kquants = [T.Q4_K, T.Q5_K, T.Q6_K]
    write("legacy.gguf", [(f"t.{q.name.lower()}", q) for q in legacy])
    write("kquants.gguf", [(f"t.{q.name.lower()}", q) for q in kquants], alignment=64)
    write("f32_only.gguf", [("token_embd.weight", T.F32)], alignment=8)
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
