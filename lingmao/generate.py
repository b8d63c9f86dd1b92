"""`python -m lingmao.generate model_dir=DIR prompt=...`: sample text or verse from a trained model.

With num_samples=1 the text is printed as it is produced; several samples are generated in one
batch and printed one after the other. Messages go to stderr, poems to stdout. `show_tones=true` prints
the tone marks under each line (`lingmao.verse.notation`); `list_tunes=true` lists the ci tunes (no model
needed); `list_authors=true` the authors a model was conditioned on (`data.condition`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from omegaconf import DictConfig

from lingmao.cli import run_app
from lingmao.errors import LingmaoError

log = logging.getLogger(__name__)


def load_for_inference(cfg: DictConfig):
    """The model of `model_dir=` or `ckpt=` (exactly one of them) on `device=`."""
    from lingmao.export import LingmaoModel, load_model
    from lingmao.sampling import resolve_device

    if bool(cfg.get("model_dir")) == bool(cfg.get("ckpt")):
        raise LingmaoError("give exactly one of model_dir=DIR (an exported model) or ckpt=PATH (a checkpoint)")
    device = resolve_device(cfg.get("device", "auto"))
    if cfg.get("model_dir"):
        return load_model(cfg.model_dir, device=device)
    return LingmaoModel.from_checkpoint(cfg.ckpt, tokenizer=cfg.get("tokenizer"), device=device)


def list_tunes() -> str:
    """The ci tunes, one a line: name, characters, stanzas, poems in the corpus, shape with its rhymes."""
    from lingmao.verse.tunes import tunes

    rows = [
        f"{t.name}\t{t.characters}字\t{'双调' if t.stanza else '单调'}\t{t.poems} poems\t{t.marked_shape()}"
        for t in tunes()
    ]
    note = ("shape: clause lengths, ， or 。 after each, | the stanza break; 平/仄 after a length: the clause "
            "ends in a rhyme of that tone (韵: either tone); a b c ...: the rhyme sets of a tune that changes rhyme")
    return "\n".join(rows + [note])


def list_authors(lm: Any) -> str:
    """The authors the model was conditioned on, one a line with the poems it saw of each, most first."""
    authors = lm.authors()
    if not authors:
        raise LingmaoError("list_authors: this model was not trained with authors (data.condition=[title,author,...])")
    return "\n".join(f"{name}\t{count}" for name, count in authors.items())


def show_tones(texts: list[str], cfg: DictConfig) -> str:
    """Each poem with its tone marks and pattern (`lingmao.verse.notation`)."""
    from lingmao.verse.checker import check
    from lingmao.verse.forms import normalize_form, normalize_rhyme
    from lingmao.verse.notation import LEGEND, tone_marks

    form = normalize_form(cfg.form or ("ci" if cfg.get("tune") else None))
    mode = normalize_rhyme(cfg.rhyme, form)
    out = []
    for i, text in enumerate(texts, start=1):
        verdict = check(text, form, tune=cfg.get("tune"), rhyme_mode=mode)
        head = f"--- {i} ---" if len(texts) > 1 else ""
        about = verdict.form_name() + (f", {verdict.pattern}" if verdict.pattern else "")
        out.append("\n".join(x for x in (head, tone_marks(verdict), f"({about})") if x))
    return "\n".join(out + [LEGEND])


def run(cfg: DictConfig) -> list[str]:
    import random

    if cfg.get("list_tunes"):
        sys.stdout.write(list_tunes() + "\n")
        return []
    lm = load_for_inference(cfg)
    if cfg.get("list_authors"):
        sys.stdout.write(list_authors(lm) + "\n")
        return []
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    log.info("device %s, seed %d", lm.device, seed)
    marks = bool(cfg.get("show_tones"))
    if marks and not (cfg.form or cfg.get("tune")):
        raise LingmaoError("show_tones=true needs a verse form (form=wujue, qijue, wulv, qilv, or ci tune=NAME)")
    streaming = cfg.num_samples == 1 and not marks
    if streaming:
        # The prompt is printed as typed; what follows is the model's (after data.convert of the prompt).
        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        sys.stdout.write(cfg.prompt or "")
        sys.stdout.flush()
    texts = lm.generate(
        cfg.prompt or "", form=cfg.form, tune=cfg.get("tune"), acrostic=cfg.acrostic, rhyme=cfg.rhyme,
        tones=cfg.get("tones"), pattern=cfg.get("pattern"), first_line_rhymes=cfg.get("first_line_rhymes"),
        distinct_rhymes=cfg.get("distinct_rhymes", True), refuse_copies=cfg.get("refuse_copies"), title=cfg.title,
        author=cfg.get("author"), keywords=_keywords(cfg.get("keywords")),
        enforce_keywords=bool(cfg.get("enforce_keywords")),
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
        max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples, seed=seed, convert=cfg.convert,
        context_length=cfg.context_length, stream=stream if streaming else None,
    )
    if streaming:
        sys.stdout.write("\n")
    elif marks:
        sys.stdout.write(show_tones(texts, cfg) + "\n")
    else:
        for i, text in enumerate(texts, start=1):
            sys.stdout.write(f"--- {i} ---\n{text}\n")
    sys.stdout.flush()
    return texts


def _keywords(value: Any) -> Any:
    """keywords=[月,霜] (a Hydra list) or keywords=月 -> a list or a string for `generate`."""
    from omegaconf import ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


if __name__ == "__main__":
    run_app(run, "generate")
