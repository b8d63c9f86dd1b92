"""Config helpers shared by the Hydra apps: resolvers and small derivations."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

CORPUS_DIR = Path(__file__).parent / "corpus"
CONF_DIR = Path(__file__).parent.parent / "conf"


def bundled_corpus(relative: str) -> str:
    """`${lingmao.corpus:poetry_sample/train.jsonl}` -> the file shipped inside the package."""
    return str(CORPUS_DIR / relative)


OmegaConf.register_new_resolver("lingmao.corpus", bundled_corpus, replace=True)


def quote_unicode_overrides(argv: list[str]) -> list[str]:
    """Quote `key=value` arguments whose value has non-ASCII characters (`prompt=床前明月光`).

    Hydra's override grammar rejects unquoted Chinese text, and the shell has already removed the
    quotes the user typed, so the app adds them back before Hydra parses the command line.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and value[:1] not in ("'", '"') and not value.isascii():
            # Inside Hydra quotes a backslash is literal unless it precedes a quote (or the closing one).
            value = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
            value = '"' + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value) + '"'
            arg = f"{key}={value}"
        out.append(arg)
    return out
