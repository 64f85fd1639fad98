"""Data-parallel training on several GPUs (or CPU processes): a torch.distributed group, one process per device.

Each process takes its share of every global batch (`DataParallel.shard`); after the backward pass the gradients of
the trainable parameters (class prompts and the score head: a few MB even for 10,000 classes) are summed across the
processes in one all-reduce, weighted so that the sum is the gradient of the global batch's mean loss. Every process
then takes the same optimiser step from the same parameters, which is one process's step on the whole batch, up to
floating-point summation order. Outside a process group (one process) every method is the identity, so
`taxotrait.train.train` has a single code path.

`launch` starts the processes (`python -m taxotrait.distributed`, as torchrun would: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), NCCL on CUDA with device `cuda:<local rank>`, gloo on CPU.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """Stop a child process: SIGTERM, then SIGKILL when it has not exited after `grace_s` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class DataParallel:
    """The current process's place in a torch.distributed group (world 1, rank 0 outside one)."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        """The process that logs, validates and writes checkpoints."""
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch of indices: contiguous, sizes differing by at most one (possibly
        empty when the batch has fewer items than processes)."""
        return batch.tensor_split(self.world)[self.rank] if self.active else batch

    def loss(self, losses: torch.Tensor, counted: torch.Tensor, correct: torch.Tensor):
        """(loss to back-propagate, global batch's mean loss, images counted in it, correct predictions among them).

        losses [b]: this process's per-image losses; counted [b] bool: the images that count (a monotypic taxon's
        add no loss, `taxotrait.train.contrast_loss`); correct [b] bool. One process: the mean over the counted
        images. Several: this process's summed loss over the global count, so that the gradients summed by
        `sum_gradients` are those of the global mean; the statistics are summed across processes (every process
        sees the same values, and stops together on a non-finite loss).
        """
        total = losses[counted].sum()
        count, right = counted.sum(), (correct & counted).sum()
        if not self.active:
            n = int(count)
            return total / max(n, 1), total.item() / max(n, 1), n, int(right)
        stats = torch.stack([total.detach().double(), count.double(), right.double()])
        dist.all_reduce(stats)
        value, n, right = stats.tolist()
        return total / max(n, 1.0), value / max(n, 1.0), int(n), int(right)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` across processes (one all-reduce of their concatenation)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).clone()

    @torch.no_grad()
    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Make every process start from the main process's values of `params`."""
        if self.active:
            for p in params:
                dist.broadcast(p.data, 0)


# ------------------------------------------------------------------------------------------------------ launching
def launch(function: str, processes: int, kwargs: dict, cuda: bool | None = None, log_file: str | None = None,
           timeout_s: float | None = None) -> None:
    """Run `function` ("package.module:name") with keyword arguments `kwargs` (JSON-serialisable) in `processes`
    fresh Python processes forming a torch.distributed group; return when all have finished, raise naming the
    failed ranks otherwise (the others are then stopped).

    cuda (default: whether CUDA is available): NCCL with one GPU per process, else gloo on CPU. The main process
    (rank 0) logs to `log_file` (appending) and to stderr, the others their warnings to stderr.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and torch.cuda.device_count() < processes:
        raise ValueError(f"{processes} processes need {processes} GPUs, {torch.cuda.device_count()} are visible")
    with tempfile.TemporaryDirectory(prefix="taxotrait-ddp-") as folder:
        job = Path(folder) / "job.json"
        job.write_text(json.dumps({"function": function, "kwargs": kwargs, "backend": "nccl" if cuda else "gloo",
                                   "log_file": log_file}))
        port = free_port()
        children = []
        for rank in range(processes):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            children.append(subprocess.Popen([sys.executable, "-m", "taxotrait.distributed", str(job)], env=env))
        log.info("data-parallel training: %d processes (%s), pids %s", processes, "NCCL" if cuda else "gloo",
                 [c.pid for c in children])
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            codes = [c.poll() for c in children]
            if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes) \
                    or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(0.2)
        for c in children:  # a failed rank leaves the others waiting in a collective: stop them
            stop_process(c, grace_s=30)
        failed = {rank: c.returncode for rank, c in enumerate(children) if c.returncode != 0}
        if failed:
            raise RuntimeError(f"data-parallel {function}: process(es) failed (rank: exit code) {failed}")


def _main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and job["log_file"]:
        handlers.append(logging.FileHandler(job["log_file"], mode="a"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s")
    if job["backend"] == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(job["backend"], init_method="env://")
    try:
        module, name = job["function"].split(":")
        getattr(importlib.import_module(module), name)(**job["kwargs"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1])
