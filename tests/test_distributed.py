"""Training in several processes (DistributedDataParallel, gloo on CPU) follows the loss curve and
ends at the weights of one process training on the same global batches; only rank 0 writes."""

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from anomaly_models import load_model
from anomaly_models.cli import main
from anomaly_models.config import TrainConfig
from anomaly_models.data import MVTecAD
from anomaly_models.distributed import process_group, world_size
from anomaly_models.runs import training_loader
from anomaly_models.training import EpochCheckpoint, run_epochs, seeded
from anomaly_models.transforms import Preprocessing

PROCESSES = 2
TRAIN = TrainConfig(epochs=3, batch_size=2, lr=0.05, seed=0, device="cpu")
PREPROCESSING = Preprocessing(image_size=32)
VAL_FRACTION = 0.34  # 6 tiny_mvtec training images: 4 train (2 global batches per epoch), 2 val
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(root: Path, loader_for, checkpoint_path: Path) -> tuple[list[dict], dict]:
    """Train a tiny BatchNorm-free autoencoder (BatchNorm statistics are per process on CPU);
    return the history and the final weights."""
    train_set = MVTecAD(root, "widget", "train", PREPROCESSING, val_fraction=VAL_FRACTION)
    val_set = MVTecAD(root, "widget", "val", PREPROCESSING, val_fraction=VAL_FRACTION)
    with seeded(TRAIN.seed):
        network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 3, 3, padding=1))
    optimizer = torch.optim.Adam(network.parameters(), lr=TRAIN.lr)

    def step(images):
        reconstruction = network(images)
        return nn.functional.mse_loss(reconstruction, images), {"output_mean": reconstruction.mean().item()}

    checkpoint = EpochCheckpoint(checkpoint_path, "fingerprint")
    history = run_epochs(network, optimizer, step, loader_for(train_set), DataLoader(val_set, batch_size=2),
                         TRAIN.epochs, torch.device("cpu"), checkpoint=checkpoint)
    return history, network.state_dict()


def _worker(rank: int, port: int, root: Path, out: Path) -> None:
    """One process as torchrun would start it: its rank in the environment, gloo on 127.0.0.1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(PROCESSES))
    torch.set_num_threads(1)
    with process_group(torch.device("cpu")):
        assert world_size() == PROCESSES
        history, state = _fit(root, lambda data: training_loader(data, TRAIN), out / f"rank{rank}.partial")
    torch.save({"history": history, "state": state}, out / f"rank{rank}.pt")


def test_two_processes_match_one_process_on_the_same_global_batches(tiny_mvtec, tmp_path):
    mp.spawn(_worker, args=(_free_port(), tiny_mvtec, tmp_path), nprocs=PROCESSES, join=True)

    def one_process_loader(data):  # the global batches the two processes split between them
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=TRAIN.seed)
        return DataLoader(data, batch_size=TRAIN.batch_size, sampler=sampler, drop_last=True)

    history, state = _fit(tiny_mvtec, one_process_loader, tmp_path / "single.partial")
    assert len(history) == TRAIN.epochs
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    keys = ("train_loss", "train_output_mean", "val_loss")
    for rank in range(PROCESSES):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for got, expected in zip(result["history"], history, strict=True):
            torch.testing.assert_close([got[k] for k in keys], [expected[k] for k in keys], rtol=1e-5, atol=1e-7)
        for name, value in state.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6)

    # Only rank 0 writes the per-epoch checkpoint.
    assert torch.load(tmp_path / "rank0.partial", weights_only=True)["epoch"] == TRAIN.epochs
    assert not (tmp_path / "rank1.partial").exists()


def test_cli_trains_on_two_cpu_processes_under_torchrun(tiny_mvtec, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main([
        "train", "--params", str(PARAMS), "--profile", "test", "--data-root", str(tiny_mvtec),
        "--category", "widget", "--image-size", "32", "--epochs", "1", "--batch-size", "2",
        "--devices", str(PROCESSES), "--out", str(out),
    ]) == 0
    model = load_model(out)
    assert model.train_config.devices == PROCESSES and len(model.history) == 1
    assert model.threshold is not None  # rank 0 calibrated and saved after training
    assert not Path(f"{out}.partial").exists()
    assert "saved" in capsys.readouterr().out


def test_batch_that_does_not_split_over_the_devices_is_refused_before_starting(tiny_mvtec, tmp_path, capsys):
    code = main(["train", "--params", str(PARAMS), "--profile", "test", "--data-root", str(tiny_mvtec),
                 "--category", "widget", "--batch-size", "3", "--devices", "2", "--out", str(tmp_path / "m.pt")])
    assert code == 2
    assert "train.batch_size: 3 is not divisible by the 2 training processes" in capsys.readouterr().err
    assert main(["train", "--params", str(PARAMS), "--devices", "0", "--out", str(tmp_path / "m.pt")]) == 2
    assert "train.devices: must be at least 1, got 0" in capsys.readouterr().err
