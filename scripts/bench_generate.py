"""Sampling speed of one reader: each way of running the model per token, in one process, interleaved.

    python scripts/bench_generate.py                        # model=small, window 128, 200 new tokens, 1 thread
    python scripts/bench_generate.py --repeat 5 --compile   # and the decoding step through torch.compile
    python scripts/bench_generate.py --size tiny --repeat 5 --threads 2

A gpt model of the named size with random weights (speed does not depend on the values) samples `--new-tokens`
tokens after a short prompt, with the end token banned so that every run samples the same number, through
`lingmao.decoding` (the path of `lingmao.generate` and the server) with each way of computing a token:

- no cache: the whole context through the model at every step;
- KV cache, module forward: the model's own forward for the newest token over its KV cache (q, k and v three
  products, every module called), the cached path before `DecodeStep`;
- decode step, q k v apart: `lingmao.model.DecodeStep` with three products for q, k and v;
- decode step: `DecodeStep` as used (q, k and v one product), the default;
- decode step, compiled (--compile): the same through `torch.compile` (minutes to compile on a CPU).

The KV cache is allocated once per generation in every cached path (`KVCache`). Each path's step is made once,
before the timing, as the app makes its decoding step once per model (`GPT.decode_step` keeps it while the weights
do not change); the time to make it is printed. Each repeat times every path,
rotating which goes first; the table shows the median and range of tokens/s per path (by the clock, and per second
of this process's CPU time, which a busy machine inflates less) and the median of the per-repeat ratios to the
path without cache. Every path must produce the tokens of the path without cache for the same seed; the script
says whether they did (one token in a different last bit of a logit may, rarely, differ).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from lingmao.decoding import BatchDecoder, Generation
from lingmao.model import GPT, SIZES, DecodeStep, KVCache, ModelConfig
from lingmao.sampling import sampling_rules

VOCAB = 6256  # the bundled poetry sample converted to simplified characters (t2s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=list(SIZES), help="model size (default: small)")
    p.add_argument("--window", type=int, default=128, help="context window in tokens (default: 128)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens to sample per run (default: 200)")
    p.add_argument("--prompt-tokens", type=int, default=8, help="length of the prompt (default: 8)")
    p.add_argument("--samples", type=int, default=1, help="samples per run, as one batch (default: 1)")
    p.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size (default: {VOCAB})")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats of each path (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--compile", action="store_true", help="also time the decoding step through torch.compile")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class ModuleForward:
    """The model's own forward, one token per row into its KV cache (all rows at one position)."""

    def __init__(self, model: GPT) -> None:
        self.model = model

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        rows = cache.rows(0, tokens.size(0))
        rows.length = int(positions[0])
        return self.model(tokens.unsqueeze(1), cache=rows)[:, -1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = ModelConfig.of_size(args.size, max_len=max(args.window, 1))
    model = GPT(config, args.vocab).eval()
    for block in model.blocks:  # zero-initialised projections would make every block the identity
        torch.nn.init.normal_(block.attn.proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.02)
    eos = 3
    prompt = [2, *torch.randint(4, args.vocab, (args.prompt_tokens,)).tolist()]
    tokens = args.new_tokens * args.samples

    started = time.perf_counter()
    model.decode_step()
    made_in = time.perf_counter() - started
    paths: dict[str, Callable[..., torch.Tensor] | None] = {
        "no cache": None,
        "KV cache, module forward": ModuleForward(model),
        "decode step, q k v apart": DecodeStep(model, fuse_qkv=False),
        "decode step": model.decode_step(),
    }
    if args.compile:
        paths["decode step, compiled"] = torch.compile(DecodeStep(model).__call__, dynamic=False)

    def run(path: str) -> tuple[float, float, list[list[int]]]:
        wall, cpu = time.perf_counter(), time.process_time()
        step = paths[path]
        decoder = BatchDecoder(model, args.window, use_cache=step is not None)
        if step is not None:
            decoder.step_fn = step
        generation = Generation(
            prompt, eos_id=eos, max_new_tokens=args.new_tokens, num_samples=args.samples, temperature=1.0,
            rules=sampling_rules(args.vocab, banned=[eos]), context_length=args.window, seed=args.seed,
        )
        decoder.add(generation)
        while decoder.generations:
            decoder.step()
        return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu), generation.rows()

    compile_started = time.perf_counter()
    for path in paths:  # warm-up (and compilation)
        run(path)
    warm_up = time.perf_counter() - compile_started
    speeds: dict[str, list[float]] = {p: [] for p in paths}
    cpu_speeds: dict[str, list[float]] = {p: [] for p in paths}
    outputs: dict[str, list[list[int]]] = {}
    names = list(paths)
    for r in range(args.repeat):
        for path in names[r % len(names):] + names[: r % len(names)]:
            speed, cpu_speed, outputs[path] = run(path)
            speeds[path].append(speed)
            cpu_speeds[path].append(cpu_speed)

    print(f"model {args.size} (d {config.d_model}, {config.num_layers} layers), vocabulary {args.vocab}, "
          f"window {args.window}, {args.new_tokens} new tokens x {args.samples} sample(s), "
          f"{args.threads} thread(s), {args.repeat} interleaved repeats"
          + (f"; warm-up with compilation {warm_up:.0f} s" if args.compile else ""))
    print(f"making the decode step (once per model while its weights do not change): {made_in * 1000:.1f} ms")
    print(f"{'':<28}{'tokens/s (median)':>18}{'min':>8}{'max':>8}{'per CPU s':>11}{'x no cache':>12}{'same':>6}")
    for path in paths:
        s = speeds[path]
        ratio = statistics.median(a / b for a, b in zip(s, speeds["no cache"], strict=True))
        same = "yes" if outputs[path] == outputs["no cache"] else "NO"
        print(f"{path:<28}{statistics.median(s):>18.1f}{min(s):>8.1f}{max(s):>8.1f}"
              f"{statistics.median(cpu_speeds[path]):>11.1f}{ratio:>11.2f}x{same:>6}")
    same = all(outputs[p] == outputs["no cache"] for p in paths)
    print(f"same tokens on every path: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
