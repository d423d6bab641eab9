"""What the thread that launches kernels does besides launching, per 4,096-paper chunk of `embed_papers`, measured
on a CPU with a model that costs nothing (its forward returns zeros), so only the pipeline's own host work shows.

    .venv/bin/python tools/host_overhead.py [tokenizer workers, default 0]

Needs the bench's stand-in model and 20k-paper papers file (`make bench` leaves them in $PAPER_ASSETS_BENCH_DIR,
default /tmp/paper_assets_bench). Prints the time spent in the pipeline between two chunks of the encoder stream
(what a GPU waits through once its queue of launched kernels runs dry) beside the writer's and tokenizer's times.
"""

import shutil
import sys
import time

import torch

from paper_assets.benchkit.bench import bench_dir
from paper_assets.engine import checkpoints, pipeline
from paper_assets.engine.encoder import Encoder
from paper_assets.engine.model import ModelConfig, load_model

BENCH = bench_dir()
BETWEEN = "pipeline work between two chunks (the launching thread)"
timers: dict[str, float] = {}


def timed(name, fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[name] = timers.get(name, 0.0) + time.perf_counter() - started

    return wrapper


class FreeEncoder(Encoder):
    def forward(self, input_ids, attention_mask):
        return torch.zeros((input_ids.shape[0], self.loaded.hidden_size))


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    model = BENCH / "model-768x12"
    loaded = load_model(ModelConfig(base_model=str(model / "base"), adapter=str(model / "adapter"), device="cpu",
                                    precision="fp32", compile=False, tokenizer_workers=workers))
    encoder = FreeEncoder(loaded, token_budget=65536)
    checkpoints.ChunkCheckpoints.write = timed("checkpoint write (writer thread)", checkpoints.ChunkCheckpoints.write)
    pipeline._assemble = timed("partition assembly (writer thread)", pipeline._assemble)
    Encoder.tokenize = timed("tokenise (tokenizer thread)", Encoder.tokenize)
    stream = Encoder.encode_stream

    def measured_stream(self, chunks, prefetch=2):
        for item in stream(self, chunks, prefetch):
            started = time.perf_counter()
            yield item
            timers[BETWEEN] = timers.get(BETWEEN, 0.0) + time.perf_counter() - started

    Encoder.encode_stream = measured_stream
    out = BENCH / "host_overhead"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    started = time.perf_counter()
    report = pipeline.embed_papers(BENCH / "papers-20000.parquet", out / "embeddings.parquet", encoder, out / "ck")
    wall = time.perf_counter() - started
    print(f"{report.rows} rows, {report.chunks} chunks, {wall:.2f} s ({report.rows / wall:,.0f} papers/s, free model)")
    for name, seconds in timers.items():
        print(f"  {name}: {seconds:.2f} s ({seconds / report.chunks * 1000:.0f} ms per chunk)")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
