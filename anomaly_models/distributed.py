"""Training one model on several devices: one process per device under torchrun, gradients
averaged by DistributedDataParallel (DDP).

`train.devices: N` (or `anomaly train --devices N`) re-runs the training under
`python -m torch.distributed.run` with N processes. Each process trains on 1/N of every global
batch (a DistributedSampler), DDP averages the gradients, losses are summed over the processes,
and only rank 0 writes files and logs. Backend: nccl on CUDA, gloo on CPU. Outside a process
group every helper here is a no-op, so single-process training is unchanged.

BatchNorm layers become SyncBatchNorm on CUDA, so batch statistics cover the global batch; torch
has SyncBatchNorm for GPUs only, so on CPU each process normalises with its own part of the batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from anomaly_models.errors import AnomalyError, ConfigError


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or anything setting its variables) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0, the one process that writes checkpoints and logs (True when not distributed)."""
    return rank() == 0


@contextmanager
def process_group(device: torch.device):
    """Inside torchrun: join its process group for the block (nccl on CUDA, gloo on CPU, each
    process on the GPU of its LOCAL_RANK). Elsewhere, or when a group exists already: nothing."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def per_process_batch(batch_size: int, processes: int) -> int:
    """Each process's share of the global `train.batch_size`."""
    if batch_size % processes:
        raise ConfigError(
            f"train.batch_size: {batch_size} is not divisible by the {processes} training processes "
            "(train.devices); each process takes an equal share of the batch"
        )
    return batch_size // processes


def sum_over_processes(values: Sequence[float]) -> list[float]:
    """Element-wise sum of `values` over all processes (float64, so sums match one process's)."""
    if world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class _StepModule(nn.Module):
    """A training step as a forward pass. DDP averages gradients only for backward passes that
    start from its own forward, while the methods' steps call their networks directly; wrapping
    the step (with the network registered, so DDP sees its parameters) needs no change to them."""

    def __init__(self, network: nn.Module, step: Callable[[Any], Any]):
        super().__init__()
        self.network = network
        self.step = step

    def forward(self, inputs: Any):
        return self.step(inputs)


def data_parallel(network: nn.Module, step: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`step`, run through DDP when several processes train; `step` itself otherwise.

    On CUDA the network's BatchNorm layers are swapped in place for SyncBatchNorm (sharing the
    parameters and buffers, so the optimiser is unaffected; outside training they act as BatchNorm).
    """
    if world_size() == 1:
        return step
    device = next(network.parameters()).device
    if device.type != "cuda":
        return DistributedDataParallel(_StepModule(network, step))
    nn.SyncBatchNorm.convert_sync_batchnorm(network)
    return DistributedDataParallel(_StepModule(network, step), device_ids=[device.index])


def launch(argv: Sequence[str], devices: int, env: dict[str, str] | None = None) -> None:
    """Run `anomaly <argv>` under torchrun with `devices` processes on this machine; wait for it.

    The processes' progress and errors go to stderr; their stdout is dropped, since the caller
    reports the result (rank 0 would print the same summary once more)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
        "-m", "anomaly_models.cli", *argv,
    ]
    code = subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode
    if code != 0:
        raise AnomalyError(f"training with {devices} processes failed (torchrun exit code {code}); "
                           "the first failing process's error is printed above")
