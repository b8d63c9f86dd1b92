"""Final weights + model config + tokenizer in one folder, and loading them back (no Lightning, no Hydra).

An export folder holds `model.safetensors`, `tokenizer.json`, `config.json`, `lines.safetensors` (the training
lines, `lingmao.verse.lines`) when the export was given them, and the marker `lingmao-export.json`; other files a
user puts there are left alone. A folder is an export because lingmao's marker is there, not because of its file
names: a folder with a config.json of the user's own, or a Hugging Face model folder, is refused rather than
overwritten. Exports written before the marker existed are recognised by their `config.json`, whose `"format"`
is `lingmao-1` or `lingmao-2`.

Every file is checked when loaded: `config.json` records the SHA-256 of the weights, the tokenizer and the
training lines, the marker that of `config.json`; a file that differs (new weights beside an old config, a
damaged copy) is refused in one line. (Exports from before checksums were recorded load without the check.)

Exporting again replaces exactly those files:

1. they are written into a new folder `.export-<random>` inside the target and fsynced;
2. that folder is renamed to `.export-ready` (the commit point: from here the new export is complete on disk);
3. its files move into the target one by one (`os.replace`, `config.json` last), then it is removed.

A crash before 2 leaves the old export as it was (the stray staging folder is removed by the next export);
a crash during 3 leaves `.export-ready`, which the next export or load finishes moving first. So the folder
always holds, or recovers to, one complete export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from tokenizers import Tokenizer

from lingmao.data.tokenizer import load_tokenizer
from lingmao.errors import LingmaoError
from lingmao.io import file_mode, file_sha256, fsync_dir, fsync_file, make_temp_dir, read_text_file
from lingmao.model import ModelConfig, build_model

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, TOKENIZER, LINES = "model.safetensors", "config.json", "tokenizer.json", "lines.safetensors"
MARKER = "lingmao-export.json"
EXPORT_FILES = (WEIGHTS, TOKENIZER, LINES, CONFIG, MARKER)  # in the order they are moved into place: the marker last
FORMAT = "lingmao-2"
OLD_FORMATS = ("lingmao-1", "lingmao-2")  # the config.json "format" of exports written before the marker
READY, STAGING_PREFIX = ".export-ready", ".export-"
DATA_KEYS = ("context_length", "text_key", "template", "convert", "txt_mode")


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of an export's or checkpoint's model settings (keys it does not know are ignored).

    Exports and checkpoints written before the model had an `arch` key hold the design's model."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in values.items() if k in known}
    if "arch" in known:
        values.setdefault("arch", "design")
    return ModelConfig(**values)


def export_problem(directory: Path) -> str | None:
    """Why `directory` cannot receive an export, or None: it must be new, empty (but for what an interrupted
    export left), or a lingmao export (whose other files are kept)."""
    if not directory.exists():
        return None
    if not directory.is_dir():
        return f"{directory} exists and is not a directory"
    names = {p.name for p in directory.iterdir()}
    leftovers = {READY} | {n for n in names if n.startswith(STAGING_PREFIX)}
    if names <= leftovers or is_export(directory):
        return None
    return (
        f"{directory} is a non-empty folder but not a lingmao export (no {MARKER}); an export writes "
        f"{', '.join(EXPORT_FILES)} there: choose a new or empty folder"
    )


def is_export(directory: Path) -> bool:
    """Whether `directory` holds a lingmao export (or one being moved into place): it has lingmao's marker, or it
    is an export from before the marker (its config.json names a lingmao format)."""
    if (directory / READY).is_dir() or (directory / MARKER).is_file():
        return True
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") in OLD_FORMATS


def export_model(
    directory: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, model_cfg: ModelConfig | dict[str, Any],
    data_cfg: dict[str, Any] | None = None, condition: dict[str, Any] | None = None, lines: Any = None,
) -> Path:
    """Write `directory/{model.safetensors, tokenizer.json, config.json}` and, given `lines` (a
    `lingmao.verse.lines.LineSet`), `lines.safetensors` (see the module docstring).

    `condition` (`LMDataModule.condition_record`): what the model was conditioned on (`data.condition`), kept in
    config.json as "condition" with the author list; an export without it is a model without a header.
    Refuses (LingmaoError) a folder that holds other things and is not an export; other files in an export
    folder are kept."""
    directory = Path(directory)
    problem = export_problem(directory)
    if problem:
        raise LingmaoError(problem)
    directory.mkdir(parents=True, exist_ok=True)
    finish_export(directory)  # an interrupted earlier export first
    for stale in directory.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = make_temp_dir(directory, STAGING_PREFIX)
    try:
        save_safetensors(model, str(staging / WEIGHTS))
        tokenizer.save(str(staging / TOKENIZER))
        if lines is not None:
            lines.save(staging / LINES)
        cfg = model_cfg if isinstance(model_cfg, dict) else dataclasses.asdict(model_cfg)
        config = {
            "format": FORMAT,
            "vocab_size": int(getattr(model, "vocab_size", tokenizer.get_vocab_size())),
            "model": cfg,
            "data": {k: (data_cfg or {}).get(k) for k in DATA_KEYS},
            "sha256": {name: file_sha256(staging / name) for name in (WEIGHTS, TOKENIZER, LINES)
                       if (staging / name).is_file()},
        }
        if condition:
            config["condition"] = condition
        (staging / CONFIG).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        marker = {"format": FORMAT, "sha256": {CONFIG: file_sha256(staging / CONFIG)}}
        (staging / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        for name in (n for n in EXPORT_FILES if (staging / n).exists()):
            os.chmod(staging / name, file_mode())
            fsync_file(staging / name)
        fsync_dir(staging)
        os.replace(staging, directory / READY)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_export(directory)
    if lines is None and (directory / LINES).is_file():
        (directory / LINES).unlink()  # an earlier export's, which the new config.json does not list
    return directory


def finish_export(directory: Path) -> None:
    """Move a committed `.export-ready` into place (idempotent: files already moved are not there any more)."""
    ready = directory / READY
    if not ready.is_dir():
        return
    for name in EXPORT_FILES:
        if (ready / name).exists():
            os.replace(ready / name, directory / name)
    fsync_dir(directory)
    shutil.rmtree(ready, ignore_errors=True)


@dataclass
class LingmaoModel:
    """An exported model, ready to use: `.model` (eval mode), `.tokenizer`, `.config`, and `.lines`: the set of
    its training lines (`lingmao.verse.lines.LineSet`), None for an export written before lingmao kept one."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    config: dict[str, Any] = field(default_factory=dict)
    lines: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> LingmaoModel:
        self.model.to(device)
        return self

    def generate(self, prompt: str = "", **options: Any) -> list[str]:
        """Sample text; returns `num_samples` strings, each the prompt followed by the generated text.

        Options (see `lingmao.sampling.generate`): form (wujue, qijue, wulv, qilv, or ci with tune=NAME,
        e.g. tune="浣溪沙"), acrostic, rhyme (pingshui | modern | none; default pingshui with a form), tones
        (strict | lenient | off; default lenient for a shi form), pattern (auto | 平起 | 仄起),
        first_line_rhymes (None = either), distinct_rhymes (default True: no 重韵 in a shi form), refuse_copies
        (None = refuse to complete a training line with a form, when the model has its line set), title, author,
        keywords (a string or a list; with enforce_keywords=True each appears in the result), temperature
        (0 = greedy), top_k, top_p,
        repetition_penalty, max_new_tokens (free text only: a form fixes the length), num_samples, seed,
        convert, context_length, stream, on_token. Tone marks of a result: `lingmao.verse.notation.tone_marks`.
        """
        from lingmao.sampling import generate  # lazy: sampling imports data and forms

        return generate(self, prompt, **options)

    def authors(self) -> dict[str, int]:
        """The authors the model was conditioned on (`data.condition` with author), with their poems in training."""
        return dict(((self.config or {}).get("condition") or {}).get("authors") or {})

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, tokenizer: str | Path | None = None, device: str | torch.device = "cpu"
    ) -> LingmaoModel:
        """Load a checkpoint of a training run (`.ckpt`), without running any code stored in it.

        The tokenizer is `tokenizer`, else the first `tokenizer.json` found beside the checkpoint, in
        its run directory or in the run's `export/` folder. The data settings (context length,
        template, conversion, conditioning) come from the run's exported `config.json` when there is one.
        """
        from lingmao.checkpointing import load_checkpoint_file

        path = Path(path)
        run_dirs = [path.parent, path.parent.parent, path.parent.parent / "export"]
        ckpt = load_checkpoint_file(path)
        if tokenizer is None:
            found = [d / TOKENIZER for d in run_dirs if (d / TOKENIZER).is_file()]
            if not found:
                raise LingmaoError(
                    f"{path}: no {TOKENIZER} beside the checkpoint or in its run directory; pass tokenizer=PATH"
                )
            tokenizer = found[0]
        tok = load_tokenizer(tokenizer)
        try:
            hparams = ckpt["hyper_parameters"]
            vocab_size, model_values = int(hparams["vocab_size"]), dict(hparams["model"])
            state = ckpt["state_dict"]
        except (KeyError, TypeError, ValueError) as exc:
            raise LingmaoError(f"{path}: not a lingmao training checkpoint (no {exc})") from None
        if tok.get_vocab_size() != vocab_size:
            raise LingmaoError(
                f"{tokenizer}: tokenizer has {tok.get_vocab_size()} tokens but the checkpoint was trained with "
                f"{vocab_size}; pass the run's tokenizer=PATH"
            )
        weights = {
            key[len("model."):]: value
            for key, value in state.items() if key.startswith("model.")
        }
        model_cfg = model_config_from_dict(model_values)
        model = build_model(model_cfg, vocab_size)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise LingmaoError(f"{path}: cannot load the weights ({str(exc).splitlines()[0]})") from None
        model.to(device).eval()
        config: dict[str, Any] = {"vocab_size": vocab_size, "model": dataclasses.asdict(model_cfg),
                                  **settings_of_checkpoint(ckpt)}
        lines = None
        for d in run_dirs:
            if (d / CONFIG).is_file():
                try:
                    exported = json.loads((d / CONFIG).read_text(encoding="utf-8"))
                    config["data"] = exported.get("data") or {}
                    if exported.get("condition"):
                        config["condition"] = exported["condition"]
                except (OSError, ValueError, AttributeError):  # unreadable or not an export's: no data settings
                    exported = {}
                lines = load_lines(d, exported if isinstance(exported, dict) else {})  # from the run's export
                break
        else:
            log.warning("%s: no export in its run, so no set of training lines (%s): generated verse may copy "
                        "training lines", path, LINES)
        return cls(model, tok, config, lines)


def settings_of_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The data settings and the conditioning a training checkpoint records (`lingmao.runs`), as an export's
    config.json keeps them; an export of the run, when there is one, is read instead (it has the keywords'
    statistics too)."""
    from lingmao.runs import config_of_checkpoint

    recorded = config_of_checkpoint(ckpt)
    out: dict[str, Any] = {"data": {k: recorded[f"data.{k}"] for k in DATA_KEYS if f"data.{k}" in recorded}}
    if recorded.get("data.condition"):
        out["condition"] = {"fields": list(recorded["data.condition"]),
                            "keywords": recorded.get("data.condition_keywords", 3),
                            "dropout": recorded.get("data.condition_dropout", 0.1)}
    return out


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> LingmaoModel:
    """Load what `export_model` wrote (finishing an export that was interrupted while moving into place)."""
    directory = Path(directory)
    if (directory / READY).is_dir() and os.access(directory, os.W_OK):
        finish_export(directory)
    if not (directory / CONFIG).is_file():
        raise LingmaoError(f"{directory}: not an exported lingmao model (no {CONFIG})")
    config = _read_json(directory / CONFIG, "damaged model config")
    try:
        vocab_size = int(config["vocab_size"])
        model_values = dict(config["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LingmaoError(f"{directory / CONFIG}: damaged model config ({exc})") from None
    verify_export(directory, config)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    if tokenizer.get_vocab_size() != vocab_size:
        raise LingmaoError(
            f"{directory}: tokenizer has {tokenizer.get_vocab_size()} tokens "
            f"but the model was trained with {vocab_size}"
        )
    try:
        model_cfg = model_config_from_dict(model_values)
        model = build_model(model_cfg, vocab_size)
    except (TypeError, ValueError, LingmaoError) as exc:
        raise LingmaoError(f"{directory / CONFIG}: damaged model config ({exc})") from None
    try:
        load_safetensors(model, str(directory / WEIGHTS), strict=True, device=str(device))
    except (OSError, RuntimeError, SafetensorError) as exc:
        first = str(exc).splitlines()[0]
        raise LingmaoError(f"{directory / WEIGHTS}: cannot load the weights ({first})") from None
    model.to(device).eval()
    config["model"] = dataclasses.asdict(model_cfg)
    return LingmaoModel(model, tokenizer, config, load_lines(directory, config))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file of the export; anything else is a one-line LingmaoError saying `what`."""
    try:
        value = json.loads(read_text_file(path))
    except ValueError as exc:
        raise LingmaoError(f"{path}: {what} ({exc})") from None
    if not isinstance(value, dict):
        raise LingmaoError(f"{path}: {what} (not a JSON object)")
    return value


def verify_export(directory: Path, config: dict[str, Any]) -> None:
    """Refuse, in one line, an export whose files are not the ones it wrote: the marker records the SHA-256 of
    config.json, config.json those of the weights and the tokenizer (see the module docstring)."""
    records = []
    if (directory / MARKER).exists():
        records.append((MARKER, _read_json(directory / MARKER, "damaged export marker").get("sha256")))
    records.append((CONFIG, config.get("sha256") or {}))
    for record, sums in records:
        if not isinstance(sums, dict) or any(Path(str(n)).name != n for n in sums):
            raise LingmaoError(f"{directory / record}: damaged checksums (sha256 is not a map of file names)")
        for name, expected in sums.items():
            path = directory / name
            try:
                actual = file_sha256(path)
            except FileNotFoundError:
                raise LingmaoError(f"{path}: missing ({record} records it); export the model again") from None
            except OSError as exc:
                raise LingmaoError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
            if actual != expected:
                raise LingmaoError(
                    f"{path}: not the file this export wrote (its SHA-256 differs from the one {record} records); "
                    f"export the model again, or put back the {name} that belongs with this {record}"
                )


def load_lines(directory: Path, config: dict[str, Any]) -> Any:
    """The export's line set (`lingmao.verse.lines`), or None, said once, for an export written before there was
    one: generation then does not refuse copied lines."""
    from lingmao.verse.lines import LineSet

    if LINES not in (config.get("sha256") or {}) or not (directory / LINES).is_file():
        log.warning("%s: no set of training lines (%s; an export written before lingmao kept one): generated "
                    "verse may copy training lines", directory, LINES)
        return None
    return LineSet.load(directory / LINES)
