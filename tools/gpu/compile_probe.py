"""torch.compile on the GPU: compile time, stream rate, fidelity vs the uncompiled fp32 engine."""
import json
import os
import sys
import time

import numpy as np
import torch

from paper_assets.engine.encoder import Encoder
from paper_assets.engine.model import ModelConfig, load_model

model_dir, jsonl = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(jsonl)]
base_texts = [(r.get("title") or "") + " [SEP] " + (r.get("abstract") or "") for r in rows]
texts = (base_texts * 20)[:40960]
chunks = [(i, texts[i : i + 4096]) for i in range(0, len(texts), 4096)]
probe = base_texts[:2048]


def cfg(**kw):
    return ModelConfig(base_model=f"{model_dir}/base", adapter=f"{model_dir}/adapter", device="cuda", **kw)


def rate(enc, label):
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = sum(len(v) for _, v, _ in enc.encode_stream(chunks))
    torch.cuda.synchronize()
    print(f"{label}: {n / (time.perf_counter() - t):.0f} papers/s", flush=True)


def cos(a, b):
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


ref = Encoder(load_model(cfg(precision="fp32"))).encode(probe)
print("fp32 reference done", flush=True)
for mode in os.environ.get("MODES", "default").split():
    t = time.perf_counter()
    loaded = load_model(cfg(precision="bf16", compile=True))
    enc = Encoder(loaded)
    if mode != "default":
        enc._forward_fn = torch.compile(loaded.model, dynamic=True, mode=mode)
    out = enc.encode(probe)
    print(f"compile {mode}: first encode {time.perf_counter() - t:.1f} s; min cos vs fp32 {cos(out, ref):.6f}",
          flush=True)
    list(enc.encode_stream(chunks[:3]))  # the other widths
    rate(enc, f"compiled bf16 ({mode}) stream")
