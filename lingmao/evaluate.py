"""`python -m lingmao.evaluate model_dir=DIR data.test_file=FILE`: loss, perplexity and bits per character.

`data.test_file` takes what training's inputs take: a path, a list, a directory or a glob. With
`verse.samples=N` it also generates N poems per form (`verse.forms`: shi forms or ci tune names) and
reports the checker's rates (`lingmao.verse.checker`: format, rhyme, 对粘, tones lenient and strict, no 重韵,
no 重字), distinct-1 / distinct-2 (distinct character n-grams over all n-grams of the N poems, within clauses),
repeated characters (重字) per poem, and how much the poems copy the training data (`lingmao.verse.originality`:
the share of their lines found in it verbatim, the longest run of characters they share with it).

The text is tokenized as in training (`<bos> doc <eos>` packed into one stream) and cut into
non-overlapping windows of the model's context length; the last, shorter window is scored too,
so every token but the first `<bos>` is predicted exactly once.

- loss: mean cross-entropy in nats per predicted token;
- perplexity: exp(loss);
- bits per character: total nats / ln 2 / characters of the documents' text. It does not depend on
  how the text was tokenized, so models with different tokenizers can be compared.

A model trained with `data.condition` reads each text with its header, as in training (the header's tokens
and characters are counted with the text's; `lingmao.scoring` scores the text alone).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from lingmao.cli import run_app
from lingmao.errors import LingmaoError
from lingmao.names import slug

log = logging.getLogger(__name__)
IGNORE = -100


def unigram_perplexity(train_counts: np.ndarray, test_counts: np.ndarray) -> float:
    """Perplexity on the test tokens of a model that knows only the training set's token frequencies
    (add-one smoothed; both arguments are counts per token id): the baseline a trained model must beat by far."""
    size = max(len(train_counts), len(test_counts))
    train = np.pad(np.asarray(train_counts, dtype=np.float64), (0, size - len(train_counts))) + 1.0
    test = np.pad(np.asarray(test_counts, dtype=np.float64), (0, size - len(test_counts)))
    logp = np.log(train / train.sum())
    return float(math.exp(-(test * logp).sum() / test.sum()))


def evaluation_conditioning(lm: Any) -> Any:
    """The header a model trained with `data.condition` reads before each text (as in training: the same
    keyword statistics and field dropout); None for a model without one."""
    from lingmao.data.condition import model_conditioning

    cond = model_conditioning(lm.config or {}, lm.tokenizer)
    if cond is not None and cond.needs_frequencies:
        log.warning("the model's keyword statistics are not at hand (a checkpoint without its run's export): the "
                    "texts are scored without keywords in their headers")
        cond = type(cond)(tuple(f for f in cond.fields if f != "keywords"), cond.keywords, cond.dropout)
    return cond


def test_result(trainer: Any, lm: Any, dm: Any) -> Any:
    """Score the trained model on the datamodule's test split, next to the unigram baseline."""
    from lingmao.report import TestResult

    results = trainer.test(lm, datamodule=dm, verbose=False)
    loss = float(results[0]["test/loss"])
    per_char = dm.tokens_per_char("test")
    vocab = int(lm.hparams["vocab_size"])
    baseline = unigram_perplexity(dm.train_set.token_counts(vocab), dm.test_set.token_counts(vocab))
    return TestResult(loss, math.exp(loss), loss / math.log(2) * per_char if per_char else None, baseline)


def evaluate_file(
    lm: Any,
    path: Any,
    *,
    context_length: int | None = None,
    batch_size: int = 16,
    text_key: str | None = None,
    template: str | None = None,
    convert: str | None = None,
    on_bad_line: str = "error",
    txt_mode: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a file (or a list, a directory or a glob of them: read as one file joined in order) with a loaded
    model; returns the metrics as a dict (see the module doc)."""
    from tqdm.auto import tqdm

    from lingmao.data import TextSource, WindowDataset, input_files, tokenize_files

    data_cfg = (lm.config or {}).get("data") or {}
    model = lm.model
    ctx = int(context_length or data_cfg.get("context_length") or 0)
    if not ctx:
        ctx = model.max_len
        log.warning("the model's context length is unknown; using its positional table size %d", ctx)
    if ctx > model.max_len:
        raise LingmaoError(f"data.context_length: {ctx} is longer than the model accepts ({model.max_len})")
    if batch_size < 1:
        raise LingmaoError(f"batch_size: {batch_size} must be >= 1")
    source = TextSource(
        text_key or data_cfg.get("text_key") or "text",
        template if template is not None else data_cfg.get("template"),
        convert or data_cfg.get("convert") or "none",
        on_bad_line,
        txt_mode or data_cfg.get("txt_mode") or "block",
        evaluation_conditioning(lm),
    )
    files = input_files(path, "data.test_file")
    name = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"
    started = time.perf_counter()
    full = WindowDataset(tokenize_files(files, lm.tokenizer, source, cache_dir=None), ctx, stride=ctx, packing=True)
    characters = full.num_chars  # counted while tokenizing: the files are read once
    tokens = full.tokens(0, full.num_tokens)
    rest = len(tokens) - len(full) * ctx  # tokens from the start of the last, shorter window
    tail = None
    if rest >= 2:
        x = torch.zeros(ctx, dtype=torch.long)
        y = torch.full((ctx,), IGNORE, dtype=torch.long)
        x[: rest - 1] = torch.from_numpy(tokens[len(full) * ctx : -1])
        y[: rest - 1] = torch.from_numpy(tokens[len(full) * ctx + 1 :])
        tail = (x, y)
    windows = len(full) + (tail is not None)
    if windows == 0:
        raise LingmaoError(f"{name}: too little text to score (fewer than 2 tokens)")

    def batches():
        for s in range(0, len(full), batch_size):
            pairs = [full[i] for i in range(s, min(s + batch_size, len(full)))]
            yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        if tail is not None:
            yield tail[0].unsqueeze(0), tail[1].unsqueeze(0)

    device = next(model.parameters()).device
    total_nats, predicted = 0.0, 0
    bar = tqdm(total=windows, desc=f"scoring {Path(str(name)).name}", unit="window", disable=not progress,
               file=sys.stderr)
    with torch.inference_mode():
        for x, y in batches():
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE,
                                   reduction="sum")
            total_nats += float(loss)
            predicted += int((y != IGNORE).sum())
            bar.update(x.size(0))
    bar.close()
    loss = total_nats / predicted
    return {
        "test_file": str(name),
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_character": total_nats / math.log(2) / max(characters, 1),
        "bits_per_token": loss / math.log(2),
        "total_nats": total_nats,
        "documents": full.num_documents,
        "tokens": int(len(tokens)),
        "predicted_tokens": predicted,
        "characters": characters,
        "windows": windows,
        "context_length": ctx,
        "seconds": round(time.perf_counter() - started, 3),
    }


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams of Han characters, n-grams taken within clauses (0 when there are none)."""
    from lingmao.verse.han import is_han
    from lingmao.verse.shape import clauses

    grams = [
        clause.text[i : i + n]
        for text in texts
        for clause in clauses(text)
        for i in range(len(clause.text) - n + 1)
        if all(is_han(ch) for ch in clause.text[i : i + n])
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def evaluate_verse(
    lm: Any,
    forms: list[str],
    samples: int,
    *,
    rhyme: str | None = "none",
    tones: str | None = "off",
    batch_size: int = 100,
    seed: int = 0,
    train_lines: Any = None,
    train_text: Any = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Generate `samples` poems per form and score them; form -> {rates, distinct-1, distinct-2, repeated
    chars per poem, copied lines, longest copied run, example}.

    A form is a shi form (wujue, qijue, wulv, qilv) or a ci tune name. `rhyme` and `tones` are the
    constraints used while generating (the defaults measure what the model writes by itself); the checking
    is always by the Pingshui rules. `train_lines` (a `LineSet`) and `train_text` (a `TrainingText`) are the data
    the copy figures are measured against (None: not measured). `options` go to `LingmaoModel.generate`
    (temperature, top_p, refuse_copies, distinct_rhymes, ...).
    """
    from lingmao.verse.checker import Summary, check, repeated_chars
    from lingmao.verse.originality import copied_lines
    from lingmao.verse.shape import clauses

    if samples < 1:
        raise LingmaoError(f"verse.samples: {samples} must be >= 1")
    if batch_size < 1:
        raise LingmaoError(f"verse.batch_size: {batch_size} must be >= 1")
    results: dict[str, dict[str, Any]] = {}
    for name in forms:
        kind = _form_or_tune(str(name))
        texts: list[str] = []
        for start in range(0, samples, batch_size):
            count = min(batch_size, samples - start)
            texts += lm.generate("", **kind, rhyme=rhyme, tones=tones if "form" in kind else "off",
                                 num_samples=count, seed=seed + start, **options)
        summary = Summary()
        for text in texts:
            summary.add(check(text, kind.get("form"), tune=kind.get("tune")))
        group = next(iter(summary.forms))
        results[name] = {
            "samples": len(texts), **summary.rates(group), "distinct-1": distinct_n(texts, 1),
            "distinct-2": distinct_n(texts, 2),
            "repeated chars per poem": sum(len(repeated_chars([c.text for c in clauses(t)])) for t in texts)
            / len(texts),
        }
        if train_lines is not None:
            copied, total = copied_lines(texts, train_lines)
            results[name]["copied lines"] = copied / total if total else 0.0
        if train_text is not None:
            runs = train_text.longest_runs(texts)
            results[name].update({"longest copied run": max(runs), "mean longest copied run": sum(runs) / len(runs)})
        results[name]["example"] = texts[0]
    return results


def training_reference(lm: Any, train_file: Any = None) -> tuple[Any, Any]:
    """(LineSet, TrainingText) of the training data that copying is measured against: the files of `train_file`,
    else those the model's line set was built from (when they are all still there), read as the model was
    trained (its data.template and data.convert); else the model's line set alone (no longest run); else nothing.
    """
    from lingmao.data import TextSource, input_files
    from lingmao.verse.lines import LineSet
    from lingmao.verse.originality import TrainingText

    files = input_files(train_file, "verse.train_file") if train_file else []
    model_lines = getattr(lm, "lines", None)
    recorded = model_lines.files if model_lines is not None else []
    if not files and recorded and all(Path(f).is_file() for f in recorded):
        files = [Path(f) for f in recorded]
    if files:
        data = (lm.config or {}).get("data") or {}
        source = TextSource(data.get("text_key") or "text", data.get("template"), data.get("convert") or "none",
                            "error", data.get("txt_mode") or "block")
        texts = [text for path in files for text in source.texts(Path(path))]
        return LineSet.from_texts(texts, [str(f) for f in files]), TrainingText(texts)
    if model_lines is not None:
        log.warning("verse: the training files the model names are not here; copied lines are measured against "
                    "the model's line set, the longest copied run not at all (verse.train_file=FILES)")
        return model_lines, None
    log.warning("verse: no training data to measure copying against (verse.train_file=FILES)")
    return None, None


def _form_or_tune(name: str) -> dict[str, str]:
    """{"form": "wujue"} for a shi form, {"tune": name} for a ci tune."""
    from lingmao.verse.forms import CI, FORM_ALIASES, FORMS
    from lingmao.verse.tunes import find_tune

    if name in FORMS or FORM_ALIASES.get(name, CI) != CI:
        return {"form": FORM_ALIASES.get(name, name)}
    if find_tune(name) is not None:
        return {"tune": name}
    raise LingmaoError(f"verse.forms: '{name}' is neither a shi form (wujue, qijue, wulv, qilv) nor a ci tune")


def default_output(cfg: DictConfig) -> Path:
    name = Path(cfg.model_dir).name if cfg.get("model_dir") else Path(cfg.ckpt).stem
    test_file = cfg.data.get("test_file")
    if test_file:
        first = test_file if isinstance(test_file, str) else test_file[0]
        stem = Path(first).name.split(".")[0] or "files"
    else:
        stem = "verse"
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default="outputs")
    return Path(output_dir) / "eval" / slug(f"{name}_{stem}_{time.strftime('%Y%m%d-%H%M%S')}.json")


def run(cfg: DictConfig) -> dict[str, Any]:
    from lingmao.generate import load_for_inference
    from lingmao.io import atomic_write_bytes

    verse = cfg.get("verse") or {}
    samples = int(verse.get("samples") or 0)
    if not cfg.data.get("test_file") and samples <= 0:
        raise LingmaoError("data.test_file=FILE is required (a .jsonl, .jsonl.gz or .txt file, a list, a folder "
                           "or a glob of them, to score), or verse.samples=N (poems per form)")
    lm = load_for_inference(cfg)
    results: dict[str, Any] = {}
    if cfg.data.get("test_file"):
        results = evaluate_file(
            lm, cfg.data.test_file, context_length=cfg.data.context_length, batch_size=int(cfg.batch_size),
            text_key=cfg.data.text_key, template=cfg.data.template, convert=cfg.data.convert,
            on_bad_line=cfg.data.on_bad_line, txt_mode=cfg.data.get("txt_mode"),
        )
    if samples > 0:
        forms = verse.get("forms") or []
        if isinstance(forms, str):  # verse.forms=[qilv,浣溪沙] arrives quoted, as one string (Chinese in it)
            forms = [f.strip() for f in forms.strip("[]").split(",") if f.strip()]
        lines, text = training_reference(lm, verse.get("train_file"))
        results["verse"] = evaluate_verse(
            lm, list(forms), samples, rhyme=verse.get("rhyme"), tones=verse.get("tones"),
            batch_size=int(verse.get("batch_size") or 100), seed=int(verse.get("seed") or 0), train_lines=lines,
            train_text=text, temperature=float(verse.get("temperature", 0.8)), top_p=float(verse.get("top_p", 0.9)),
            refuse_copies=verse.get("refuse_copies"), distinct_rhymes=bool(verse.get("distinct_rhymes", True)),
        )
    results["model"] = str(cfg.model_dir or cfg.ckpt)
    output = Path(cfg.output) if cfg.get("output") else default_output(cfg)
    atomic_write_bytes(output, json.dumps(results, ensure_ascii=False, indent=2).encode("utf-8"))
    if "loss" in results:
        print(
            f"{results['test_file']}: loss {results['loss']:.4f} nats/token, perplexity {results['perplexity']:.2f}, "
            f"{results['bits_per_character']:.4f} bits/character ({results['predicted_tokens']} tokens, "
            f"{results['characters']} characters, {results['windows']} windows) -> {output}"
        )
    from lingmao.verse.checker import Summary

    for name, r in results.get("verse", {}).items():
        rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if k in Summary.LABELS.values())
        copies = ""
        if "copied lines" in r:
            copies += f"; copied lines {100 * r['copied lines']:.1f}%"
        if "longest copied run" in r:
            copies += f", longest copied run {r['longest copied run']} (mean {r['mean longest copied run']:.1f})"
        print(f"{name}: {r['samples']} poems: {rates}; distinct-1 {r['distinct-1']:.3f}, "
              f"distinct-2 {r['distinct-2']:.3f}; 重字 per poem {r['repeated chars per poem']:.2f}{copies}"
              + ("" if "loss" in results else f" -> {output}"))
    return results


if __name__ == "__main__":
    run_app(run, "evaluate")
