"""Training of the prompts and the score head: one loop, resumable, bit-for-bit reproducible from a seed.

Every source of randomness of an epoch (shuffling, view choice, augmentation, torch's global RNG) is derived from
(seed, epoch), so a run resumed from its per-epoch checkpoint ends with exactly the parameters of an uninterrupted
one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import atomic_save, checkpoint_payload, read_checkpoint
from .data import ImageDataset, derived_generator, derived_seed
from .devices import accelerated, mixed_precision, model_device, resolve_device
from .distributed import DataParallel
from .model import PromptCAM
from .token_cache import TokenDataset

log = logging.getLogger(__name__)
HISTORY_COLUMNS = ["epoch", "lr", "loss", "train_top1", "val_top1", "seconds"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. SGD uses momentum 0.9; weight_decay applies to either optimizer (1e-3: the authors')."""

    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "sgd"  # 'sgd' | 'adamw'
    lr: float = 0.01
    weight_decay: float = 1e-3
    schedule: str = "cosine"  # 'cosine' | 'onecycle' (linear decay), both to 0 after a linear warmup
    warmup_epochs: float = 1.0
    seed: int = 0
    class_chunk: int | None = None  # classes per forward chunk; None = all at once
    prompt_init: str = "uniform"  # 'uniform': the model's init | 'cls_mean': mean CLS token entering the last block
    init_noise: float = 0.02  # cls_mean: noise std, relative to the std of the CLS tokens' entries
    label_smoothing: float = 0.0
    keys_values_gb: float = 1.0  # CPU, prompt depth 1: keep the frozen last-block keys/values of up to this many GB
    device: str = "auto"  # 'auto': CUDA if available (with bf16 autocast), else CPU
    num_workers: int = 0  # DataLoader workers (image decoding)


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or infinite."""


def learning_rate(config: TrainConfig, steps_per_epoch: int, step: int) -> float:
    """lr of optimisation step `step` (0-based): linear warmup, then cosine or linear ('onecycle') decay to 0."""
    total, warmup = config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * (0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device):
    """`config.optimizer` over `params`, in torch's fused form on CPU and CUDA: at C = 10,000 its step over every
    class prompt then takes a few ms instead of the ~50 ms of the per-tensor loop, most of a sibling-cost step."""
    fused = device.type in ("cpu", "cuda") or None
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def contrast_loss(scores: torch.Tensor, labels: torch.Tensor, rivals: torch.Tensor,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each image over its rivals only, and which images count.

    scores [B, C], labels [B], rivals bool [B, C] (`PromptCAM.rivals`: the true class's siblings under contrast
    'siblings', every class under 'rank'). Returns the per-image losses [B] and counted [B]: an image whose class has
    no rival (a monotypic taxon: nothing to tell it from) adds no loss. With every class a rival this is
    `F.cross_entropy` (label smoothing spread over the rivals)."""
    log_p = scores.masked_fill(~rivals, float("-inf")).log_softmax(1)
    nll = -log_p.gather(1, labels[:, None]).squeeze(1)
    smooth = -log_p.masked_fill(~rivals, 0.0).sum(1) / rivals.sum(1)
    return (1 - label_smoothing) * nll + label_smoothing * smooth, rivals.sum(1) > 1


def rival_loss(model: PromptCAM, forward, x: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
               chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image losses [B], counted [B] and correct [B] (the best rival is the label) of `x` with `labels` [B],
    scoring each image against its rivals only (`PromptCAM.rival_columns`): under contrast 'siblings' the last
    block runs for B x (largest family) prompts instead of B x C.

    forward: the model's scoring of what `x` is (images, frozen tokens or keys/values; `_forward`). The same as
    `contrast_loss` of all C scores with `model.rivals(labels)` and `model.sibling_prediction`, gradients included.
    """
    columns, rivals = model.rival_columns(labels)
    with mixed_precision(x.device):
        scores = forward(x, classes=columns, chunk_size=chunk_size)
    scores, (columns, position) = scores.float(), model.own_columns(columns, labels)
    losses, counted = contrast_loss(scores, position, rivals, label_smoothing)
    return losses, counted, model.best_rival(scores, columns, rivals) == labels


def top_k_hits(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """bool [N]: whether each row's label is among its k highest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels.to(top.device)[:, None]).any(1)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits (float64: the count over the rows)."""
    return top_k_hits(logits, labels, k).double().mean().item()


def _batches(data, order: torch.Tensor, batch_size: int, device: torch.device, num_workers: int = 0, shard=None):
    """(x, y) batches of `data` in `order`, on `device`; with `shard` (`DataParallel.shard`), this process's share of
    each batch (an empty share gives an empty batch)."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    shares = [shard(batch) for batch in batches] if shard else batches
    sampler = [(share if len(share) else batch[:1]).tolist() for share, batch in zip(shares, batches)]
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=_batched, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for (x, y), share in zip(loader, shares):
        if not len(share):
            x, y = x[:0], y[:0]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _batched(batch):  # the datasets' __getitems__ return whole batches
    return batch


class KeyValueDataset(Dataset):
    """The last-block keys and values of every (image, view) of a TokenDataset, computed once (prompt depth 1).

    With prompt depth 1 they depend on no trainable parameter; keeping them (float16, in memory) spares every epoch
    the frozen projection of all image tokens, the bulk of a CPU training step. Views follow `data.set_epoch`.
    """

    def __init__(self, data: TokenDataset, model: PromptCAM, batch_size: int, progress: bool = False):
        self.data, self.labels = data, data.labels
        views, device = data.cache.views, model_device(model)
        self.keys_values = None  # [N, V, 2, H, T, d], filled in place: no second copy at any time
        with torch.no_grad():
            for start in tqdm(range(0, len(data), batch_size), desc="keys/values", disable=not progress):
                rows = data.indices[start : start + batch_size]
                tokens = torch.from_numpy(data.cache.tokens[rows].astype("float32")).to(device)  # [b, V, T, D]
                chunk = model.image_keys_values(tokens.flatten(0, 1)).unflatten(0, (len(rows), views)).half().cpu()
                if self.keys_values is None:
                    self.keys_values = chunk.new_empty((len(data), *chunk.shape[1:]))
                self.keys_values[start : start + len(rows)] = chunk

    @staticmethod
    def size_gb(data: TokenDataset) -> float:
        """Memory the keys and values of `data` take, in GB."""
        tokens, dim = data.cache.tokens.shape[2:]
        return len(data) * data.cache.views * 2 * tokens * dim * 2 / 1e9

    def set_epoch(self, epoch: int | None, seed: int = 0):
        self.data.set_epoch(epoch, seed)

    def __len__(self):
        return len(self.data)

    def __getitems__(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        items = list(items)
        views = 0 if self.data.view is None else torch.from_numpy(self.data.view[self.data.indices[items]])
        return self.keys_values[items, views].float(), self.labels[items]


def _forward(model: PromptCAM, data):
    """Scores from what `data` yields: keys/values, frozen tokens (TokenDataset) or images."""
    if isinstance(data, KeyValueDataset):
        return model.forward_keys_values
    return model.forward_tokens if isinstance(data, TokenDataset) else model


def _with_keys_values(model: PromptCAM, train_data, val_data, config: TrainConfig, device: torch.device,
                      progress: bool):
    """(train_data, val_data), each as a KeyValueDataset where that is exact (CPU, prompt depth 1, cached tokens) and
    fits `config.keys_values_gb`, the training set first: the validation of every epoch then runs on its keys and
    values too."""
    if not (not accelerated(device) and model.prompt_config.prompt_depth == 1):
        return train_data, val_data
    budget, kept = config.keys_values_gb, []
    for data in (train_data, val_data):
        if isinstance(data, TokenDataset) and KeyValueDataset.size_gb(data) <= budget:
            budget -= KeyValueDataset.size_gb(data)
            data = KeyValueDataset(data, model, config.batch_size, progress)
        kept.append(data)
    return tuple(kept)


def ordered_batches(data, batch_size: int, device: torch.device, num_workers: int = 0):
    """(x, labels) batches of view 0 / the eval transform of every item of `data`, in order, on `device`."""
    data.set_epoch(None)
    return _batches(data, torch.arange(len(data)), batch_size, device, num_workers)


def scorer(model: PromptCAM, data, classes: torch.Tensor | None = None, chunk_size: int | None = None):
    """The scoring by `model` (put in eval mode) of a batch of what `data` yields (`ordered_batches`: images, frozen
    tokens or keys/values): x -> float32 logits [B, C] (or [B, K] for `classes`) on x's device, without gradients,
    under the device's mixed precision."""
    model.eval()
    forward = _forward(model, data)
    classes = None if classes is None else classes.to(model_device(model))

    @torch.no_grad()
    def score(x: torch.Tensor) -> torch.Tensor:
        with mixed_precision(x.device):
            return forward(x, classes=classes, chunk_size=chunk_size).float()

    return score


def predict(model: PromptCAM, data, batch_size: int = 256, classes: torch.Tensor | None = None,
            chunk_size: int | None = None, num_workers: int = 0) -> torch.Tensor:
    """Logits [N, C] (or [N, K] for `classes`) on CPU, float32, of view 0 / the eval transform of every item."""
    score = scorer(model, data, classes, chunk_size)
    out = [score(x).cpu() for x, _ in ordered_batches(data, batch_size, model_device(model), num_workers)]
    return torch.cat(out) if out else torch.empty(0, model.num_classes if classes is None else classes.shape[-1])


@torch.no_grad()
def sibling_top1(model: PromptCAM, data, batch_size: int = 256, chunk_size: int | None = None,
                 num_workers: int = 0) -> float:
    """Top-1 accuracy among the true parent's children (every class under contrast 'rank') of view 0 / the eval
    transform of every item of `data`, each image scored against its rivals only (`rival_loss`); NaN when empty."""
    model.eval()
    forward, correct = _forward(model, data), 0
    for x, y in ordered_batches(data, batch_size, model_device(model), num_workers):
        correct += int(rival_loss(model, forward, x, y, chunk_size=chunk_size)[2].sum())
    return correct / len(data) if len(data) else float("nan")


@torch.no_grad()
def init_class_prompts(model: PromptCAM, data, noise: float, seed: int, batch_size: int = 256):
    """Set every class prompt to the mean CLS token entering the last block over `data` (view 0) plus Gaussian
    noise of std `noise` times the std of the CLS tokens' entries."""
    if not model.backbone.has_class_token:
        raise ValueError("prompt_init 'cls_mean' needs a backbone with a CLS token; use 'uniform'")
    device = model_device(model)
    total = squares = 0.0
    for x, _ in ordered_batches(data, batch_size, device):
        tokens = x if isinstance(data, TokenDataset) else model.frozen_tokens(x)
        cls = model.last_block_input(tokens)[:, 0].double()
        total, squares = total + cls.sum(0), squares + cls.square().sum()
    mean = total / len(data)
    std = (squares / (len(data) * mean.numel()) - mean.mean().square()).clamp_min(0).sqrt()
    eps = torch.randn(model.class_prompts.shape, generator=derived_generator(seed, 0, 3), dtype=torch.float64)
    model.class_prompts.copy_(mean + noise * std * eps.to(device))


def _check_data(model: PromptCAM, data, name: str):
    if not isinstance(data, (TokenDataset, ImageDataset)):
        raise TypeError(f"{name} must be a TokenDataset or an ImageDataset, got {type(data).__name__}")
    if isinstance(data, TokenDataset):
        data.cache.check(model)
    if len(data.labels) and not 0 <= int(data.labels.min()) <= int(data.labels.max()) < model.num_classes:
        raise ValueError(f"{name} labels must lie in 0..{model.num_classes - 1}")


def _frame(history: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    return frame.astype({"epoch": "int64", **{c: "float64" for c in HISTORY_COLUMNS[1:]}})


def _resume(path, model: PromptCAM, training_key: dict, optimizer) -> tuple[int, list[dict]]:
    """Restore an interrupted run's state from `path` if it trained the same model, data size and config."""
    if path is None or not Path(path).exists():
        return 0, []
    payload = read_checkpoint(path)
    stored = payload.get("training")
    same_model = payload["config"] == model.config() and payload["backbone_digest"] == model.backbone_digest
    if not (stored is not None and same_model and {k: stored.get(k) for k in training_key} == training_key):
        log.warning("%s holds another model's or configuration's training; starting afresh and overwriting it", path)
        return 0, []
    model.load_state_dict(payload["state_dict"], strict=False)
    optimizer.load_state_dict(stored["optimizer"])
    log.info("resuming %s after epoch %d", path, stored["epoch"])
    return stored["epoch"], stored["history"]


def train(model: PromptCAM, train_data, val_data=None, config: TrainConfig = TrainConfig(),
          checkpoint_path: str | os.PathLike | None = None, progress: bool = True,
          metadata: dict | None = None) -> pd.DataFrame:
    """Train the trainable parameters of `model` in place; returns the per-epoch history.

    train_data / val_data: TokenDataset (cached tokens) or ImageDataset. With `checkpoint_path`, each epoch saves a
    resumable checkpoint (`metadata` goes into it) and an interrupted run with the same config resumes from it.
    Inside a torch.distributed group (`taxotrait.distributed`), training is data-parallel: each process takes its
    share of every batch, the gradients are summed, and the main process logs and saves the checkpoint.
    """
    if config.optimizer not in ("sgd", "adamw") or config.schedule not in ("cosine", "onecycle") \
            or config.prompt_init not in ("uniform", "cls_mean"):
        raise ValueError(f"unknown optimizer, schedule or prompt_init in {config}")
    if not model.has_rival.any():
        raise ValueError(f"nothing to contrast: every class is alone among its rivals (contrast '{model.contrast}')")
    device = resolve_device(config.device, "train.device")
    model.to(device)
    parallel = DataParallel()
    for data, name in ((train_data, "train_data"), (val_data, "val_data")):
        if data is not None:
            _check_data(model, data, name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, device)
    n, steps = len(train_data), math.ceil(len(train_data) / config.batch_size)
    if n == 0:
        raise ValueError("train_data is empty")
    key = {"config": asdict(config), "num_examples": n}
    start, history = _resume(checkpoint_path, model, key, optimizer)
    if start == 0 and config.prompt_init == "cls_mean":
        init_class_prompts(model, train_data, config.init_noise, config.seed, config.batch_size)
    parallel.broadcast(params)
    train_data, val_data = _with_keys_values(model, train_data, val_data, config, device, progress)
    forward = _forward(model, train_data)
    with tqdm(total=config.epochs * steps, initial=start * steps, desc="train",
              disable=not (progress and parallel.is_main)) as bar:
        for epoch in range(start + 1, config.epochs + 1):
            t0 = time.perf_counter()
            torch.manual_seed(derived_seed(config.seed, epoch, 3))
            train_data.set_epoch(epoch, config.seed)
            order = torch.randperm(n, generator=derived_generator(config.seed, epoch, 0))
            model.train()
            loss_sum = correct = seen = 0.0
            for i, (x, y) in enumerate(_batches(train_data, order, config.batch_size, device, config.num_workers,
                                                parallel.shard)):
                lr = learning_rate(config, steps, (epoch - 1) * steps + i)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses, counted, hits = rival_loss(model, forward, x, y, config.label_smoothing, config.class_chunk)
                loss, value, count, right = parallel.loss(losses, counted, hits)
                if not math.isfinite(value):
                    _diverged(f"the loss is {value} at epoch {epoch} (step {i + 1}, lr {lr:g})", history,
                              checkpoint_path)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                parallel.sum_gradients(params)
                optimizer.step()
                loss_sum += value * count
                correct += right
                seen += count
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
            if not all(torch.isfinite(p).all() for p in params):
                _diverged(f"the parameters became non-finite at epoch {epoch} (lr {lr:g})", history, checkpoint_path)
            val_top1 = float("nan")
            if val_data is not None:
                val_top1 = sibling_top1(model, val_data, config.batch_size, config.class_chunk, config.num_workers)
            history.append({"epoch": epoch, "lr": lr, "loss": loss_sum / seen, "train_top1": correct / seen,
                            "val_top1": val_top1, "seconds": time.perf_counter() - t0})
            log.info("epoch %d/%d: loss %.4f, train top-1 %.3f, val top-1 %.3f, lr %.3g, %.1f s", epoch, config.epochs,
                     history[-1]["loss"], history[-1]["train_top1"], val_top1, lr, history[-1]["seconds"])
            if checkpoint_path is not None and parallel.is_main:
                training = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": {"step": epoch * steps},
                            "history": history, **key}
                atomic_save({**checkpoint_payload(model, **(metadata or {})), "training": training}, checkpoint_path)
    model.eval()
    return _frame(history)


def _diverged(what: str, history: list[dict], checkpoint_path):
    last = (f"last good epoch {history[-1]['epoch']} (lr {history[-1]['lr']:g})" if history
            else "no epoch completed")
    kept = f", kept in {checkpoint_path}" if checkpoint_path is not None and history else ""
    raise TrainingDiverged(f"training diverged: {what}; {last}{kept}. Lower the learning rate or check the data.")
