"""Seed corpus for fuzz_checkpoint: whole and partial checkpoint directories of the target's 2-block model
(hidden 8, FFN 12, heads 2/1 of 4, vocab 16), written by hand in the layout of src/io/checkpoint.rs, each as the
files' contents joined by the target's separator (eqat.json, layer_0000, layer_0001, head, e2e_scales).

    python3 fuzz/make_checkpoint_seeds.py     # from the repository root; writes fuzz/seeds/fuzz_checkpoint/
"""
import json
import random
import struct
from pathlib import Path

OUT = Path(__file__).resolve().parent / "seeds" / "fuzz_checkpoint"
SEPARATOR = b"\n#eqat-file#\n"
HIDDEN, FFN, VOCAB, LAYERS = 8, 12, 16, 2
# (module, out features, in features), in checkpoint order.
LINEARS = [
    ("self_attn.q_proj", 8, HIDDEN),
    ("self_attn.k_proj", 4, HIDDEN),
    ("self_attn.v_proj", 4, HIDDEN),
    ("self_attn.o_proj", HIDDEN, 8),
    ("mlp.gate_proj", FFN, HIDDEN),
    ("mlp.up_proj", FFN, HIDDEN),
    ("mlp.down_proj", HIDDEN, FFN),
]
rng = random.Random(7)


def safetensors(tensors, metadata=None):
    """tensors: {name: (dtype, shape, bytes)} -> the file (header padded with spaces to a multiple of 8)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def block(i, wbits, group):
    per_word = 10 if wbits == 3 else 32 // wbits
    word_mask = (1 << (wbits * per_word)) - 1
    tensors = {
        f"model.layers.{i}.input_layernorm.weight": ("F32", [HIDDEN], f32([1.0] * HIDDEN)),
        f"model.layers.{i}.post_attention_layernorm.weight": ("F32", [HIDDEN], f32([0.9] * HIDDEN)),
    }
    for module, n, k in LINEARS:
        p = f"model.layers.{i}.{module}"
        words = -(-k // per_word)
        groups = 1 if group == -1 else k // group
        qweight = [rng.getrandbits(32) & word_mask for _ in range(n * words)]
        tensors[f"{p}.qweight"] = ("U32", [n, words], struct.pack(f"<{len(qweight)}I", *qweight))
        tensors[f"{p}.qzeros"] = ("U8", [n, groups], bytes(rng.randrange(1 << wbits) for _ in range(n * groups)))
        tensors[f"{p}.scales"] = ("F32", [n, groups], f32([rng.uniform(0.001, 0.05) for _ in range(n * groups)]))
    return safetensors(tensors, {"step_losses": "[0.5,0.25]", "val_losses": "[0.3]"})


def head(untied):
    t = {
        "model.embed_tokens.weight": ("F32", [VOCAB, HIDDEN], f32([rng.gauss(0, 0.02) for _ in range(VOCAB * HIDDEN)])),
        "model.norm.weight": ("F32", [HIDDEN], f32([1.0] * HIDDEN)),
    }
    if untied:
        t["lm_head.weight"] = ("F32", [VOCAB, HIDDEN], f32([rng.gauss(0, 0.02) for _ in range(VOCAB * HIDDEN)]))
    return safetensors(t)


def e2e_scales(group):
    t = {}
    for i in range(LAYERS):
        for module, n, k in LINEARS:
            groups = 1 if group == -1 else k // group
            t[f"model.layers.{i}.{module}.scales"] = ("F32", [n, groups], f32([0.01] * (n * groups)))
    return safetensors(t, {"step_losses": "[1.5]"})


def meta(wbits, group, done, e2e=False):
    m = {
        "format": "eqat-checkpoint", "format_version": 1, "eqat_version": "0.1.0", "source": "fuzz.gguf",
        "wbits": wbits, "group_size": group, "n_layers": LAYERS, "recipe": {"seed": 0},
        "blocks": [{"index": i, "train_loss": 0.25, "val_losses": [0.3]} for i in range(done)],
    }
    if e2e:
        m["e2e"] = {"steps": 1, "final_loss": 1.5}
    return json.dumps(m, indent=2).encode()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    seeds = {
        # Finished, untied head, E2E-QP scales: load_model and a forward run.
        "w4g4_finished": [meta(4, 4, 2, e2e=True), block(0, 4, 4), block(1, 4, 4), head(True), e2e_scales(4)],
        # One block of two: open fails to load block 1; resuming saves it.
        "w4g4_one_block": [meta(4, 4, 1), block(0, 4, 4)],
        "w3_per_channel_tied": [meta(3, -1, 2), block(0, 3, -1), block(1, 3, -1), head(False)],
        "w2g4_started": [meta(2, 4, 0)],
    }
    for name, parts in seeds.items():
        (OUT / name).write_bytes(SEPARATOR.join(parts))
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
