"""Part 7 (likelihood ranking): peak memory of candidate scoring against the number of candidates.

One SynthCIT image sample is ranked against `--candidates` distinct answers of different lengths by
`mcit.evaluation.generate.candidate_logprobs` on the shipped base (`builtin:tiny-llava`), with the candidates run on
the shared prompt cache `--chunk` rows at a time (`all`: every candidate in one forward, as before chunking). Each
setting runs in a child process of its own, and memory is measured two ways:

- **peak RSS**: the process's `ru_maxrss` (`resource.getrusage`) after scoring, minus its value after loading the
  model and a two-candidate warm-up, so the delta is what scoring added on top of a warm process;
- **largest chunk cache**: the bytes of keys and values in the biggest cache any candidate forward ran on (read after
  that forward, so the candidate tokens it appended are included), found by wrapping the model's forward.
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

from bench.common import base_model_dir, child_main, synthcit_samples

ADJECTIVES = ("red", "small", "striped", "wooden", "very large green", "old")


def candidate_names(n: int) -> list[str]:
    """`n` distinct answers of one to six words, like class names of a large label set."""
    return [f"{ADJECTIVES[k % len(ADJECTIVES)]} object {k}" for k in range(n)]


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for keys, values, _ in cache for t in (keys, values) if t is not None)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(args) -> dict[str, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mcit.data.collate import Encoder, PixelCache
    from mcit.evaluation.generate import candidate_logprobs

    path = base_model_dir()
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    encoder, pixels = Encoder(processor, max_length=args.max_length), PixelCache(processor)
    sample = synthcit_samples(args.task, "test", 1)[0]
    candidates = candidate_names(args.candidates)
    chunk = args.candidates if args.chunk == "all" else int(args.chunk)
    candidate_logprobs(model, encoder, [sample], [candidates[:2]], pixels, batch_size=args.batch, chunk=chunk)
    warm_rss = _peak_rss_mib()

    forwards: list[dict[str, int]] = []
    original = model.forward

    def spy(*a, **kwargs):
        out = original(*a, **kwargs)
        cache = kwargs.get("cache")
        if cache is not None:  # a candidate forward: its chunk's cache now holds prompt + candidate tokens
            forwards.append({"rows": kwargs["input_ids"].shape[0], "cache_bytes": _cache_bytes(cache)})
        elif out.cache is not None:
            forwards.append({"prompt_rows": kwargs["input_ids"].shape[0], "prompt_tokens": kwargs["input_ids"].shape[1],
                             "prompt_cache_bytes": _cache_bytes(out.cache)})
        return out

    model.forward = spy
    t0 = time.perf_counter()
    scores = candidate_logprobs(model, encoder, [sample], [candidates], pixels, batch_size=args.batch, chunk=chunk)[0]
    seconds = time.perf_counter() - t0
    del model.forward
    peak_rss = _peak_rss_mib()
    prompt, = [f for f in forwards if "prompt_rows" in f]
    chunks = [f for f in forwards if "rows" in f]
    return {"candidates": args.candidates, "chunk": args.chunk, "chunk_rows": chunk, "batch": args.batch,
            "task": args.task, "prompt_tokens": prompt["prompt_tokens"],
            "prompt_cache_mib": round(prompt["prompt_cache_bytes"] / 2**20, 3),
            "candidate_forwards": len(chunks), "max_rows_per_forward": max(f["rows"] for f in chunks),
            "largest_chunk_cache_mib": round(max(f["cache_bytes"] for f in chunks) / 2**20, 2),
            "warm_rss_mib": round(warm_rss, 1), "peak_rss_mib": round(peak_rss, 1),
            "scoring_rss_mib": round(peak_rss - warm_rss, 1), "seconds": round(seconds, 3),
            "best": candidates[max(range(len(scores)), key=scores.__getitem__)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--chunk", default="64", help="candidate rows per forward, or `all` (one forward)")
    parser.add_argument("--batch", type=int, default=64, help="candidate_logprobs' batch_size")
    parser.add_argument("--task", default="shape", help="the SynthCIT task the image sample comes from")
    parser.add_argument("--max-length", type=int, default=256)
    child_main(parser, run, argv)


if __name__ == "__main__":
    main()
