"""What verse constraints cost at sampling time: one batch of poems with and without tones and rhymes.

    python scripts/bench_verse.py                                  # random model shaped as conf/model/tiny.yaml
    python scripts/bench_verse.py --model small --repeats 1        # ... as conf/model/small.yaml
    python scripts/bench_verse.py --model-dir DIR --device cuda    # an exported model, on a GPU

The model has random weights unless --model-dir (speed does not depend on them) and the vocabulary of the
bundled sample. For each setting -- free text of the same length (no constraint), the form's layout only (rhyme=none
tones=off), rhyme=pingshui with tones=lenient and tones=strict, and a ci tune -- it samples --samples poems in
one batch, --repeats times, and prints the median seconds of a batch and the seconds spent in the masks
(`FormConstraint.mask`) alone. On a CPU it counts the process's CPU seconds on --threads threads (default 1),
which other programs on a busy machine disturb far less than wall-clock time; on a GPU, wall-clock seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lingmao.data import iter_documents  # noqa: E402
from lingmao.data.tokenizer import train_tokenizer  # noqa: E402
from lingmao.export import LingmaoModel, load_model  # noqa: E402
from lingmao.model import ModelConfig, build_model  # noqa: E402
from lingmao.verse import forms  # noqa: E402

SAMPLE = REPO / "lingmao" / "corpus" / "poetry_sample" / "train.jsonl"


def random_model(shape: str, device: str) -> LingmaoModel:
    """Random weights, shaped as conf/model/<shape>.yaml, with the vocabulary of the bundled sample."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{shape}.yaml")
    tok = train_tokenizer(iter_documents(SAMPLE))
    torch.manual_seed(0)
    shape = ModelConfig(d_model=cfg.d_model, nhead=cfg.nhead, num_layers=cfg.num_layers,
                        dim_feedforward=cfg.dim_feedforward)
    model = build_model(shape, tok.get_vocab_size())
    return LingmaoModel(model.to(device).eval(), tok, {"data": {"context_length": 128}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="an exported model (default: random weights)")
    parser.add_argument("--model", default="tiny", help="shape of the random model: a conf/model/*.yaml name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--form", default="qilv")
    parser.add_argument("--tune", default="浣溪沙")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if cuda else time.process_time
    lm = load_model(args.model_dir, device=args.device) if args.model_dir else random_model(args.model, args.device)
    length = forms.FormConstraint(lm.tokenizer, args.form).steps
    settings = {
        "free text, same length": dict(max_new_tokens=length),
        f"form={args.form} layout only": dict(form=args.form, rhyme="none", tones="off"),
        f"form={args.form} pingshui lenient": dict(form=args.form, rhyme="pingshui", tones="lenient"),
        f"form={args.form} pingshui strict": dict(form=args.form, rhyme="pingshui", tones="strict"),
        f"tune={args.tune}": dict(tune=args.tune),
    }
    in_mask = [0.0]
    original = forms.FormConstraint.mask

    def timed_mask(self, step, generated):
        start = clock()
        out = original(self, step, generated)
        in_mask[0] += clock() - start
        return out

    forms.FormConstraint.mask = timed_mask
    lm.generate(form=args.form, num_samples=2, seed=0)  # builds the vocabulary tables once
    print(f"vocabulary {lm.tokenizer.get_vocab_size()}, {args.samples} samples a batch, device {args.device}, "
          f"{torch.get_num_threads()} threads, {'wall-clock' if cuda else 'CPU'} seconds")
    for name, options in settings.items():
        times, masks = [], []
        for r in range(args.repeats):
            in_mask[0] = 0.0
            start = clock()
            lm.generate(num_samples=args.samples, seed=r, **options)
            if cuda:
                torch.cuda.synchronize()
            times.append(clock() - start)
            masks.append(in_mask[0])
        print(f"{name:<34} {statistics.median(times):8.3f} s a batch   masks {statistics.median(masks):7.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
