"""Bad inputs and bad configs: each fails early with one line naming the file/line/key, and loses nothing.

Most rows run in-process (compose + `train`, or the loader itself); a few run the real entry point
as subprocesses, started together, for the exit code and the one-line output.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from lingmao.cli import describe_hydra_error
from lingmao.config import CONF_DIR, TrainConfig, compose_config, validate
from lingmao.data import ReadReport, iter_documents
from lingmao.data.tokenizer import load_tokenizer
from lingmao.errors import LingmaoError
from lingmao.export import load_model
from lingmao.hardware import available_accelerators
from tests.conftest import SAMPLE, cut_corpus, kill_session, start_module, tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# A workspace with things that must survive: a previous run's checkpoints, an export, a cache file
# ----------------------------------------------------------------------------------------------
@dataclass
class Workspace:
    root: Path
    train: Path
    test: Path
    export: Path
    protected: dict[Path, str] = field(default_factory=dict)

    def overrides(self, *extra: str) -> list[str]:
        base = tiny_overrides(self.root, self.train, self.test)
        return [*base, "run_name=t", f"model_save_dir={self.export}", *extra]

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def folder(self, name: str, note: str = "notes.txt") -> Path:
        """A folder of the user's, not an export: an export must never replace it."""
        (self.root / name).mkdir()
        (self.root / name / note).write_text("the user's own file")
        return self.root / name

    def snapshot(self) -> None:
        self.protected = {p: _digest(p) for p in self.root.rglob("*") if p.is_file()}

    def assert_untouched(self) -> None:
        changed = [str(p) for p, h in self.protected.items() if not p.is_file() or _digest(p) != h]
        assert not changed, f"changed or deleted: {changed}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    train = cut_corpus(SAMPLE / "train.jsonl", tmp_path / "train.jsonl", 150)
    test = cut_corpus(SAMPLE / "test.jsonl", tmp_path / "test.jsonl", 30)
    ckpts = tmp_path / "outputs" / "runs" / "t" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"the previous run's last checkpoint")
    (ckpts / "epoch000.ckpt").write_bytes(b"an epoch checkpoint")
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lingmao-export.json"):
        (export / name).write_bytes(f"previous export: {name}".encode())
    cache = tmp_path / "outputs" / "cache" / "tokens"
    cache.mkdir(parents=True)
    (cache / "old.jsonl.0123.tokens.npy").write_bytes(b"a cache file of another run")
    w = Workspace(tmp_path, train, test, export)
    return w


def _missing_accelerator() -> str | None:
    have = available_accelerators()
    return next((a for a in ("cuda", "mps") if a not in have), None)


# ----------------------------------------------------------------------------------------------
# The table: (id, make the overrides from a workspace, substrings the message must hold)
# ----------------------------------------------------------------------------------------------
LINE_A, LINE_B = '{"text": "甲"}\n', '{"text": "乙"}\n'
NOT_UTF8 = '{"text": "床前明月光"}\n'.encode() + '{"text": "疑是地上霜"}\n'.encode("gb18030")


def with_file(name: str, content: str | bytes, key: str = "data.train_file", *extra: str):
    """A row's overrides: write `content` to `name` in the workspace and point `key` at it."""
    return lambda w: w.overrides(f"{key}={w.write(name, content)}", *extra)


def fresh_run(overrides: list[str]) -> list[str]:
    """The overrides as a new two-step run of its own (another run name), so it trains before failing."""
    kept = [o for o in overrides if not o.startswith(("run_name=", "trainer.max_steps="))]
    return [*kept, "run_name=fresh", "trainer.max_steps=2"]


Row = tuple[str, Callable[[Workspace], list[str]], list[str]]
ROWS: list[Row] = [
    # --- config: unknown keys, types, ranges, cross-field rules
    ("typo-key", lambda w: w.overrides("+optim.lr_rate=1"), ["optim.lr_rate", "unknown key", "did you mean optim.lr"]),
    ("typo-top", lambda w: w.overrides("+sed=1"), ["sed: unknown key", "did you mean seed"]),
    ("type-lr", lambda w: w.overrides("optim.lr=fast"), ["optim.lr='fast'", "a number > 0"]),
    ("type-bool", lambda w: w.overrides("export=maybe"), ["export='maybe'", "true or false"]),
    ("nhead", lambda w: w.overrides("model.nhead=3"), ["model.d_model=32", "model.nhead=3", "allowed nhead"]),
    ("context>max_len", lambda w: w.overrides("model.max_len=16"), ["data.context_length=32", "model.max_len=16"]),
    ("stride", lambda w: w.overrides("data.stride=0"), ["data.stride=0", "integer >= 1"]),
    ("batch", lambda w: w.overrides("data.batch_size=0"), ["data.batch_size=0", ">= 1"]),
    ("dropout", lambda w: w.overrides("model.dropout=1.0"), ["model.dropout=1.0", "[0, 1)"]),
    ("warmup", lambda w: w.overrides("optim.warmup_steps=-5"), ["optim.warmup_steps=-5", ">= 0"]),
    ("gpu-fraction", lambda w: w.overrides("hardware.gpu_memory_fraction=1.5"),
     ["hardware.gpu_memory_fraction", "(0, 1]"]),
    ("night-time", lambda w: w.overrides("night.start=25:00"), ["night.start", "25:00"]),
    ("choice", lambda w: w.overrides("data.on_bad_line=ignore"), ["data.on_bad_line='ignore'", "error, skip"]),
    ("accelerator", lambda w: w.overrides("hardware.accelerator=tpu"), ["hardware.accelerator='tpu'", "cpu, cuda"]),
    ("trainer-owned", lambda w: w.overrides("+trainer.precision=16"), ["trainer.precision", "hardware.precision"]),
    ("missing-train", lambda w: [o for o in w.overrides() if not o.startswith("data.train_file")],
     ["data.train_file: a value is required"]),
    ("template", lambda w: w.overrides("data.template='{0}'"), ["data.template", "named fields"]),
    ("betas", lambda w: w.overrides("optim.betas=[0.9]"), ["optim.betas", "two numbers"]),
    # --- files the config names, checked before anything is read
    ("no-file", lambda w: w.overrides(f"data.train_file={w.root / 'nope.jsonl'}"), ["nope.jsonl: file not found"]),
    # (a directory of data files is an input: a folder without any is the mistake)
    ("directory", lambda w: w.overrides(f"data.train_file={w.folder('mine', 'notes.md')}"),
     ["data.train_file", "is a directory", "no .jsonl"]),
    ("glob", lambda w: w.overrides(f"data.train_file='{w.root}/*.jsonl.gz'"), ["data.train_file", "matches no file"]),
    ("list", lambda w: w.overrides(f"data.train_file=[{w.train},{w.root / 'nope.txt'}]"),
     ["data.train_file", "nope.txt: file not found"]),
    ("no-val-file", lambda w: w.overrides(f"data.val_file={w.root / 'val.jsonl'}"),
     ["data.val_file", "val.jsonl: file not found"]),
    ("val-fraction", lambda w: w.overrides("data.val_fraction=1"), ["data.val_fraction=1", "[0, 1)"]),
    ("txt-mode", lambda w: w.overrides("data.txt_mode=line"), ["data.txt_mode='line'", "block, file"]),
    ("empty-file", lambda w: w.overrides(f"data.train_file={w.write('empty.jsonl', b'')}"), ["empty.jsonl", "empty"]),
    ("not-a-checkpoint", lambda w: w.overrides(f"resume_from={w.train}"),
     ["resume_from", "train.jsonl", "not a checkpoint"]),
    ("export-over-folder", lambda w: w.overrides(f"model_save_dir={w.folder('mine')}"),
     ["model_save_dir", "not a lingmao export"]),
    ("export-over-outputs", lambda w: w.overrides(f"model_save_dir={w.root}"),
     ["model_save_dir", "holds paths.output_dir"]),
    ("export-over-cwd", lambda w: w.overrides("model_save_dir=."), ["model_save_dir: . holds the current directory"]),
    # --- data: file:line: what
    ("bad-json", with_file("b.jsonl", LINE_A + LINE_B + "{oops\n"), ["b.jsonl:3:", "invalid JSON", "on_bad_line=skip"]),
    ("key-missing", with_file("k.jsonl", LINE_A + '{"body": "乙"}\n'), ["k.jsonl:2:", "key 'text' is missing", "body"]),
    ("not-string", with_file("n.jsonl", LINE_A + '{"text": 7}\n'), ["n.jsonl:2:", "not a string"]),
    ("not-utf8", with_file("g.jsonl", NOT_UTF8), ["g.jsonl:2:", "not UTF-8"]),
    ("truncated-gz", lambda w: w.overrides(
        f"data.train_file={w.write('t.jsonl.gz', gzip.compress(w.train.read_bytes())[:-200])}"),
     ["t.jsonl.gz", "damaged gzip"]),
    # The test file is read only by the test, after training (a new run here: the workspace's own is kept).
    ("bad-test-file", lambda w: fresh_run(with_file("bt.jsonl", LINE_A + "[1, 2]\n", "data.test_file")(w)),
     ["bt.jsonl:2:", "JSON object"]),
    ("zero-windows", with_file("short.jsonl", '{"text": "床前明月光"}\n', "data.train_file", "data.context_length=900"),
     ["short.jsonl", "no window", "1 documents", "7 tokens", "context_length"]),
    ("bad-tokenizer", lambda w: w.overrides(f"data.tokenizer_path={w.write('tok.json', '{not json')}"),
     ["tok.json", "not a valid tokenizer.json"]),
]


@pytest.fixture(scope="module")
def conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in ROWS])
def test_bad_input_fails_early_with_one_line(conf, ws: Workspace, make, expected) -> None:
    """Composed and run as the command line would be: a mistake found while composing (an unknown key, a value
    of the wrong type) or while checking and reading is one line either way."""
    from lingmao.train import train

    ws.snapshot()
    with pytest.raises(LingmaoError) as info:
        train(compose_config(make(ws)))
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    ws.assert_untouched()


def test_accelerator_that_is_not_here(conf, ws: Workspace) -> None:
    missing = _missing_accelerator()
    if missing is None:
        pytest.skip("this machine has both CUDA and MPS")
    with pytest.raises(LingmaoError, match=f"hardware={missing}: .* not available"):
        validate(compose("train", overrides=ws.overrides(f"hardware={missing}")))


@pytest.mark.slow
def test_too_few_windows_for_a_batch(conf, ws: Workspace) -> None:
    """Fails inside fit (the loaders are built there) and still leaves the previous run alone."""
    from lingmao.train import train

    cfg = compose("train", overrides=ws.overrides("data.batch_size=4000", "auto_resume=false"))
    ws.snapshot()
    with pytest.raises(LingmaoError, match=r"train.jsonl: only \d+ training windows, fewer than data.batch_size"):
        train(cfg)
    ws.assert_untouched()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lr_rate=1"], "optim.lr_rate: unknown key (did you mean optim.lr?); optim keys: "),
        (["model=tinyy"], "model=tinyy: no such option (did you mean model=tiny?); available: base"),
        (["optim.lr=(("], "override 'optim.lr=((' does not parse: "),
    ],
)
def test_hydra_composition_errors_become_one_line(conf, overrides: list[str], expected: str) -> None:
    with pytest.raises(HydraException) as info:
        compose("train", overrides=overrides)
    message = describe_hydra_error(info.value, TrainConfig)
    assert message is not None and "\n" not in message and expected in message


def test_the_default_configs_are_valid(conf) -> None:
    for overrides in ([], ["model=base", "hardware=cpu"], ["model=large", "hardware=cpu", "night=off"]):
        validate(compose("train", overrides=overrides))


# ----------------------------------------------------------------------------------------------
# What works instead of failing: BOM, Windows line endings; skip mode counts and shows locations
# ----------------------------------------------------------------------------------------------
def test_bom_and_crlf_are_read(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "甲\\r\\n乙"}\r\n\r\n{"text": "丙"}\r\n'.encode())
    assert list(iter_documents(path)) == ["甲\n乙", "丙"]


def test_skip_counts_and_shows_the_first_locations(tmp_path: Path) -> None:
    lines = ['{"text": "好"}'] + ["{bad"] * 7 + ['{"text": "詩"}']
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    report = ReadReport()
    assert list(iter_documents(path, on_bad_line="skip", report=report)) == ["好", "詩"]
    assert report.skipped == 7 and report.documents == 2
    assert report.first_skipped[0].startswith(f"{path}:2: invalid JSON") and len(report.first_skipped) == 5


# ----------------------------------------------------------------------------------------------
# Tokenizer and export files: one clear line each
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, expected",
    [(b"", "not a valid tokenizer.json"), (b"{}", "not a valid tokenizer.json"), (b"\x00\xff", "not a valid")],
)
def test_corrupt_tokenizer(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(LingmaoError, match=expected) as info:
        load_tokenizer(path)
    assert "\n" not in str(info.value)


def test_corrupt_export(tmp_path: Path) -> None:
    from lingmao.data.tokenizer import save_tokenizer, train_tokenizer

    export = tmp_path / "export"
    export.mkdir()
    tok = train_tokenizer(["床前明月光"])
    save_tokenizer(tok, export / "tokenizer.json")
    config = {"vocab_size": tok.get_vocab_size(), "model": {"d_model": 8, "nhead": 2, "num_layers": 1}}
    (export / "config.json").write_text(json.dumps(config))
    (export / "model.safetensors").write_bytes(b"not weights")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    with pytest.raises(LingmaoError, match="model.safetensors: cannot load the weights"):
        load_model(export)
    (export / "config.json").write_text(json.dumps({**config, "model": {"d_model": 8, "nhead": 3}}))
    with pytest.raises(LingmaoError, match="config.json: damaged model config"):
        load_model(export)
    with pytest.raises(LingmaoError, match="not an exported lingmao model"):
        load_model(tmp_path)
    assert (export / "model.safetensors").read_bytes() == before["model.safetensors"]


# ----------------------------------------------------------------------------------------------
# The real entry point: exit code 2, one line, no traceback; started together to share the import time
# ----------------------------------------------------------------------------------------------
CLI_CASES = {
    "hydra-typo": (["optim.lr_rate=1"], 2, "error: optim.lr_rate: unknown key"),
    "data-line": (["data.train_file={bad}"], 2, "bad.jsonl:2: invalid JSON"),
    "debug": (["data.train_file={bad}", "debug=true"], 1, "Traceback"),
    "no-mps": (["hardware=mps"], 2, "error: hardware=mps: MPS is not available"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, tuple[int, str, Workspace]]:
    results = {}
    procs = {}
    for name, (extra, _, _) in CLI_CASES.items():
        root = tmp_path_factory.mktemp(name)
        w = Workspace(root, cut_corpus(SAMPLE / "train.jsonl", root / "train.jsonl", 50),
                      cut_corpus(SAMPLE / "test.jsonl", root / "test.jsonl", 20), root / "export")
        bad = w.write("bad.jsonl", '{"text": "甲"}\n{"text": 乙}\n')
        (root / "outputs" / "runs" / "t" / "checkpoints").mkdir(parents=True)
        (root / "outputs" / "runs" / "t" / "checkpoints" / "last.ckpt").write_bytes(b"keep me")
        w.snapshot()
        args = [*w.overrides(), *(e.format(bad=bad) for e in extra)]
        procs[name] = (w, start_module("lingmao.train", *args, cwd=ROOT, env={"HYDRA_FULL_ERROR": None}))
    for name, (w, proc) in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            kill_session(proc)
        results[name] = (proc.returncode, out + err, w)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CLI_CASES))
def test_entry_point_exit_code_and_message(cli_results, name: str) -> None:
    if name == "no-mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, output, w = cli_results[name]
    _, expected_code, expected = CLI_CASES[name]
    assert code == expected_code, output[-2000:]
    assert expected in output
    if expected_code == 2:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in output, output[-2000:]
    w.assert_untouched()


# ----------------------------------------------------------------------------------------------
# A run that fails before its first step leaves no run folder
# ----------------------------------------------------------------------------------------------
def _entries(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize("extra, expected", [
    pytest.param("data.train_file={gbk}", "g.jsonl:2: not UTF-8", id="while-reading"),
    pytest.param("data.batch_size=4000", "fewer than data.batch_size", id="inside-fit"),
])
def test_a_run_that_fails_before_its_first_step_leaves_no_run_folder(conf, ws: Workspace, extra, expected) -> None:
    """A new run's folder goes away; in an existing run's folder only what this run added goes, and what was there
    stays as it was."""
    from lingmao.train import train

    gbk = ws.write("g.jsonl", NOT_UTF8)
    runs_dir = ws.root / "outputs" / "runs"
    base = [o for o in ws.overrides() if not o.startswith(("run_name=", "model_save_dir="))]
    args = [*base, extra.format(gbk=gbk), "export=false"]
    ws.snapshot()
    existing = _entries(runs_dir / "t")
    with pytest.raises(LingmaoError, match=expected):
        train(compose_config([*args, "run_name=new"]))
    assert sorted(p.name for p in runs_dir.iterdir()) == ["t"]
    with pytest.raises(LingmaoError, match=expected):
        train(compose_config([*args, "run_name=t", "auto_resume=false"]))
    assert _entries(runs_dir / "t") == existing
    ws.assert_untouched()


# ----------------------------------------------------------------------------------------------
# One line from every app for a bad file: not UTF-8, binary, empty, a directory, unreadable
# ----------------------------------------------------------------------------------------------
BAD_FILES: dict[str, bytes | None] = {
    "gbk": "床前明月光\n疑是地上霜\n".encode("gbk"),
    "binary": bytes(range(256)) * 4,
    "empty": b"",
    "directory": None,
    "unreadable": '{"text": "床前明月光"}\n'.encode(),
}


def _unreadable_files_are_unreadable() -> bool:
    """False where this process reads a file of mode 000 anyway (root, or CAP_DAC_OVERRIDE)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
        except PermissionError:
            return True
        return False


CAN_HIDE = _unreadable_files_are_unreadable()


def bad_file(root: Path, kind: str, name: str) -> Path:
    path = root / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if BAD_FILES[kind] is None:
        path.mkdir()
    else:
        path.write_bytes(BAD_FILES[kind])
        if kind == "unreadable":
            path.chmod(0)
    return path


@pytest.fixture(scope="module")
def good_export(tmp_path_factory) -> Path:
    from lingmao.data.tokenizer import train_tokenizer
    from lingmao.export import export_model
    from lingmao.model import ModelConfig, build_model

    tok = train_tokenizer(["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"])
    cfg = ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, max_len=64)
    return export_model(tmp_path_factory.mktemp("model") / "export", build_model(cfg, tok.get_vocab_size()), tok, cfg,
                        {"context_length": 32})


def _run_app(app: str, overrides: list[str]) -> None:
    """What `python -m lingmao.<app> <overrides>` runs, in this process."""
    import importlib

    from lingmao.train import train

    cfg = compose_config(overrides, config_name=app)
    if app == "train":
        train(cfg)
    else:
        importlib.import_module("lingmao.serve.__main__" if app == "serve" else f"lingmao.{app}").run(cfg)


def _plot(run_dir: Path) -> None:
    from lingmao.plot import plot_runs

    plot_runs([run_dir])


# app -> (the bad file's name, what it is given as: the run's overrides or the plot's run folder)
APP_INPUTS: dict[str, tuple[str, Callable[[Path, Path, Path], None]]] = {
    "check": ("poems.txt", lambda bad, model, tmp: _run_app("check", [f"file={bad}"])),
    "check-jsonl": ("poems.jsonl", lambda bad, model, tmp: _run_app("check", [f"file={bad}"])),
    "generate": ("model.ckpt", lambda bad, model, tmp: _run_app(
        "generate", [f"ckpt={bad}", f"tokenizer={model / 'tokenizer.json'}", "device=cpu"])),
    "evaluate": ("test.jsonl", lambda bad, model, tmp: _run_app(
        "evaluate", [f"model_dir={model}", f"data.test_file={bad}", f"output={tmp / 'eval.json'}", "device=cpu"])),
    "serve": ("config.json", lambda bad, model, tmp: _run_app("serve", [f"model_dir={bad.parent}", "port=0"])),
    "plot": ("metrics.csv", lambda bad, model, tmp: _plot(bad.parent)),
    "train": ("train.jsonl", lambda bad, model, tmp: _run_app("train", [
        *tiny_overrides(tmp, bad, cut_corpus(SAMPLE / "test.jsonl", tmp / "t.jsonl", 10)), "run_name=bad"])),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("app", list(APP_INPUTS))
def test_every_app_answers_a_bad_file_with_one_line(app: str, kind: str, good_export: Path, tmp_path: Path) -> None:
    if kind == "unreadable" and not CAN_HIDE:
        pytest.skip("this process reads a file of mode 000 (root): run the tests as another user for this case")
    name, run = APP_INPUTS[app]
    bad = bad_file(tmp_path, kind, name)
    with pytest.raises(LingmaoError) as info:
        run(bad, good_export, tmp_path)
    message = str(info.value)
    assert "\n" not in message and (str(bad) in message or str(bad.parent) in message), message
    assert not (tmp_path / "outputs" / "runs" / "bad").exists()


def test_a_file_in_another_encoding_names_its_line(tmp_path: Path) -> None:
    from lingmao.check import run

    poems = tmp_path / "poems.txt"
    poems.write_bytes("静夜思\n".encode() + "床前明月光\n".encode("gbk"))
    with pytest.raises(LingmaoError, match=rf"^{poems}:2: not UTF-8 .*iconv -f GB18030 -t UTF-8$"):
        run(compose_config([f"file={poems}"], config_name="check"))


APP_COMMANDS = {
    "train": lambda bad, model, tmp: ["lingmao.train", *tiny_overrides(tmp, bad, bad), "run_name=bad"],
    "generate": lambda bad, model, tmp: ["lingmao.generate", f"model_dir={_export_with_config(bad, tmp)}"],
    "evaluate": lambda bad, model, tmp: ["lingmao.evaluate", f"model_dir={model}", f"data.test_file={bad}"],
    "check": lambda bad, model, tmp: ["lingmao.check", f"file={bad}"],
    "serve": lambda bad, model, tmp: ["lingmao.serve", f"model_dir={_export_with_config(bad, tmp)}", "port=0"],
    "plot": lambda bad, model, tmp: ["lingmao.plot", str(_run_with_metrics(bad, tmp))],
}


def _export_with_config(config: Path, tmp: Path) -> Path:
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_bytes(config.read_bytes())
    return tmp / "model"


def _run_with_metrics(metrics: Path, tmp: Path) -> Path:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.csv").write_bytes(metrics.read_bytes())
    return tmp / "run"


@pytest.mark.slow
def test_every_app_on_the_command_line_a_gbk_file_is_one_error_line_and_exit_2(good_export, tmp_path) -> None:
    """The real entry points, started together: exit 2, one `error:` line, no traceback, no run folder."""
    from tests.conftest import run_modules

    commands, folders = {}, {}
    for app in APP_COMMANDS:
        folders[app] = tmp_path / app
        folders[app].mkdir()
        bad = folders[app] / "poems.jsonl"
        bad.write_bytes(BAD_FILES["gbk"])
        commands[app] = tuple(APP_COMMANDS[app](bad, good_export, folders[app]))
    results = run_modules(commands, cwd=folders)
    for app, proc in results.items():
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, (app, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "not UTF-8" in errors[0], (app, proc.stderr[-2000:])
    assert not (tmp_path / "train" / "outputs" / "runs" / "bad").exists()
