"""Sampling speed with and without the KV cache, in one process, interleaved.

    python scripts/bench_generate.py                        # model=small, window 128, 200 new tokens, 1 thread
    python scripts/bench_generate.py --size tiny --repeat 5 --threads 2

A gpt model of the named size with random weights (speed does not depend on the values) samples
`--new-tokens` tokens after a short prompt, with the end token banned so that every run samples the
same number. Each repeat times both paths, alternating which goes first; the table shows the median
and range of tokens/s per path (by the clock, and per second of this process's CPU time, which a busy
machine inflates less) and the median of the per-repeat ratios. Both paths must produce the
same tokens for the same seed; the script says whether they did.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lingmao.model import GPT, SIZES, ModelConfig
from lingmao.sampling import sample_ids

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
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


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

    def run(use_cache: bool) -> tuple[float, float, list[list[int]]]:
        wall, cpu = time.perf_counter(), time.process_time()
        ids = sample_ids(
            model, prompt, eos_id=eos, max_new_tokens=args.new_tokens, num_samples=args.samples,
            temperature=1.0, banned=[eos], context_length=args.window, seed=args.seed, use_cache=use_cache,
        )
        return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu), ids

    run(True), run(False)  # warm-up
    speeds: dict[bool, list[float]] = {False: [], True: []}
    cpu_speeds: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[list[int]]] = {}
    for r in range(args.repeat):
        for use_cache in ((False, True) if r % 2 == 0 else (True, False)):
            speed, cpu_speed, outputs[use_cache] = run(use_cache)
            speeds[use_cache].append(speed)
            cpu_speeds[use_cache].append(cpu_speed)
    ratios = [c / n for c, n in zip(speeds[True], speeds[False], strict=True)]
    cpu_ratios = [c / n for c, n in zip(cpu_speeds[True], cpu_speeds[False], strict=True)]

    print(f"model {args.size} (d {config.d_model}, {config.num_layers} layers), vocabulary {args.vocab}, "
          f"window {args.window}, {args.new_tokens} new tokens x {args.samples} sample(s), "
          f"{args.threads} thread(s), {args.repeat} interleaved repeats")
    print(f"{'':<12}{'tokens/s (median)':>19}{'min':>9}{'max':>9}{'per CPU second':>16}")
    for use_cache, label in ((False, "no cache"), (True, "KV cache")):
        s = speeds[use_cache]
        print(f"{label:<12}{statistics.median(s):>19.1f}{min(s):>9.1f}{max(s):>9.1f}"
              f"{statistics.median(cpu_speeds[use_cache]):>16.1f}")
    print(f"speed-up (median of per-repeat ratios): {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}); by CPU time {statistics.median(cpu_ratios):.2f}x")
    same = outputs[True] == outputs[False]
    print(f"same tokens with and without the cache: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
