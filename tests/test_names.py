"""Names that become paths: confined under their root, plain slugs any app takes unquoted, and a run's name
unchanged by anything that does not change what is trained."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml

from lingmao import names
from lingmao.callbacks.night import NightConfig
from lingmao.config import PathsConfig, TrainerConfig, compose_config
from lingmao.hardware import DDPConfig, FSDPConfig, HardwareConfig
from lingmao.loggers import LoggerConfig
from tests.conftest import run_module, run_modules, tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def run_app(app: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_module(f"lingmao.{app}", *args, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize(("given", "expected"), [
    ("../../x", "x"), ("a/b", "a-b"), ("my run", "my-run"), ("诗 v2", "诗-v2"), ("x=1,y=2", "x-1-y-2"),
    ("..", ""), (".hidden", "hidden"),
])
def test_slugs_are_plain_names(given, expected):
    assert names.slug(given) == expected


def test_long_names_are_cut_and_stay_distinct():
    a, b = "x" * 300, "x" * 299 + "y"
    assert len(names.slug(a)) == names.MAX_NAME and names.slug(a) != names.slug(b)


@pytest.mark.parametrize("given", ["诗" * 200, "诗" * 199 + "x", "𠀀" * 100, "x" * 119 + "诗" * 3])
def test_names_are_cut_by_bytes_and_can_be_made(given, tmp_path):
    """200 Chinese characters are 600 bytes of UTF-8: far over the 255 a folder name may have."""
    name = names.run_name(given)
    assert len(name.encode()) <= names.MAX_NAME <= 255 and name.isprintable()
    assert name != names.run_name(given[:-1] + "词")  # the hash of the whole keeps cut names apart
    (tmp_path / name).mkdir()
    overrides_name = names.run_name(None, [f"data.template={given}"])
    assert len(overrides_name.encode()) <= names.MAX_NAME
    (tmp_path / overrides_name).mkdir()


@pytest.mark.parametrize(("a", "b"), [
    ("optim.lr=1e-3", "optim.lr=1e+3"),
    ('data.template="{title}：{text}"', 'data.template="{title}，{text}"'),
    ("data.template='{title}\n{text}'", "data.template='{title} {text}'"),
    ("data.text_key=a b", "data.text_key=a-b"),
    ("data.train_file=[a.jsonl,b.jsonl]", "data.train_file=[a.jsonl;b.jsonl]"),
])
def test_overrides_that_differ_never_share_a_folder(a, b):
    assert names.run_name(None, ["model=tiny", a]) != names.run_name(None, ["model=tiny", b])
    for override in (a, b):
        name = names.run_name(None, ["model=tiny", override])
        assert names.slug(name) == name  # still a plain slug, usable unquoted


def test_a_name_that_a_slug_keeps_as_it_is_gets_no_hash():
    assert names.run_name(None, ["model=tiny", "optim.lr=1e-3"]) == "model-tiny__optim.lr-1e-3"


def test_run_name_cannot_leave_the_runs_folder(tmp_path):
    cfg = compose_config([f"paths.output_dir={tmp_path}", "run_name=../../x"])
    run_dir = Path(cfg.paths.run_dir).resolve()
    assert run_dir.parent == (tmp_path / "runs").resolve() and run_dir.name == "x"


def test_a_file_path_becomes_its_name_and_a_hash():
    a = names.run_name(None, ["data.train_file=/a/mine.jsonl", "model=tiny"])
    b = names.run_name(None, ["data.train_file=/b/mine.jsonl", "model=tiny"])
    assert a.startswith("data.train_file-mine.jsonl-") and a.endswith("__model-tiny")
    assert a != b  # two files of the same name are two runs
    assert "=" not in a and "," not in a and "/" not in a


def _override_for(key: str, field: dataclasses.Field) -> str:
    """A value of the right type for `key`, different from its default."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        return f"{key}={str(not default).lower()}"
    if isinstance(default, int):
        return f"{key}={default + 1}"
    if isinstance(default, float):
        return f"{key}={default / 2}"
    return f"{key}=something"


NOT_TRAINING: list[tuple[str, type]] = [
    ("hardware", HardwareConfig), ("hardware.ddp", DDPConfig), ("hardware.fsdp", FSDPConfig), ("night", NightConfig),
    ("logger", LoggerConfig), ("paths", PathsConfig),
]
NOT_TRAINING_KEYS = [
    f"{group}.{f.name}" for group, cls in NOT_TRAINING for f in dataclasses.fields(cls)
] + [
    f"trainer.{f.name}" for f in dataclasses.fields(TrainerConfig) if f.name not in (
        "min_epochs", "min_steps", "limit_train_batches", "deterministic", "fast_dev_run")
] + ["run_name", "auto_resume", "resume_from", "resume_changed", "save_on_interrupt", "checkpoint_every",
     "checkpoint_every_n_steps", "model_save_dir", "export", "run_test", "show_samples", "debug", "model.compile",
     "data.num_workers", "data.test_file", "hardware=cpu", "night=off", "logger=tensorboard",
     "callbacks.progress.every_n_steps"]


@pytest.mark.parametrize("key", NOT_TRAINING_KEYS)
def test_keys_that_do_not_change_training_leave_the_name_alone(key):
    if "=" in key:
        override = key
    else:
        group, _, name = key.rpartition(".")
        cls = dict(NOT_TRAINING).get(group) or (TrainerConfig if group == "trainer" else None)
        field = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls else None
        override = _override_for(key, field) if field else f"{key}=something"
    assert not names.trains_differently(override)
    assert names.run_name(None, ["model=tiny", override]) == names.run_name(None, ["model=tiny"]) == "model-tiny"


@pytest.mark.parametrize("override", ["model=tiny", "optim.lr=3e-4", "seed=2", "data.context_length=64",
                                      "data.train_file=x.jsonl", "data.val_file=v.jsonl", "model.arch=design"])
def test_keys_that_change_training_name_the_run(override):
    assert names.trains_differently(override)


@pytest.mark.slow
def test_the_entry_point_keeps_the_name_when_only_the_machine_changes(tmp_path):
    """`--cfg job` through the real entry point (resolvers and all) prints the composed config; the machine, the
    clock and the schedule's length leave the run's name alone."""
    proc = run_app("train", "hardware=ddp", "hardware.devices=2", "hardware.cpu_threads=1", "night.now=12:00",
                   "trainer.max_steps=900", f"paths.output_dir={tmp_path}", "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["paths"]["run_dir"] == f"{tmp_path}/runs/default"
    assert cfg["hardware"]["strategy"] == "ddp" and cfg["hardware"]["devices"] == 2
    assert cfg["data"]["train_file"].endswith("poetry_sample/train.jsonl")


@pytest.mark.slow
def test_a_run_dir_from_data_file_overrides_works_as_model_dir_unquoted(small_corpus, tmp_path):
    train, test = small_corpus
    mine = tmp_path / "my corpus" / "mine_train.jsonl"
    mine.parent.mkdir()
    mine.write_bytes(train.read_bytes())
    overrides = [o for o in tiny_overrides(tmp_path, train, test, steps=4) if not o.startswith("data.train_file")]
    proc = run_app("train", *overrides, f"data.train_file={mine}", "run_test=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert "=" not in run_dir.name and "," not in run_dir.name and " " not in run_dir.name
    gen = run_app("generate", f"model_dir={run_dir}/export", "form=wujue", "seed=1", "device=cpu")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(gen.stdout.strip().splitlines()) == 2


@pytest.mark.slow
def test_a_bad_override_is_one_line_and_exit_2_in_every_app(tmp_path):
    apps = ("generate", "evaluate", "train")
    results = run_modules({app: (f"lingmao.{app}", "model_dir=a=b,c") for app in apps}, cwd=tmp_path)
    for app, proc in results.items():
        assert proc.returncode == 2, (app, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, (app, proc.stderr[-2000:])
