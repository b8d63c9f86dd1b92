"""Config helpers shared by the Hydra apps: resolvers and small derivations."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CORPUS_DIR = Path(__file__).parent / "corpus"
CONF_DIR = Path(__file__).parent.parent / "conf"


def bundled_corpus(relative: str) -> str:
    """`${lingmao.corpus:poetry_sample/train.jsonl}` -> the file shipped inside the package."""
    return str(CORPUS_DIR / relative)


OmegaConf.register_new_resolver("lingmao.corpus", bundled_corpus, replace=True)
