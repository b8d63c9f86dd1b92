"""Throughput and latency of `python -m lingmao.serve` with 1, 4 and 16 concurrent clients, batched decoding against
one generation at a time, in one invocation.

    python scripts/bench_serve.py                          # model=small with random weights, 五律
    python scripts/bench_serve.py --form free --new-tokens 64          # free text instead of a form
    python scripts/bench_serve.py --model-dir outputs/runs/default/export --clients 1 4 16 --form qijue
    python scripts/bench_serve.py --device cuda                        # on a GPU

Two servers run the same export as a user runs them (`python -m lingmao.serve`, each in its own process): one
with `limits.max_concurrent=16` (the default: the generations in flight are decoded together), one with
`limits.max_concurrent=1` (one generation at a time, the others wait). For each number of clients, each server in
turn (the order alternating) gets `--rounds` requests per client from that many clients at once; each client
sends its next request when the last has been answered. A request is `POST /api/generate` of a poem of `--form`
(its length is fixed; or free text of `--new-tokens` characters with `--form free`) with a seed of its own. The
table gives the characters generated per second over the whole run (first request sent to last answer) and the
median and 95th percentile of the requests' latencies, as the clients saw them. Both servers must return the same
texts for the same seeds (the script says whether they did).

Without --model-dir the model is `model=small` (4 layers, d 256) with random weights and the tokenizer of the
bundled corpus sample converted to simplified characters (6,256 tokens, as the default run): speed does not
depend on the values of the weights.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, help="an export (default: model=small with random weights)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (default: 1 4 16)")
    p.add_argument("--rounds", type=int, default=4, help="requests per client at each level (default: 4)")
    p.add_argument("--form", default="wulv", help="the form of every request (default: wulv, 48 characters); "
                   "free: free text of --new-tokens characters")
    p.add_argument("--new-tokens", type=int, default=48, help="characters of a free-text request (default: 48)")
    p.add_argument("--batch", type=int, default=16, help="limits.max_concurrent of the batched server (default: 16)")
    p.add_argument("--device", default="cpu", help="device= of each server: cpu, cuda, mps (default: cpu)")
    p.add_argument("--threads", type=int, help="cpu_threads= of each server: its torch CPU threads (default: "
                   "the server's own, 1)")
    return p.parse_args(argv)


def random_small_export(directory: Path) -> Path:
    """model=small with random weights (projections not zero) and the bundled sample's t2s tokenizer."""
    import itertools

    import torch

    from lingmao import export_model
    from lingmao.config import CORPUS_DIR
    from lingmao.data import iter_documents, make_converter
    from lingmao.data.tokenizer import train_tokenizer
    from lingmao.model import ModelConfig, build_model

    convert = make_converter("t2s")
    texts = [convert(t) for t in itertools.islice(iter_documents(CORPUS_DIR / "poetry_sample" / "train.jsonl"), None)]
    tok = train_tokenizer(texts)
    torch.manual_seed(0)
    cfg = ModelConfig.of_size("small")
    model = build_model(cfg, tok.get_vocab_size()).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.02)
    import dataclasses

    data = {"context_length": 128, "text_key": "text", "template": None, "convert": "t2s"}
    return export_model(directory, model, tok, dataclasses.asdict(cfg), data)


class Server:
    """`python -m lingmao.serve model_dir=DIR port=0 limits.max_concurrent=N ...` in a process of its own."""

    def __init__(self, model_dir: Path, max_concurrent: int, threads: int | None, cwd: Path,
                 device: str = "cpu") -> None:
        args = [sys.executable, "-m", "lingmao.serve", f"model_dir={model_dir}", "port=0", f"device={device}",
                f"limits.max_concurrent={max_concurrent}", "limits.max_queued=256", "limits.time_s=600"]
        if threads is not None:
            args.append(f"cpu_threads={threads}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self.log: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.log.append(line)
                if "serving on" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300):
            self.stop()
            raise SystemExit("the server did not start:\n" + "".join(self.log))
        found = re.search(r"serving on http://([\d.]+):(\d+)/", "".join(self.log))
        self.threads = int(re.search(r"(\d+) CPU thread", "".join(self.log)).group(1))
        self.host, self.port = found.group(1), int(found.group(2))

    def generate(self, body: dict) -> tuple[float, dict]:
        started = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        connection.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = json.loads(response.read())
        connection.close()
        if response.status != 200:
            raise SystemExit(f"{response.status}: {data}")
        return time.perf_counter() - started, data

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def request(form: str, new_tokens: int, seed: int) -> dict:
    return {"max_new_tokens": new_tokens, "seed": seed} if form == "free" else {"form": form, "seed": seed}


def measure(server: Server, clients: int, rounds: int, body: Callable[[int], dict]) -> tuple[float, list[float],
                                                                                              dict[int, str]]:
    """Characters generated per second over the run, the latencies, and the text of each seed."""
    latencies: list[float] = []
    poems: dict[int, str] = {}
    tokens = 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal tokens
        for r in range(rounds):
            seed = 1000 * c + r
            seconds, data = server.generate(body(seed))
            with lock:
                latencies.append(seconds)
                tokens += data["new_tokens"]
                poems[seed] = data["poems"][0]["text"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return tokens / (time.perf_counter() - started), latencies, poems


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = args.model_dir or random_small_export(Path(tmp) / "model")
        servers = {"batched": Server(model_dir, args.batch, args.threads, Path(tmp), args.device),
                   "one at a time": Server(model_dir, 1, args.threads, Path(tmp), args.device)}
        try:
            def body(seed: int) -> dict:
                return request(args.form, args.new_tokens, seed)

            for server in servers.values():  # warm-up
                for seed in range(3):
                    server.generate(body(seed))
            rows, same = [], True
            results: dict[tuple[int, str], tuple[float, list[float]]] = {}
            for i, clients in enumerate(args.clients):
                order = list(servers) if i % 2 == 0 else list(reversed(servers))
                poems = {}
                for mode in order:
                    speed, latencies, poems[mode] = measure(servers[mode], clients, args.rounds, body)
                    results[clients, mode] = speed, latencies
                same &= poems["batched"] == poems["one at a time"]
            load = os.getloadavg()
        finally:
            for server in servers.values():
                server.stop()
    print(f"lingmao.serve, {'model ' + str(args.model_dir) if args.model_dir else 'model=small, random weights'}, "
          f"form {args.form}, {args.rounds} requests per client, "
          f"device {args.device}, {servers['batched'].threads} torch thread(s) per server, "
          f"batched: limits.max_concurrent={args.batch}; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'clients':>7}  {'mode':<14}{'requests':>9}{'chars/s':>10}{'p50 s':>8}{'p95 s':>8}")
    for clients in args.clients:
        for mode in servers:
            speed, latencies = results[clients, mode]
            rows.append((clients, mode, speed, latencies))
            print(f"{clients:>7}  {mode:<14}{len(latencies):>9}{speed:>10.0f}{statistics.median(latencies):>8.3f}"
                  f"{p95(latencies):>8.3f}")
    most, fewest = max(args.clients), min(args.clients)
    ratio = results[most, "batched"][0] / results[most, "one at a time"][0]
    growth = p95(results[most, "batched"][1]) / p95(results[fewest, "batched"][1])
    print(f"throughput at {most} clients, batched / one at a time: {ratio:.2f}x (goal >= 3x)")
    print(f"p95 latency, batched, {most} clients / {fewest}: {growth:.2f}x (goal <= 2x)")
    print(f"same texts batched and one at a time: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
