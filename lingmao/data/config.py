"""The `data` config group: every key, its range, and the checks of the files it names (before any is read)."""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING

from lingmao.checks import check_fields, choice, number
from lingmao.data.condition import field_problems
from lingmao.data.reading import CONVERSIONS, TXT_MODES, input_problems
from lingmao.errors import LingmaoError

INPUT_KEYS = ("train_file", "val_file", "test_file")
MAX_SHOWN_PROBLEMS = 3


@dataclass
class DataConfig:
    """What the model is trained, validated and tested on, and how text becomes windows of tokens.

    `train_file`, `val_file` and `test_file` each take one path, a list of paths, a directory or a glob
    (`lingmao.data.reading`). Validation uses `val_file`, or when it is null `val_fraction` of the training
    documents (chosen by a hash of their text, and then not trained on); `test_file` is read only by the test.
    """

    KEY: ClassVar[str] = "data"

    name: str = "jsonl"
    train_file: Any = MISSING
    val_file: Any = None
    val_fraction: float = number(0.02, ge=0, lt=1)
    test_file: Any = None
    tokenizer_path: str | None = None  # null: trained on the training files and cached by their content
    context_length: int = number(128, ge=1)
    batch_size: int = number(32, ge=1)
    stride: int | None = number(None, ge=1)  # step between training windows (null = context_length)
    eval_stride: int | None = number(None, ge=1)  # the same for validation and test windows
    packing: bool = True  # join documents with <eos>/<bos>; false = windows inside single documents only
    text_key: str = "text"
    template: str | None = None  # e.g. "{title}\n{text}"
    txt_mode: str = choice("block", *TXT_MODES)  # .txt: a document per blank-line separated block, or per file
    convert: str = choice("none", *CONVERSIONS)  # OpenCC, before tokenizing and when generating
    on_bad_line: str = choice("error", "error", "skip")
    # A header before each text (lingmao.data.condition, docs/data.md): any of title, author, keywords.
    condition: list[str] = dataclasses.field(default_factory=list)
    condition_keywords: int = number(3, ge=1, le=16)  # at most this many keywords a text (TF-IDF)
    condition_dropout: float = number(0.1, ge=0, lt=1)  # each header field left out with this probability
    min_frequency: int = number(1, ge=1)  # characters seen fewer times become <unk>
    num_workers: int = number(0, ge=0)  # loader worker processes; also files tokenized in parallel

    def __post_init__(self) -> None:
        """Ranges and choices, the rules among the keys, then the files (found, readable, not empty): checked
        when the config is made, before anything is read or written."""
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Raise one LingmaoError naming what is wrong with the keys and the files they name (up to three
        problems), or return. Reads no file: only their existence, kind, size and permissions."""
        problems = data_problems(dataclasses.asdict(self))
        if problems:
            more = len(problems) - MAX_SHOWN_PROBLEMS
            raise LingmaoError("; ".join(problems[:MAX_SHOWN_PROBLEMS]) + (f" (and {more} more)" if more > 0 else ""))

    @classmethod
    def of(cls, data: Any) -> DataConfig:
        """A DataConfig from itself, a mapping or an OmegaConf node (e.g. `cfg.data`)."""
        if isinstance(data, cls):
            return data
        from omegaconf import DictConfig, OmegaConf

        values = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LingmaoError(f"data.{unknown[0]}: unknown key; data keys: {', '.join(sorted(known))}")
        return cls(**values)


def _missing(value: Any) -> bool:
    return value is None or value == MISSING or value == ""


def template_problems(template: str) -> list[str]:
    """A template must name its fields ({title}), not number them."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return [f"data.template={template!r}: not a valid template ({exc}); write fields as {{title}}"]
    if any(f == "" or f.split(".")[0].split("[")[0].isdigit() for f in fields):
        return [f"data.template={template!r}: use named fields such as {{title}} and {{text}}, not {{}} or {{0}}"]
    return []


def rule_problems(data: dict[str, Any]) -> list[str]:
    """Problems of the data keys among themselves (no file is looked at)."""
    out = []
    if _missing(data.get("train_file")):
        out.append("data.train_file: a value is required (e.g. data.train_file=path/to/file.jsonl)")
    if data.get("template"):
        out += template_problems(data["template"])
    condition = list(data.get("condition") or [])
    out += field_problems(condition)
    if condition and data.get("template"):
        out.append("data.condition and data.template: choose one (the header carries the title; the template puts "
                   "fields into the text)")
    return out


def file_problems(data: dict[str, Any]) -> list[str]:
    """Problems of the files the data keys name: found, readable, not empty (stat only, nothing is read)."""
    out = []
    for key in INPUT_KEYS:
        if not _missing(data.get(key)):
            out += input_problems(data[key], f"data.{key}")
    tok = data.get("tokenizer_path")
    if tok and Path(tok).is_dir():
        out.append(f"data.tokenizer_path: {tok}: is a directory, expected a tokenizer.json file (or a new path)")
    return out


def data_problems(data: dict[str, Any]) -> list[str]:
    """Every problem of the data keys: their rules, then their files."""
    return rule_problems(data) + file_problems(data)
