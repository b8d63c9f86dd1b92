"""Scale-out on CPU processes (gloo): FSDP2 that trains, stops, resumes and exports; Muon on sharded weights;
faults in multi-process runs; world-size changes; two nodes and torchrun restarts on one machine.

The runs are the app itself (`python -m lingmao.train`), started as a user starts them; rank 1 (started by
Lightning's launcher, a child of rank 0) is found through /proc, so these tests are for Linux.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_module, run_modules, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints (directories): found, checked, read, replaced whole (one process, fast)
# ----------------------------------------------------------------------------------------------
def _sharded_checkpoint(path: Path, step: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A directory in the layout FSDP writes (torch.distributed.checkpoint shards + meta.pt), from one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from lingmao.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, OptimConfig(name="adamw"))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    dcp.save({"state_dict": get_model_state_dict(model), "optimizer_0": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path, no_dist=True)
    torch.save({"global_step": step, "epoch": 0, "hyper_parameters": {"vocab_size": 7}}, path / "meta.pt")
    return model, opt


def test_a_sharded_checkpoint_directory_is_found_checked_and_read_like_a_file(tmp_path):
    from lingmao.checkpointing import checkpoint_problem, find_resume_checkpoint, load_checkpoint_file

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.mkdir(parents=True)
    assert "not a sharded checkpoint (no meta.pt or .metadata)" in checkpoint_problem(last)
    model, opt = _sharded_checkpoint(last)
    assert checkpoint_problem(last) is None
    assert find_resume_checkpoint(None, True, last.parent) == last  # auto-resume takes the directory
    assert find_resume_checkpoint(str(last), False, tmp_path) == last  # and so does resume_from

    shapes = load_checkpoint_file(last, tensors=False)  # without reading the shards
    assert shapes["global_step"] == 3 and shapes["state_dict"]["0.weight"].shape == (3, 4)
    assert shapes["state_dict"]["0.weight"].is_meta
    whole = load_checkpoint_file(last)
    assert torch.equal(whole["state_dict"]["0.weight"], model[0].weight.detach())
    # The optimizer state, keyed by parameter name, loads into a plain optimizer (the groups map the names).
    from lingmao.optim import OptimConfig, build_optimizer

    fresh = build_optimizer(model, OptimConfig(name="adamw"))
    fresh.load_state_dict(whole["optimizer_states"][0])
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])

    (last / "meta.pt").write_bytes(b"not a zip")
    assert "damaged sharded checkpoint" in checkpoint_problem(last)


def test_a_checkpoint_directory_is_replaced_whole_or_put_back(tmp_path):
    from lingmao.checkpointing import recover_checkpoint, remove_stale_temporaries, replace_checkpoint, staging_path

    last = tmp_path / "last.ckpt"
    last.mkdir()
    (last / "old").write_text("old")
    new = staging_path(last, "ab12")
    new.mkdir()
    (new / "new").write_text("new")
    replace_checkpoint(new, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and (last / "new").is_file()

    # Killed between the two renames: the old checkpoint is aside, none in place; the next run puts it back.
    os.rename(last, tmp_path / ".last.ckpt.cd34.old")
    recover_checkpoint(last)
    assert (last / "new").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # A staging directory a kill left behind is removed; a file checkpoint replaced by a directory too.
    staging_path(last, "ef56").mkdir()
    assert remove_stale_temporaries(tmp_path) == 1
    (tmp_path / "file.ckpt").write_bytes(b"x")
    replace_checkpoint(last, tmp_path / "file.ckpt")
    assert (tmp_path / "file.ckpt" / "new").is_file()


@pytest.mark.parametrize(("devices", "processes"), [
    (2, 2), ("2", 2), ([0, 1], 2), ("0,1", 2), ("0, 2, 3", 3), ("1,", 1), ("auto", 1)])
def test_processes_per_machine_read_from_devices_as_lightning_reads_them(devices, processes):
    """A GPU list ("0,1") is its length, not every GPU of the machine; on a CPU "auto" is one process."""
    from lingmao.fsdp import processes_per_node

    assert processes_per_node(devices, "cpu") == processes


def test_optimizer_state_numbered_by_any_strategy_is_matched_by_groups():
    """A checkpoint of one process numbers parameters in the optimizer's group order; FSDP wants names. The
    numbers are read through the groups, not through the model's parameter order (which differs here: the
    norms come between the matrices in the model, after them in the optimizer)."""
    from lingmao.fsdp import named_optimizer_state
    from lingmao.model import ModelConfig, build_model
    from lingmao.optim import OptimConfig, build_optimizer

    model = build_model(ModelConfig.of_size("tiny", d_model=16, dim_feedforward=32), 20)
    opt = build_optimizer(model, OptimConfig(name="muon"))
    model(torch.randint(0, 20, (2, 5))).sum().backward()
    opt.step()
    named = named_optimizer_state(opt.state_dict(), opt, model)
    by_name = dict(model.named_parameters())
    assert named["state"].keys() == {n for n, p in by_name.items() if p in opt.state}
    for name, state in named["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt.state[by_name[name]][key]), (name, key)
    assert [g["params"] for g in named["param_groups"]] == [[n for n, p in by_name.items() if any(
        p is q for q in g["params"])] for g in opt.param_groups]


# ----------------------------------------------------------------------------------------------
# Muon on FSDP2 shards and DDP replicas against one process (two gloo processes, no app)
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _muon_rank(rank: int, port: int, out: str) -> None:
    """One of two ranks: 3 Muon steps of a tiny GPT sharded with fully_shard, and of a DDP replica, each rank on
    its half of a batch; and the same model in this process alone on the whole batch. Writes the largest
    differences from the one-process weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from lingmao.model import ModelConfig, build_model
    from lingmao.optim import OptimConfig, build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        config = ModelConfig.of_size("tiny", d_model=32, dim_feedforward=64)
        single, sharded, replica = (build_model(config, 50) for _ in range(3))
        sharded.load_state_dict(single.state_dict())
        replica.load_state_dict(single.state_dict())
        start = {n: p.detach().clone() for n, p in single.named_parameters()}
        mesh = init_device_mesh("cpu", (2,))
        for block in sharded.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        replica = DistributedDataParallel(replica)
        cfg = OptimConfig(name="muon", warmup_steps=0)
        optimizers = [build_optimizer(m, cfg) for m in (single, sharded, replica.module)]
        batch = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(1))
        x, y = batch[:, :-1], batch[:, 1:]
        mine = slice(2 * rank, 2 * rank + 2)
        for _ in range(3):
            for model, opt, rows in ((single, optimizers[0], slice(None)), (sharded, optimizers[1], mine),
                                     (replica, optimizers[2], mine)):
                logits = model(x[rows])
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), y[rows].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad()
        whole = {n: p.full_tensor() for n, p in sharded.named_parameters()}
        shard_rows = {n: p.to_local().shape[0] for n, p in sharded.named_parameters()}
        result = {
            "fsdp": max((whole[n] - p).abs().max().item() for n, p in single.named_parameters()),
            "ddp": max((q - p).abs().max().item() for (n, p), q in zip(single.named_parameters(),
                                                                       replica.module.parameters(), strict=True)),
            "sharded_rows": shard_rows["blocks.0.attn.q.weight"],
            "moved": max((p - start[n]).abs().max().item() for n, p in single.named_parameters()),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_muon_on_fsdp_shards_and_ddp_replicas_agrees_with_one_process(tmp_path):
    """Muon orthogonalises each whole matrix: under FSDP2 every rank gathers it and keeps its own rows of the
    result, so the shards end as one process's weights; so do the DDP replicas. What differs is the order of
    float32 sums (a gradient averaged over two halves of the batch, not computed over all of it): within 1e-6
    after 3 steps, against weights that moved by about 1e-2 a step."""
    import torch.multiprocessing as mp

    mp.start_processes(_muon_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sharded_rows"] == 16  # 32 rows of the matrix, half on each rank: really sharded
        assert got["moved"] > 1e-2  # three steps moved the weights from their start
        assert got["fsdp"] < 1e-6, got
        assert got["ddp"] < 1e-6, got


# ----------------------------------------------------------------------------------------------
# Running the app with several processes, and watching every one of them
# ----------------------------------------------------------------------------------------------
# Runs a command and reports how every process under it ended: it becomes their "subreaper" (Linux), so the
# ranks that Lightning's rank 0 started are handed to it when rank 0 exits, and it collects their exit codes.
REAPER = r"""
import ctypes, json, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
out = sys.argv[1]
child = subprocess.Popen(sys.argv[2:])
ended = {}
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    ended[pid] = [os.waitstatus_to_exitcode(status), time.time()]
json.dump({"main": child.pid, "ended": ended}, open(out, "w"))
"""


class Run:
    """`python -m lingmao.train ARGS` in a session of its own, under the reaper; output in files."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict[str, str] | None = None,
                 launcher: list[str] | None = None) -> None:
        self.report = tmp / f"{name}.exits.json"
        self.err_path, self.out_path = tmp / f"{name}.err", tmp / f"{name}.out"
        cmd = [*(launcher or [sys.executable, "-m"]), "lingmao.train", *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REAPER, str(self.report), *cmd], cwd=tmp, start_new_session=True,
            stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w"),
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                 **(env or {})},
        )

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def log(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err

    def descendants(self) -> list[int]:
        """Every process under the reaper, parents before their children."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop(0)
            try:
                kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                kids = []
            found += kids
            todo += kids
        return found

    def processes(self) -> list[int]:
        """The training processes (rank 0 first when Lightning starts the others)."""
        found = []
        for pid in self.descendants():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"lingmao.train" in cmdline and b"torch.distributed.run" not in cmdline:
                found.append(pid)
        return found

    def _kill_all(self) -> None:
        """SIGKILL the job's session and every process under it: torchrun starts its workers in sessions of
        their own, which killing the session alone would leave running."""
        for pid in self.descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait_for(self, what, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, f"the run ended first:\n{self.err[-3000:]}"
            assert time.monotonic() < deadline, f"waited {timeout} s:\n{self.err[-3000:]}"
            time.sleep(0.05)

    def exits(self, timeout: float = 120) -> dict:
        """{"main": exit code of the first process, "all": every process's, "last": when the last one ended}."""
        try:
            self.proc.wait(timeout)
        finally:
            self._kill_all()
        report = json.loads(self.report.read_text())
        ended = {int(pid): code for pid, code in report["ended"].items()}
        return {"main": ended[report["main"]][0], "all": sorted(code for code, _ in ended.values()),
                "last": max(t for _, t in ended.values())}

    def kill(self) -> None:
        """kill -9 of the whole job."""
        self._kill_all()
        self.proc.wait()


def checkpoint_step(path: Path) -> int | None:
    """The global step of checkpoint `path` (a file or a sharded directory), None while there is none."""
    from lingmao.checkpointing import checkpoint_problem, load_checkpoint_file

    try:
        if checkpoint_problem(path) is None:
            return int(load_checkpoint_file(path, tensors=False)["global_step"])
    except Exception:  # being replaced at this moment
        pass
    return None


def loader_state(path: Path) -> dict:
    """The training loader's place (`ResumableDataLoader.state_dict`) in checkpoint `path`."""
    from lingmao.checkpointing import load_checkpoint_file

    loop = load_checkpoint_file(path, tensors=False)["loops"]["fit_loop"]
    return loop["state_dict"]["combined_loader"][0]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class FailAt(L.Callback):
    """Raises on rank `rank` at the start of optimizer step `step` (a crash on one rank)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"failing on purpose on rank {self.rank} at step {self.step}")


class SignalAt(L.Callback):
    """Sends `signum` to its own process on rank `rank`: at the start of step `step` of training, or at the
    second batch of the test after training (`stage=test`)."""

    def __init__(self, rank: int, signum: int, stage: str = "train", step: int = 0) -> None:
        self.rank, self.signum, self.stage, self.step = rank, signum, stage, step
        self.sent = False

    def _send(self, trainer) -> None:
        if trainer.global_rank == self.rank and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stage == "train" and trainer.global_step == self.step:
            self._send(trainer)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "test" and batch_idx == 1:
            self._send(trainer)


def _overrides(tmp_path: Path, train: Path, test: Path, steps: int = 8) -> list[str]:
    """A tiny run with the default optimizer (Muon), a checkpoint every 2 steps, metrics every 2."""
    return [
        *(o for o in tiny_overrides(tmp_path, train, test, steps=steps) if o not in ("optim=adamw", "hardware=cpu")),
        "optim.warmup_steps=2", "checkpoint_every_n_steps=2", "checkpoint_every=0", "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=3", "trainer.log_every_n_steps=2",
        "logger.plots=false", "logger.print_config=false",
    ]


FSDP = ["hardware=fsdp", "hardware.accelerator=cpu", "hardware.devices=2", "hardware.fsdp.state_dict_type=sharded"]
DDP = ["hardware=ddp", "hardware.accelerator=cpu", "hardware.devices=2"]


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="finds the ranks through /proc")
def test_fsdp_trains_stops_resumes_on_any_world_size_and_exports(small_corpus, tmp_path):
    """FSDP2 on two CPU processes, Muon, sharded checkpoints (directories):
    - stopped by SIGTERM to rank 1, then by kill -9 of the whole job, and resumed each time, the run exports
      exactly the weights of the same run uninterrupted; the export loads and generates;
    - the same recipe in one process (the same 16 windows a step) ends within 2e-5 of it (float32 sums in
      another order);
    - resumed on another number of processes (2 -> 1 from the sharded directory, 1 -> 2 from a one-process
      checkpoint file), each run goes on with the rest of the epoch's windows, and the two agree as well."""
    from lingmao.export import load_model

    train, test = small_corpus
    base = _overrides(tmp_path, train, test)
    runs = tmp_path / "outputs" / "runs"

    # Uninterrupted, with samples at the end (from the gathered weights); beside it, the same recipe in one
    # process with the same 16 windows a step.
    one = [o for o in base if not o.startswith("data.batch_size")] + ["data.batch_size=16"]
    started = run_modules({"whole": ("lingmao.train", *base, *FSDP, "run_name=whole", "show_samples=true"),
                           "alone": ("lingmao.train", *one, "hardware=cpu", "run_name=alone")}, cwd=tmp_path)
    done, alone = started["whole"], started["alone"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a 五绝 from this model" in done.stdout and "a 七绝 from this model" in done.stdout, done.stdout[-2000:]
    last = runs / "whole" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and checkpoint_step(last) == 8
    exported = load_model(runs / "whole" / "export")
    assert exported.generate("春", max_new_tokens=4, seed=0)[0].startswith("春")

    # SIGTERM to rank 1 alone: both ranks stop at one step, save once and exit 143.
    ckpt = runs / "stopped" / "checkpoints" / "last.ckpt"
    first = Run(tmp_path, "first", *base, *FSDP, "run_name=stopped")
    first.wait_for(lambda: checkpoint_step(ckpt) is not None and len(first.processes()) == 2)
    os.kill(first.processes()[1], signal.SIGTERM)
    sent = time.time()
    ended = first.exits()
    assert ended["all"] == [143, 143] and ended["last"] - sent < 60, (ended, first.err[-3000:])
    steps = {int(line.split(": saved step ")[1].split()[0]) for line in first.err.splitlines()
             if "interrupted by SIGTERM: saved step" in line}
    assert len(steps) == 1 and checkpoint_step(ckpt) == steps.pop() < 8, first.err[-3000:]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]

    # Resumed, then kill -9 of the whole job after its next checkpoint.
    stopped_at = checkpoint_step(ckpt)
    second = Run(tmp_path, "second", *base, *FSDP, "run_name=stopped")
    second.wait_for(lambda: (checkpoint_step(ckpt) or 0) > stopped_at)
    second.kill()
    assert "resuming from" in second.log

    # Resumed again: it finishes with the uninterrupted run's weights, exactly.
    third = run_module("lingmao.train", *base, *FSDP, "run_name=stopped", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming from" in third.stdout  # not a fresh start that happens to train the same 8 steps
    assert largest_difference(weights(runs / "stopped"), weights(runs / "whole")) == 0.0

    # One process, the same 16 windows a step: the same weights but for the order of float32 sums.
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert 0 < largest_difference(weights(runs / "alone"), weights(runs / "whole")) < 2e-5

    # World size 2 -> 1: the sharded directory of two ranks resumed by one process (FSDP on one device), and
    # 1 -> 2: the one-process file resumed by two FSDP ranks; two more steps each, over the same windows. Each
    # keeps processes x data.batch_size, so its data.batch_size changes: resume_changed=accept says it is meant.
    moved = run_modules({
        "to_one": ("lingmao.train", *one, *FSDP[:2], "hardware.devices=1", "hardware.fsdp.state_dict_type=sharded",
                   "run_name=whole", "trainer.max_steps=10", "resume_changed=accept"),
        "to_two": ("lingmao.train", *base, *FSDP, "run_name=alone", "trainer.max_steps=10", "resume_changed=accept"),
    }, cwd=tmp_path)
    to_one, to_two = moved["to_one"], moved["to_two"]
    assert to_one.returncode == 0, to_one.stderr[-3000:]
    assert "written by 2 processes, this run has 1" in to_one.stdout
    assert to_two.returncode == 0, to_two.stderr[-3000:]
    assert "written by 1 process, this run has 2" in to_two.stdout
    # The loader's place counts windows over all ranks: 8 steps x 16, then 2 x 16 more, whichever the world.
    for name, world in (("whole", 1), ("alone", 2)):
        state = loader_state(runs / name / "checkpoints" / "last.ckpt")
        assert (state["epoch"], state["done"], state["world_size"]) == (0, 160, world), state
    assert 0 < largest_difference(weights(runs / "whole"), weights(runs / "alone")) < 2e-5


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="collects the exit codes of the ranks as their subreaper")
def test_ddp_ranks_stop_together_on_a_crash_and_on_signals(small_corpus, tmp_path):
    """Two DDP processes on CPU:
    - an exception on rank 0: every process exits non-zero within 60 s, no crash checkpoint (saving is
      collective), and the next run resumes from the last good checkpoint;
    - SIGINT to rank 1 alone in training: both ranks stop at the same step, one checkpoint, both exit 130;
    - SIGTERM to rank 0 alone during the test after training: both ranks stop, both exit 143."""
    train, test = small_corpus
    base = [*_overrides(tmp_path, train, test), *DDP, "run_name=faults"]
    checkpoints = tmp_path / "outputs" / "runs" / "faults" / "checkpoints"
    hook = "+callbacks.fault._target_=tests.test_scale."

    crash = Run(tmp_path, "crash", *base, f"{hook}FailAt", "+callbacks.fault.rank=0", "+callbacks.fault.step=5")
    crash.wait_for(lambda: "failing on purpose" in crash.err or crash.proc.poll() is not None)
    failed = time.time()
    ended = crash.exits()
    assert len(ended["all"]) == 2 and 0 not in ended["all"] and ended["last"] - failed < 60, (ended, crash.err[-3000:])
    assert "no crash checkpoint in a run of several processes" in crash.err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 4

    interrupt = Run(tmp_path, "interrupt", *base, f"{hook}SignalAt", "+callbacks.fault.rank=1",
                    f"+callbacks.fault.signum={int(signal.SIGINT)}", "+callbacks.fault.step=4")
    ended = interrupt.exits()
    assert ended["all"] == [130, 130], (ended, interrupt.err[-3000:])
    assert "resuming from" in interrupt.log and "step 4" in interrupt.log
    steps = [int(line.split(": saved step ")[1].split()[0]) for line in interrupt.err.splitlines()
             if "interrupted by SIGINT: saved step" in line]
    assert len(steps) == 2 and len(set(steps)) == 1 and checkpoint_step(checkpoints / "last.ckpt") == steps[0] < 8

    in_test = Run(tmp_path, "in_test", *base, f"{hook}SignalAt", "+callbacks.fault.rank=0",
                  f"+callbacks.fault.signum={int(signal.SIGTERM)}", "+callbacks.fault.stage=test")
    ended = in_test.exits()
    assert ended["all"] == [143, 143], (ended, in_test.err[-3000:])
    assert in_test.err.count("interrupted by SIGTERM") == 2 and checkpoint_step(checkpoints / "last.ckpt") == 8
    assert not (checkpoints.parent / "export").exists()  # stopped before the export


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="finds the workers through /proc")
def test_two_nodes_and_a_torchrun_restart_after_kill_9_give_the_same_weights(small_corpus, tmp_path):
    """- Two machines simulated on one: two `torchrun --nnodes=2 --nproc-per-node=1` (node ranks 0 and 1) run
      the unchanged `python -m lingmao.train` command as a DDP run of 2 ranks;
    - `torchrun --max-restarts=2` on one machine, one worker killed by kill -9 after a checkpoint: torchrun
      restarts the job, it resumes by itself and ends with exactly the weights of the two-node run."""
    train, test = small_corpus
    base = [*_overrides(tmp_path, train, test, steps=12), "hardware=ddp", "hardware.accelerator=cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    port = _free_port()
    nodes = [Run(tmp_path, f"node{n}", *base, "hardware.devices=1", "hardware.num_nodes=2", "run_name=nodes",
                 launcher=[*torchrun, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={n}",
                           "--master-addr=127.0.0.1", f"--master-port={port}", "-m"]) for n in (0, 1)]
    for node in nodes:
        ended = node.exits(timeout=240)
        assert ended["main"] == 0, node.err[-3000:]
    runs = tmp_path / "outputs" / "runs"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in nodes[1].log
    assert checkpoint_step(runs / "nodes" / "checkpoints" / "last.ckpt") == 12

    ckpt = runs / "restarted" / "checkpoints" / "last.ckpt"
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a new store for each restart, so the restarted ranks do not read
    # each other's addresses of the killed round (pytorch/pytorch#135712; docs/hardware.md)
    job = Run(tmp_path, "restarted", *base, "hardware.devices=2", "run_name=restarted",
              launcher=[*torchrun, "--standalone", "--nproc-per-node=2", "--max-restarts=2", "--monitor-interval=1",
                        "-m"], env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    job.wait_for(lambda: checkpoint_step(ckpt) is not None and len(job.processes()) == 2)
    killed_at = checkpoint_step(ckpt)
    os.kill(job.processes()[1], signal.SIGKILL)
    ended = job.exits(timeout=300)
    assert ended["main"] == 0, job.err[-3000:]
    assert killed_at < 12 and job.log.count("resuming from") >= 1, job.log[-3000:]
    assert largest_difference(weights(runs / "restarted"), weights(runs / "nodes")) == 0.0
