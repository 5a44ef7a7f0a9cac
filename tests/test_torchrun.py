"""`csps serve` launched by torchrun (2 ranks, -sp 2) on the real model: rank 0 serves HTTP and
answers like a single-process engine; a rank that dies or raises fails requests at once rather
than hanging; a WORLD_SIZE that is not sp x tp is refused; no process outlives the launch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
FLAGS = ("--served-model-name", MODEL, "--max-model-len", "2048",
         "--kv-cache-memory-bytes", "256M")
# A launch target that makes rank 1's worker raise on its first step.
FAULTY_SERVE = """\
import os, sys
from csps.engine.worker import Worker
if os.environ["RANK"] == "1":
    def execute_step(self, step):
        raise KeyError("injected")
    Worker.execute_step = execute_step
from csps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class TorchrunServer:
    """`python -m torch.distributed.run --standalone --nproc-per-node N TARGET MODEL -sp 2`."""

    def __init__(self, log: Path, target: list[str], model_dir: Path, *flags: str,
                 nproc: int = 2, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc), *target, str(model_dir), "-sp", "2",
                 "--port", str(self.port), *FLAGS, *flags],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids = {self.proc.pid}
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"torchrun exited: {self.log.read_text()[-3000:]}"
            self.pids |= set(self.ranks().values())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"no healthy server in {timeout_s} s: {self.log.read_text()[-3000:]}")

    def ranks(self) -> dict[int, int]:
        """Global rank -> pid of torchrun's worker processes."""
        found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                               text=True).stdout.split()
        ranks = {}
        for pid in map(int, found):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((v[5:] for v in env if v.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[int(rank)] = pid
        return ranks

    def complete(self, max_tokens: int = 8, timeout_s: float = 120.0, **extra) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", timeout=timeout_s, json={
            "model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": max_tokens,
            **extra})

    def stop(self) -> None:
        """SIGTERM torchrun (it stops its ranks), then make sure that nothing is left."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)  # our own session: torchrun and its ranks
            self.proc.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in self.pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in self.pids if alive(pid)]
        assert left == [], f"processes left behind: {left}"


def comm_bytes(server: TorchrunServer, phase: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf'^csps:comm_bytes_total\{{[^}}]*phase="{phase}"\}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


def test_two_ranks_answer_like_one_process(real_model_dir, tmp_path):
    """sps2 with a 4-token threshold: the prompt is prefilled across both ranks."""
    server = TorchrunServer(tmp_path / "torchrun.log", ["-m", "csps.server"], real_model_dir,
                            "--scheduler", "sps2", "--long-prompt-threshold", "4")
    try:
        assert sorted(server.ranks()) == [0, 1]
        reply = server.complete()
        assert reply.status_code == 200, reply.text
        text = reply.json()["choices"][0]["text"]
        assert server.complete().json()["choices"][0]["text"] == text  # and again
        assert comm_bytes(server, "prefill_attn") > 0 and comm_bytes(server, "control") > 0
    finally:
        server.stop()
    from csps import LLM, SamplingParams

    llm = LLM(model=str(real_model_dir), max_model_len=2048, kv_cache_memory_bytes=256 << 20)
    [expected] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))
    assert text == expected.outputs[0].text


def test_killed_rank_fails_the_request_fast(real_model_dir, tmp_path):
    server = TorchrunServer(tmp_path / "torchrun.log", ["-m", "csps.server"], real_model_dir)
    try:
        outcome: dict = {}

        def long_request() -> None:
            try:
                outcome["reply"] = server.complete(max_tokens=1500, ignore_eos=True,
                                                   timeout_s=60)
            except httpx.HTTPError as exc:  # the server may be gone before it answers
                outcome["error"] = exc

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(2.0)  # the request is decoding
        os.kill(server.ranks()[1], 9)
        killed = time.monotonic()
        thread.join(30)
        assert not thread.is_alive(), "the request hung after rank 1 died"
        if "reply" in outcome:
            assert outcome["reply"].status_code >= 500, outcome["reply"].text
        server.proc.wait(timeout=30)  # torchrun's agent stops rank 0 and fails the job
        assert server.proc.returncode != 0
        assert time.monotonic() - killed < 30
    finally:
        server.stop()


def test_raising_rank_is_named_in_the_error(real_model_dir, tmp_path):
    script = tmp_path / "faulty_serve.py"
    script.write_text(FAULTY_SERVE)
    # the 5-token prompt goes SP over both ranks, so rank 1 takes part in its first step
    server = TorchrunServer(tmp_path / "torchrun.log", [str(script), "serve"], real_model_dir,
                            "--long-prompt-threshold", "4")
    try:
        reply = server.complete(timeout_s=30)
        assert reply.status_code == 500, reply.text
        message = reply.json()["error"]["message"]
        assert "worker rank 1 raised KeyError: 'injected'" in message
        server.proc.wait(timeout=30)
        assert server.proc.returncode != 0
    finally:
        server.stop()
    assert "KeyError: 'injected'" in server.log.read_text()  # rank 1's traceback


def test_world_size_must_match_sp_times_tp(real_model_dir, tmp_path):
    server = TorchrunServer(tmp_path / "torchrun.log", ["-m", "csps.server"], real_model_dir,
                            nproc=3, wait=False)
    try:
        server.proc.wait(timeout=120)
        assert server.proc.returncode != 0
    finally:
        server.stop()
    assert "torchrun started 3 ranks (WORLD_SIZE) but -sp 2 x -tp 1 needs 2" in \
        server.log.read_text()
