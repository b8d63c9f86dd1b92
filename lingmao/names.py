"""Names that become paths: run names and sweep job folders, as plain slugs confined under their root.

A slug keeps letters (any script), digits, `.`, `_` and `-`; everything else becomes `-`. So a name never
climbs out of its folder (`../x` becomes `x`), and a path made of slugs can be passed to any lingmao app
unquoted (`model_dir=outputs/runs/model-tiny__optim.lr-0.0003/export`).

Two different overrides never make the same name: an override that the slug would change (`optim.lr=1e+3`,
`data.template="{title}：{text}"`) gets a short hash of its text (`optim.lr-1e-3-5d41402a`), and a name longer
than `MAX_NAME` bytes of UTF-8 is cut and ends in a hash of the whole, so every name is a valid path component
(at most 255 bytes on every common filesystem, with room for the prefixes sweeps and temporary files add).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

MAX_NAME = 120  # bytes of UTF-8 (ASCII names: characters, as before)

# Overrides that do not change what is trained, so they stay out of run names: the same run (and its
# checkpoints) whatever the machine, the output switches or the sweep driving it. Prefixes end with a dot.
NOT_IN_RUN_NAME = (
    "hardware", "hardware.", "night", "night.", "logger", "logger.", "callbacks", "callbacks.", "paths.",
    "hydra.", "hydra/", "run_name", "auto_resume", "resume_from", "resume_changed", "save_on_interrupt",
    "checkpoint_every", "checkpoint_every_n_steps", "model_save_dir", "export", "run_test", "debug", "show_samples",
    "hparams_search",
    "trainer.max_steps", "trainer.max_epochs", "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.limit_test_batches", "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "model.compile", "data.num_workers", "data.test_file", "data.eval_stride",
)
_UNSAFE = re.compile(r"[^\w.\-]+")


def _digest(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def slug(text: str, max_len: int = MAX_NAME) -> str:
    """`text` as a single safe path component of at most `max_len` bytes (see the module docstring); '' when
    nothing is left."""
    flat = _UNSAFE.sub("-", text.replace("/", "-").replace("\\", "-")).strip("-.")
    flat = re.sub(r"-{2,}", "-", flat)
    if len(flat.encode()) > max_len:
        head = flat.encode()[: max_len - 9].decode(errors="ignore")  # never half a character
        flat = f"{head.rstrip('-.')}-{_digest(text)}"
    return flat


def distinct_slug(text: str) -> str:
    """`slug(text)`, followed by a hash of `text` when the slug lost something of it (a character replaced or
    dropped), so that two texts never share a slug."""
    flat = slug(text, max_len=1 << 30)
    return flat if flat == text else f"{flat}-{_digest(text)}"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def trains_differently(override: str) -> bool:
    """Whether an override (`key=value`) can change the trained weights (see NOT_IN_RUN_NAME)."""
    key = _key(override)
    return not any(key == p or (p.endswith((".", "/")) and key.startswith(p)) for p in NOT_IN_RUN_NAME)


def _part(override: str) -> str:
    """`data.train_file=/a/b/mine.jsonl` -> `data.train_file-mine.jsonl-<hash>`: the last path component of a
    path value, with a hash of the whole so that two files of the same name make two runs. Any other value that
    a slug would change (`1e+3`, `{title}：{text}`) gets a hash of its own text (see `distinct_slug`)."""
    key, _, value = override.lstrip("+~").partition("=")
    value = value.strip("'\"")
    if "/" in value or "\\" in value:
        tail = re.split(r"[\\/]", value.rstrip("/\\"))[-1]
        return f"{key}-{slug(tail, max_len=1 << 30)}-{_digest(value, 6)}"
    return distinct_slug(f"{key}-{value}" if value else key)


def name_from_overrides(overrides: Iterable[str], keep_all: bool = False) -> str:
    """A slug made of the overrides (sorted; only those that train differently unless `keep_all`)."""
    kept = sorted(o for o in overrides if keep_all or trains_differently(o))
    return slug("__".join(_part(o) for o in kept))


def run_name(given: str | None, overrides: Iterable[str] = ()) -> str:
    """The run's folder name: `given` (run_name=...) as a slug, else the overrides that train differently,
    else 'default'."""
    if given:
        name = slug(str(given))
        if not name:
            from lingmao.errors import LingmaoError

            raise LingmaoError(f"run_name={given!r}: nothing of it can be a folder name; use letters and digits")
        return name
    return name_from_overrides(overrides) or "default"
