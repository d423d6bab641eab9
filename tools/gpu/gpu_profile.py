"""Where the GPU waits: stream vs forward-only vs tokenise-only rates, budget x pad sweep, torch.profiler table."""
import json
import os
import sys
import time

import torch

from paper_assets.engine.encoder import Encoder
from paper_assets.engine.model import ModelConfig, load_model


def main() -> None:
    model_dir, jsonl = sys.argv[1], sys.argv[2]
    device = os.environ.get("DEVICE", "cuda")
    n_papers = int(os.environ.get("NPROF", "40960"))
    rows = [json.loads(line) for line in open(jsonl)]
    base_texts = [(r.get("title") or "") + " [SEP] " + (r.get("abstract") or "") for r in rows]
    texts = (base_texts * (n_papers // len(base_texts) + 1))[:n_papers]
    chunks = [(i, texts[i : i + 4096]) for i in range(0, len(texts), 4096)]


    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()


    loaded = load_model(ModelConfig(base_model=f"{model_dir}/base", adapter=f"{model_dir}/adapter", device=device,
                                    precision=os.environ.get("PREC", "bf16")))
    print("attn_implementation", getattr(loaded.model.config, "_attn_implementation", "?"), "threads",
          torch.get_num_threads(), "cpus", os.cpu_count(), flush=True)
    enc = Encoder(loaded)
    list(enc.encode_stream(chunks[:2]))
    sync()
    for label in ("first pass", "second pass (every shape seen)"):
        t = time.perf_counter()
        n = sum(len(v) for _, v, _ in enc.encode_stream(chunks))
        sync()
        dt = time.perf_counter() - t
        print(f"stream, {label}: {n / dt:.0f} papers/s (budget {enc.token_budget}, pad {enc.pad_multiple})",
              flush=True)
    t = time.perf_counter()
    toks = [enc.tokenize(tx) for _, tx in chunks]
    dt = time.perf_counter() - t
    tokens = sum(int(c.offsets[-1]) for c in toks)
    print(f"tokenise only (one thread calling, rust parallel): {n / dt:.0f} papers/s, {tokens / dt:.0f} tok/s, "
          f"mean {tokens / n:.0f} tokens/paper", flush=True)
    for budget in [int(b) for b in os.environ.get("BUDGETS", "16384 32768 65536 131072").split()]:
        for pad in [int(p) for p in os.environ.get("PADS", "8 64").split()]:
            e = Encoder(loaded, token_budget=budget, pad_multiple=pad)
            planned = [e.plan(c) for c in toks]
            e.encode_tokenized(planned[0])
            sync()
            t = time.perf_counter()
            launched = None
            for c in planned:  # the stream's overlap, without tokenising
                nxt = e._launch(c)
                if launched is not None:
                    e._finish(launched)
                launched = nxt
            e._finish(launched)
            sync()
            dt = time.perf_counter() - t
            widths = {width for c in planned for width in c.widths}
            print(f"forward only budget {budget} pad {pad}: {n / dt:.0f} papers/s, {len(widths)} widths", flush=True)
    if device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in enc.encode_stream(chunks[:4]):
                pass
            sync()
            wall = time.perf_counter() - t
        averages = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in averages) / 1e6
        print(f"profiled {4 * 4096} papers: wall {wall:.2f} s, device busy {busy:.2f} s ({busy / wall:.0%})")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":  # the tokenizer's worker processes are spawned
    main()
