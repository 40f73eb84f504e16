"""Training on CPU with a progress bar, and checkpoints that record what they hold."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

import crossbar

from .datasets import Dataset
from .models import build_model

DEFAULT_EPOCHS = {"digits": 40, "mnist": 3, "cifar10": 15, "cifar100": 15}


def train(model: nn.Module, data: Dataset, epochs: int, seed: int = 0, lr: float = 2e-3,
          batch_size: int = 64, progress: bool = True) -> list:
    """Adam with a cosine learning-rate schedule; returns the mean loss of each epoch."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs = {epochs!r} is invalid: expected an integer >= 1")
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(data.train_x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    bar = tqdm(total=steps, desc=f"training on {data.name}", unit="step", disable=not progress, leave=False)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(data.train_x), generator=order_rng)
        total, count = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # batch norm cannot train on a single sample
                continue
            loss = loss_fn(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        losses.append(total / max(count, 1))
    bar.close()
    model.eval()
    return losses


def accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy, a fraction in [0, 1], over (x, y) batches."""
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    if total == 0:
        raise ValueError("accuracy: the batches held no samples")
    return correct / total


def save_checkpoint(path, model: nn.Module, model_name: str, batchnorm: bool, data: Dataset,
                    epochs: int, seed: int, test_accuracy: float) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model_name, "batchnorm": batchnorm, "dataset": data.name,
                "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                "epochs": epochs, "seed": seed, "test_accuracy": test_accuracy,
                "xbarsim_version": crossbar.__version__, "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint


def load_checkpoint(path, data: Optional[Dataset] = None, model_name: Optional[str] = None,
                    batchnorm: Optional[bool] = None) -> tuple:
    """(model, metadata). Given data/model/batchnorm, a checkpoint of something else is refused."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu")
        meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        expected = {"dataset": data.name if data else None, "model": model_name, "batchnorm": batchnorm}
        for key, want in expected.items():
            if want is not None and meta[key] != want:
                raise ValueError(f"checkpoint {path} holds {key} {meta[key]!r}, but {want!r} was asked for")
        model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"], meta["batchnorm"])
        model.load_state_dict(ckpt["state_dict"])
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"checkpoint {path}: not a readable xbarsim checkpoint: {type(err).__name__}: {err}") from None
    return model.eval(), meta


def train_or_load(data: Dataset, model_name: str, batchnorm: bool, cache_dir: Path, epochs: Optional[int] = None,
                  seed: int = 0, progress: bool = True) -> tuple:
    """The cached checkpoint for (data, model, batchnorm, epochs, seed), trained if missing."""
    epochs = epochs if epochs is not None else DEFAULT_EPOCHS[data.name]
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs = {epochs!r} is invalid: expected an integer >= 1")
    path = Path(cache_dir) / "checkpoints" / f"{data.name}-{model_name}-{'bn' if batchnorm else 'nobn'}-e{epochs}-s{seed}.pt"
    if path.is_file():
        return load_checkpoint(path, data, model_name, batchnorm) + (path,)
    model = build_model(model_name, data.input_shape, data.num_classes, batchnorm)
    train(model, data, epochs, seed=seed, progress=progress)
    acc = accuracy(model, data.batches("test"))
    save_checkpoint(path, model, model_name, batchnorm, data, epochs, seed, acc)
    return load_checkpoint(path) + (path,)
