"""Model variants side by side in a plain PyTorch loop: held-out bits per character and time per step.

    python scripts/probe_model.py                                  # the default variants, 200 steps of 16 x 128
    python scripts/probe_model.py --steps 400 --seeds 0 1
    python scripts/probe_model.py --variant "relu2=" --variant "swiglu=activation=swiglu,dim_feedforward=683"

Each variant is `label=key=value,key=value`: keys of `ModelConfig`, or `optim.<key>` / `optim.muon.<key>`
of `OptimConfig`, on top of the `small` gpt model and AdamW (lr 1e-3, warm-up 25 steps, cosine to 10%,
clipping at 1.0). All variants train in one process on the same batches, one step of each in turn, so a
busy machine slows them alike; the step time is the median over the run. Text is converted with OpenCC
(`--convert`, default t2s) and tokenized per character; bits per character are measured on the whole
test file in windows of the training context.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lingmao.data import make_converter
from lingmao.data.tokenizer import special_ids, train_tokenizer
from lingmao.model import ModelConfig, build_model
from lingmao.optim import MuonConfig, OptimConfig, apply_schedule, build_optimizer, group_schedule

SAMPLE = Path(__file__).resolve().parent.parent / "lingmao" / "corpus" / "poetry_sample"
DEFAULT_VARIANTS = [
    "relu2=",
    "swiglu-same-width=activation=swiglu",
    "swiglu-same-params=activation=swiglu,dim_feedforward=683",
    "relu2-tied=tie_weights=true",
    "relu2-dropout0.1=dropout=0.1",
    "relu2-muon=optim.name=muon",
]


@dataclass
class Variant:
    label: str
    model: ModelConfig
    optim: OptimConfig
    seed: int
    step_seconds: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)


def _typed(cls: type, key: str, text: str) -> object:
    kinds = {f.name: f.type for f in fields(cls)}
    if key not in kinds:
        raise SystemExit(f"unknown key {key!r} for {cls.__name__}")
    kind = str(kinds[key])
    if "bool" in kind:
        return text.lower() in ("1", "true", "yes")
    if text.lower() == "null":
        return None
    if "int" in kind:
        return int(text)
    if "float" in kind:
        return float(text)
    return text


def parse_variant(spec: str, seed: int) -> Variant:
    label, _, rest = spec.partition("=")
    model_kw: dict[str, object] = {}
    optim_kw: dict[str, object] = {"warmup_steps": 25}
    muon_kw: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("optim.muon."):
            muon_kw[key[11:]] = _typed(MuonConfig, key[11:], value)
        elif key.startswith("optim."):
            optim_kw[key[6:]] = _typed(OptimConfig, key[6:], value)
        else:
            model_kw[key] = _typed(ModelConfig, key, value)
    optim = OptimConfig(**optim_kw, muon=MuonConfig(**muon_kw))
    return Variant(label, ModelConfig(**model_kw), optim, seed)


def read_texts(path: Path, convert: str) -> list[str]:
    converter = make_converter(convert) or (lambda s: s)
    with path.open(encoding="utf-8") as f:
        return [converter(json.loads(line)["text"]) for line in f if line.strip()]


def encode(texts: list[str], tok) -> torch.Tensor:
    ids = special_ids(tok)
    stream: list[int] = []
    for text in texts:
        stream += [ids["bos"], *tok.encode(text, add_special_tokens=False).ids, ids["eos"]]
    return torch.tensor(stream, dtype=torch.long)


@torch.no_grad()
def bits_per_char(model: torch.nn.Module, tokens: torch.Tensor, num_chars: int, context: int, batch: int) -> float:
    """Mean cross-entropy over non-overlapping windows, in bits, times tokens per character."""
    model.eval()
    span = context + 1
    starts = list(range(0, len(tokens) - span + 1, context))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        chunk = torch.stack([tokens[s : s + span] for s in starts[i : i + batch]])
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count / math.log(2) * len(tokens) / num_chars


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", help="label=key=value,... (repeatable; default: a built-in list)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--convert", default="t2s", help="OpenCC conversion of the text: t2s, s2t or none")
    p.add_argument("--train-file", type=Path, default=SAMPLE / "train.jsonl")
    p.add_argument("--test-file", type=Path, default=SAMPLE / "test.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_texts, test_texts = read_texts(args.train_file, args.convert), read_texts(args.test_file, args.convert)
    tok = train_tokenizer(train_texts)
    vocab = tok.get_vocab_size()
    train, test = encode(train_texts, tok), encode(test_texts, tok)
    test_chars = sum(len(t) for t in test_texts)
    print(f"vocabulary {vocab}, train {len(train):,} tokens, test {len(test):,} tokens / {test_chars:,} characters; "
          f"{args.steps} steps of {args.batch} x {args.context}, {args.threads} thread(s)", flush=True)

    variants = [parse_variant(spec, seed) for seed in args.seeds for spec in (args.variant or DEFAULT_VARIANTS)]
    runs = []
    for v in variants:
        torch.manual_seed(v.seed)
        model = build_model(replace(v.model, max_len=max(v.model.max_len, args.context)), vocab)
        optimizer = build_optimizer(model, v.optim)
        runs.append((v, model, optimizer, [group_schedule(v.optim, g) for g in optimizer.param_groups]))

    for step in range(args.steps):
        for v, model, optimizer, schedules in runs:
            apply_schedule(optimizer, schedules, step, args.steps)
            g = torch.Generator().manual_seed(v.seed * 1_000_003 + step)  # same batches for every variant of a seed
            starts = torch.randint(0, len(train) - args.context - 1, (args.batch,), generator=g)
            chunk = torch.stack([train[s : s + args.context + 1] for s in starts.tolist()])
            t0 = time.perf_counter()
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab), chunk[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), v.optim.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            v.step_seconds.append(time.perf_counter() - t0)
            v.train_losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: " + "  ".join(f"{v.label} {v.train_losses[-1]:.3f}" for v, *_ in runs), flush=True)

    print("\n| variant | seed | parameters | ms/step | train loss (last 20) | test bits/char |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v, model, *_ in runs:
        bpc = bits_per_char(model, test, test_chars, args.context, 32)
        print(f"| {v.label} | {v.seed} | {model.num_parameters():,} | {1000 * statistics.median(v.step_seconds):.0f} "
              f"| {statistics.mean(v.train_losses[-20:]):.3f} | {bpc:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
