"""The token cache: the frozen tokens of every image, its writer (`build_token_cache`) and its reader
(`TokenCache`, served to training by `TokenDataset`).

The tokens entering block N-k (`PromptCAM.frozen_tokens`) depend on no trainable parameter, so for a given view of
an image they are computed once (`build_token_cache`) and training runs on them (`TokenDataset`). Each view's
augmentation is drawn from (seed, image, view) (`taxotrait.data.derived_generator`).

Cache files: ``<name>.npy``, a float16 array [N images, V views, T tokens, D] memory-mapped on reading, and
``<name>.npy.json``, its description (paths, views, augmentation, seed, backbone, first prompted block, device, ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import AugmentConfig, ImageTransform, derived_generator, load_image
from .dataset import ImageError, PixelLimit
from .devices import frozen_forward, resolve_device, resolve_precision
from .io import atomic_write

if TYPE_CHECKING:
    from .model import PromptCAM

CACHE_FORMAT = "taxotrait-token-cache-1"
PREFETCH_BATCHES = 2  # batches each image-decoding worker process prepares ahead of the forward


class TokenCacheError(RuntimeError):
    """A token cache is missing, incomplete or was built for another model."""


def token_shape(model: PromptCAM) -> tuple[int, int]:
    """(T, D) of the model's frozen tokens."""
    vit = model.backbone
    return vit.patch_embed.num_patches + vit.num_prefix_tokens, vit.embed_dim


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _describe(model: PromptCAM) -> dict:
    """What a cache must share with a model to serve it."""
    return {
        "backbone": model.backbone_name,
        "backbone_digest": model.backbone_digest,
        "first_prompted_block": model.first_prompted_block,
        "img_size": int(model.backbone.patch_embed.img_size[0]),
        "normalisation": [list(model.normalisation[0]), list(model.normalisation[1])],
        "token_shape": list(token_shape(model)),
    }


class _Views(Dataset):
    """All views of one image, [V, 3, S, S]: the eval transform, or augmentations seeded by (seed, image, view)."""

    def __init__(self, paths, transform, views, seed):
        self.paths, self.transform, self.views, self.seed = paths, transform, views, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """The views [V, 3, S, S], or the image's `ImageError` (raised by `build_token_cache` as it was raised)."""
        try:
            image = load_image(self.paths[i])
        except ImageError as err:
            return err
        if not self.transform.augment.random:
            return self.transform(image)[None]
        return torch.stack([self.transform(image, derived_generator(self.seed, i, v)) for v in range(self.views)])


def _views_or_error(items: list) -> torch.Tensor | ImageError:
    """A batch [B, V, 3, S, S] of `_Views` items, or the first image error among them."""
    errors = [item for item in items if isinstance(item, ImageError)]
    return errors[0] if errors else torch.stack(items)


def build_token_cache(
    model: PromptCAM,
    paths,
    out_path: str | os.PathLike,
    views: int = 1,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int = 0,
    precision: str | None = "auto",
) -> Path:
    """Compute `model.frozen_tokens` of `views` views of every image into a float16 cache at `out_path` (.npy).

    augment None (or without crop/flip): one view, the deterministic eval transform; otherwise every view is a
    random augmentation seeded by (seed, image index, view). The images are decoded and transformed in `num_workers`
    worker processes (each PREFETCH_BATCHES batches ahead; none: in this process), the forward runs here: the same
    file whatever the number of workers. Written batch by batch to a temporary file, then renamed. The model is
    moved to `device` (default: CUDA if available, else CPU); the tokens are computed there in `precision`
    (`taxotrait.devices.resolve_precision`: 'auto' is bf16 where the device has it natively, else fp32), both
    recorded in the description. An image that cannot be read raises its `ImageError`, naming the file.
    """
    out, paths = Path(out_path), [str(p) for p in paths]
    transform = ImageTransform.for_model(model, augment)
    if not transform.augment.random and views != 1:
        raise ValueError(f"a cache without augmentation has one view, got views={views}")
    device = resolve_device(device)
    dtype = resolve_precision(precision, device)
    model.to(device).eval()
    meta = {"format": CACHE_FORMAT, "shape": [len(paths), views, *token_shape(model)], "dtype": "float16",
            "views": views, "augment": asdict(transform.augment), "seed": seed, **_describe(model), "device": str(device),
            "precision": str(dtype).removeprefix("torch."), "paths": paths}
    with atomic_write(out) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=tuple(meta["shape"]))
        loader = DataLoader(_Views(paths, transform, views, seed), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=_views_or_error, pin_memory=device.type == "cuda",
                            prefetch_factor=PREFETCH_BATCHES if num_workers else None,
                            worker_init_fn=PixelLimit() if num_workers else None)
        start = 0
        for images in tqdm(loader, desc=f"tokens {out.name}", disable=not progress):
            if isinstance(images, ImageError):
                raise images
            b = images.shape[0]
            tokens = frozen_forward(model.frozen_tokens, images.flatten(0, 1).to(device), device, dtype)
            tokens = tokens.to(torch.float16).cpu()
            if not torch.isfinite(tokens).all():
                raise TokenCacheError(f"{out}: non-finite frozen tokens (float16 overflow?) in the batch of {paths[start]}")
            array[start : start + b] = tokens.unflatten(0, (b, views)).numpy()
            start += b
        array.flush()
        del array
        _sidecar(out).unlink(missing_ok=True)  # the sidecar marks a complete cache: never next to a foreign array
    with atomic_write(_sidecar(out)) as tmp_meta:
        tmp_meta.write_text(json.dumps(meta))
    return out


class TokenCache:
    """A token cache opened read-only: `tokens` is a memory map [N, V, T, D] float16, `paths` its images."""

    def __init__(self, path: Path, tokens: np.ndarray, meta: dict):
        self.path, self.tokens, self.meta = path, tokens, meta
        self.paths, self.views = meta["paths"], meta["views"]

    @classmethod
    def open(cls, path: str | os.PathLike, model: PromptCAM | None = None) -> "TokenCache":
        """Memory-map the cache at `path`; with `model`, check that it was built for it."""
        path = Path(path)
        if not (path.is_file() and _sidecar(path).is_file()):
            raise TokenCacheError(f"token cache {path} (and its description {_sidecar(path).name}) not found")
        meta = json.loads(_sidecar(path).read_text())
        tokens = np.load(path, mmap_mode="r")
        if meta.get("format") != CACHE_FORMAT or list(tokens.shape) != meta["shape"]:
            raise TokenCacheError(f"token cache {path} is corrupt or of another format: array {tokens.shape}, "
                                  f"description {meta.get('format')} {meta.get('shape')}")
        cache = cls(path, tokens, meta)
        if model is not None:
            cache.check(model)
        return cache

    def check(self, model: PromptCAM):
        """Raise TokenCacheError, naming the file, unless the cache holds this model's frozen tokens."""
        wanted = _describe(model)
        wrong = [f"{k}: cache {self.meta[k]!r}, model {v!r}" for k, v in wanted.items() if self.meta[k] != v]
        if wrong:
            raise TokenCacheError(f"token cache {self.path} was built for another model ({'; '.join(wrong)}); "
                                  "rebuild it with build_token_cache for this model")

    def __len__(self):
        return len(self.paths)

    def index(self, paths) -> np.ndarray:
        """Row of each of `paths` in the cache (KeyError for an image it lacks)."""
        rows = {p: i for i, p in enumerate(self.paths)}
        return np.array([rows[str(p)] for p in paths], dtype=np.int64)


class TokenDataset(Dataset):
    """(frozen tokens [T, D] float32, label) of cache rows `indices` (default: all), labels aligned with them.

    `set_epoch(epoch, seed)` picks one random view per image from (seed, epoch); without an epoch, view 0. With
    `every_view`, an item holds the tokens of every view, [V, T, D] (the linear probe's features).
    """

    def __init__(self, cache: TokenCache, labels, indices=None, every_view: bool = False):
        self.cache, self.every_view = cache, every_view
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(np.array(labels, dtype=np.int64))  # a copy: labels may be read-only
        if len(self.labels) != len(self.indices):
            raise ValueError(f"{len(self.indices)} cache rows but {len(self.labels)} labels")
        self.view = None

    def set_epoch(self, epoch: int | None, seed: int = 0):
        random = epoch is not None and self.cache.views > 1
        self.view = torch.randint(self.cache.views, (len(self.cache),), generator=derived_generator(seed, epoch, 1)
                                  ).numpy() if random else None

    def __len__(self):
        return len(self.indices)

    def __getitems__(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch (tokens [B, T, D], labels [B]); DataLoader uses it with an identity collate."""
        rows = self.indices[list(items)]
        views = slice(None) if self.every_view else 0 if self.view is None else self.view[rows]
        return torch.from_numpy(self.cache.tokens[rows, views].astype(np.float32)), self.labels[list(items)]

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]
