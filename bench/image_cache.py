"""Part 7 (image cache): host memory of a training pass over 40,000 distinct images at 336 px.

Streams `--images` distinct images through `mcit.data.collate.PixelCache` in batches of `--batch`, as a training
stage does, with a CLIP image processor at LLaVA-1.5's 336 px (built locally: resize the shortest edge to 336, centre
crop 336 x 336, fp32: 1.29 MiB per image). Images are synthetic and made in memory through the cache's `decode` hook:
image i is a `--source` sized (default 448 x 336) RGB window into one fixed random buffer at an offset of its own
(deterministic, distinct, no files, and next to no cost besides the preprocessing).

`--budget-mb` is the cache budget (`benchmark.image_cache_mb`; default: the recipe default); `--budget-mb -1` keeps
everything, as the cache did before it had a budget. The process's resident memory is sampled every `--every`
batches; the result has the peak (`ru_maxrss`), the baseline after setup, the samples, and the cache's own counts.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

from bench.common import child_main

SOURCE = (448, 336)
"""Source image size: 4:3 like most COCO images (LLaVA-1.5's instruction data), with the short edge already at 336.
COCO's own 640 x 480 costs 2.5x the CPU per image (the resize) and yields the same tensors to keep; at 448 x 336 the
40,000 images fit the few minutes a benchmark part may take on two shared cores."""


def _rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # /proc/self/statm: resident pages are the second field
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def clip_336():
    """A CLIP image processor with LLaVA-1.5's settings (openai/clip-vit-large-patch14-336), built locally."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


class SyntheticImages:
    """`decode` hook: path `sim://<i>` -> a deterministic RGB image of `size`, distinct for each i below 2**20."""

    WINDOWS = 1 << 20

    def __init__(self, size: tuple[int, int] = SOURCE, seed: int = 0):
        import numpy as np

        self.size = size
        self.nbytes = size[0] * size[1] * 3
        self.buffer = np.random.default_rng(seed).integers(0, 256, self.nbytes + self.WINDOWS, dtype=np.uint8).tobytes()

    def __call__(self, path: str):
        from PIL import Image

        offset = (int(path.removeprefix("sim://")) * 7919) % self.WINDOWS  # 7919 is odd: offsets never repeat
        return Image.frombytes("RGB", self.size, self.buffer[offset:offset + self.nbytes])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from types import SimpleNamespace

    from mcit.config import BenchmarkConfig
    from mcit.data.collate import MIB, PixelCache

    budget_mb = BenchmarkConfig.image_cache_mb if args.budget_mb is None else args.budget_mb
    bounded = budget_mb >= 0
    processor = SimpleNamespace(image_processor=clip_336())  # PixelCache reads only `processor.image_processor`
    decode = SyntheticImages(tuple(int(x) for x in args.source.split("x")))
    PixelCache(processor, 0, decode=decode)([f"sim://{i}" for i in range(args.batch)])  # warm-up, nothing kept
    cache = PixelCache(processor, budget_mb * MIB if bounded else sys.maxsize, decode=decode)
    baseline = _rss_mib()
    samples = [{"images": 0, "rss_mib": round(baseline, 1), "cache_mib": 0.0}]
    started = time.perf_counter()
    cpu0 = time.process_time()
    for b, start in enumerate(range(0, args.images, args.batch)):
        pixels = cache([f"sim://{i}" for i in range(start, min(start + args.batch, args.images))])
        del pixels  # the step would move them to the model and drop them
        if (b + 1) % args.every == 0 or start + args.batch >= args.images:
            samples.append({"images": min(start + args.batch, args.images), "rss_mib": round(_rss_mib(), 1),
                            "cache_mib": round(cache.bytes_used / MIB, 1)})
    seconds = time.perf_counter() - started
    per_image = cache.bytes_used / len(cache) if len(cache) else None
    return {
        "budget_mb": budget_mb if bounded else None, "images": args.images, "batch": args.batch,
        "source": list(decode.size), "pixel_shape": [3, 336, 336], "image_bytes": per_image,
        "processor": type(processor.image_processor).__name__,
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "final_rss_mib": samples[-1]["rss_mib"], "samples": samples,
        "cache": {"bytes_used": cache.bytes_used, "held_bytes": cache.held_bytes(), "entries": len(cache),
                  "hits": cache.hits, "misses": cache.misses, "evictions": cache.evictions},
        "seconds": round(seconds, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
        "images_per_s": round(args.images / seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget-mb", type=int, default=None, help="MiB; default: the recipe default; -1: no bound")
    parser.add_argument("--source", default=f"{SOURCE[0]}x{SOURCE[1]}", help="synthetic image size WxH")
    parser.add_argument("--every", type=int, default=25, help="sample resident memory every this many batches")
    child_main(parser, run, argv)


if __name__ == "__main__":
    main()
