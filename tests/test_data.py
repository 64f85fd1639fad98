"""Transforms, datasets and the frozen-token cache."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import make_vit
from taxotrait.data import AugmentConfig, ImageDataset, ImageTransform, derived_generator, load_image
from taxotrait.model import PromptCAM, PromptConfig
from taxotrait.token_cache import TokenCache, TokenCacheError, TokenDataset, build_token_cache

CLASSES = ["red", "green", "blue"]
AUGMENT = AugmentConfig(resize=36)
EVAL = AugmentConfig(resize=36, crop=False, hflip=False)


def write_images(folder, per_class=8, seed=0):
    """40x48 PNGs: the class's colour channel dominates, with stripes and noise; returns (paths, labels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :40]
    paths, labels = [], []
    for c in range(len(CLASSES)):
        for j in range(per_class):
            colour = rng.uniform(0.0, 0.4, 3)
            colour[c] = 0.9
            stripes = ((yy + rng.integers(4)) // 4) % 2 if j % 2 else ((xx + rng.integers(4)) // 4) % 2
            pixels = (0.5 + 0.5 * stripes[..., None]) * colour + 0.15 * rng.standard_normal((48, 40, 3))
            path = folder / f"{c}_{j}.png"
            Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)
            paths.append(path)
            labels.append(c)
    return paths, labels


def make_model(depth=2, vit_seed=0):
    """PromptCAM on a tiny ViT whose blocks have the weight scale of a trained one (timm's 0.02 init would leave
    the class prompts almost blind to the image)."""
    vit = make_vit(seed=vit_seed)
    g = torch.Generator().manual_seed(vit_seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    torch.manual_seed(1)
    return PromptCAM(vit, CLASSES, PromptConfig("scalable", depth, 2))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


def test_eval_transform_is_torchvision_resize_center_crop_normalise(images):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    reference = T.Compose([T.Resize(36, T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(mean, std)])
    ours = ImageTransform(32, (mean, std), EVAL)
    for path in images[0][:3]:
        expected = reference(load_image(path))
        assert expected.shape == (3, 32, 32)
        torch.testing.assert_close(ours(load_image(path)), expected, atol=1e-6, rtol=0)
        # A random transform called without a generator is the eval transform.
        without_generator = ImageTransform(32, (mean, std), AUGMENT)(load_image(path))
        torch.testing.assert_close(without_generator, expected, atol=1e-6, rtol=0)


def test_random_transform_is_seeded_and_covers_crops_and_flips(images):
    image = load_image(images[0][0])
    eval_x = ImageTransform(32, ((0,) * 3, (1,) * 3), EVAL)(image)
    flip_only = ImageTransform(32, ((0,) * 3, (1,) * 3), AugmentConfig(36, crop=False, hflip=True))
    outs = [flip_only(image, derived_generator(0, i)) for i in range(12)]
    flipped = [torch.equal(x, eval_x.flip(-1)) for x in outs]
    assert all(f or torch.equal(x, eval_x) for f, x in zip(flipped, outs)) and 0 < sum(flipped) < 12
    full = ImageTransform(32, ((0,) * 3, (1,) * 3), AUGMENT)
    assert torch.equal(full(image, derived_generator(5, 1)), full(image, derived_generator(5, 1)))
    assert len({full(image, derived_generator(5, i)).sum().item() for i in range(8)}) > 4
    with pytest.raises(ValueError, match="resize"):
        ImageTransform(32, ((0,) * 3, (1,) * 3), AugmentConfig(resize=30))


def test_load_image_follows_exif_orientation(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :5] = 255  # left band white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=100)
    Image.fromarray(pixels).convert("L").save(tmp_path / "g.png")
    upright = np.asarray(load_image(tmp_path / "r.jpg"))
    assert upright.shape == (20, 10, 3)
    assert upright[:5].mean() > 200 and upright[-5:].mean() < 50  # the white band is now on top
    assert load_image(tmp_path / "g.png").mode == "RGB"


def test_eval_cache_holds_the_frozen_tokens(images, tmp_path):
    paths, _ = images
    model = make_model()
    out = build_token_cache(model, paths, tmp_path / "eval.npy", augment=EVAL, progress=False, batch_size=5,
                            precision="fp32")
    cache = TokenCache.open(out, model)
    assert cache.tokens.dtype == np.float16 and cache.tokens.shape == (24, 1, 17, 32)
    assert cache.paths == [str(p) for p in paths] and cache.meta["first_prompted_block"] == 1
    assert cache.meta["precision"] == "float32"
    x = torch.stack([ImageTransform.for_model(model, EVAL)(load_image(p)) for p in paths])
    expected = model.frozen_tokens(x)
    torch.testing.assert_close(torch.from_numpy(cache.tokens[:, 0].astype(np.float32)), expected, atol=4e-3, rtol=1e-3)
    # in bf16 (backbone.precision): the same tokens to bf16's 8 bits of mantissa, and the description says so
    bf16 = TokenCache.open(build_token_cache(model, paths, tmp_path / "bf16.npy", augment=EVAL, progress=False,
                                             precision="bf16"))
    tokens = torch.from_numpy(bf16.tokens[:, 0].astype(np.float32))
    assert bf16.meta["precision"] == "bfloat16" and not torch.equal(tokens, expected)
    assert torch.nn.functional.cosine_similarity(tokens, expected, dim=-1).min() > 0.99
    np.testing.assert_array_equal(cache.index([paths[5], paths[0]]), [5, 0])
    with pytest.raises(ValueError, match="one view"):
        build_token_cache(model, paths, tmp_path / "bad.npy", views=2, augment=EVAL, progress=False)


def test_training_cache_views_are_seeded_per_image_and_reproducible(images, tmp_path):
    paths, _ = images
    model = make_model()
    a = build_token_cache(model, paths, tmp_path / "a.npy", views=3, augment=AUGMENT, seed=7, progress=False,
                          precision="fp32")
    b = build_token_cache(model, paths, tmp_path / "b.npy", views=3, augment=AUGMENT, seed=7, progress=False,
                          precision="fp32")
    assert a.read_bytes() == b.read_bytes()
    c = build_token_cache(model, paths, tmp_path / "c.npy", views=3, augment=AUGMENT, seed=8, progress=False,
                          precision="fp32")
    assert a.read_bytes() != c.read_bytes()
    cache = TokenCache.open(a, model)
    # View v of image i is the augmentation drawn from (seed, i, v), whatever the order of the images.
    transform = ImageTransform.for_model(model, AUGMENT)
    for i, v in [(0, 0), (0, 2), (13, 1)]:
        expected = model.frozen_tokens(transform(load_image(paths[i]), derived_generator(7, i, v))[None])[0]
        torch.testing.assert_close(torch.from_numpy(cache.tokens[i, v].astype(np.float32)), expected,
                                   atol=4e-3, rtol=1e-3)
    assert not np.array_equal(cache.tokens[0, 0], cache.tokens[0, 1])
    # The cache's description (json) says how it was made.
    assert cache.meta["views"] == 3 and cache.meta["seed"] == 7 and cache.meta["augment"]["resize"] == 36


def test_cache_of_another_model_is_refused_naming_the_file(images, tmp_path):
    paths, _ = images
    out = build_token_cache(make_model(depth=2), paths[:4], tmp_path / "tok.npy", augment=EVAL, progress=False)
    TokenCache.open(out, make_model(depth=2))
    with pytest.raises(TokenCacheError, match=r"tok\.npy.*first_prompted_block"):
        TokenCache.open(out, make_model(depth=1))
    with pytest.raises(TokenCacheError, match=r"tok\.npy.*backbone_digest"):
        TokenCache.open(out, make_model(depth=2, vit_seed=3))
    cache = TokenCache.open(out)  # without a model: no check until it is used
    with pytest.raises(TokenCacheError, match=r"tok\.npy"):
        cache.check(make_model(depth=1))
    with pytest.raises(TokenCacheError, match=r"missing\.npy"):
        TokenCache.open(tmp_path / "missing.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.npy", "tok.npy.json"]  # no temporary files left


def test_token_dataset_picks_one_seeded_view_per_image(images, tmp_path):
    paths, labels = images
    out = build_token_cache(make_model(), paths, tmp_path / "t.npy", views=2, augment=AUGMENT, progress=False)
    cache = TokenCache.open(out)
    rows = np.array([20, 3, 7, 11])
    data = TokenDataset(cache, np.array(labels)[rows], rows)
    x, y = data.__getitems__([0, 2])
    assert x.dtype == torch.float32 and x.shape == (2, 17, 32) and y.tolist() == [labels[20], labels[7]]
    assert torch.equal(x[1], torch.from_numpy(cache.tokens[7, 0].astype(np.float32)))  # no epoch: view 0

    def views(epoch, seed=0):
        data.set_epoch(epoch, seed)
        got = data.__getitems__(range(4))[0]
        candidates = torch.from_numpy(cache.tokens[rows].astype(np.float32))  # [4, views, T, D]
        return [next(v for v in range(2) if torch.equal(got[j], candidates[j, v])) for j in range(len(rows))]

    big = TokenDataset(cache, labels)
    big.set_epoch(1)
    assert views(1) == views(1) and set(big.view.tolist()) == {0, 1}
    assert len({tuple(views(e)) for e in range(1, 7)}) > 1
    assert any(views(e, seed=0) != views(e, seed=5) for e in range(1, 5))
    with pytest.raises(ValueError, match="labels"):
        TokenDataset(cache, labels[:3], rows)


def test_image_dataset_augments_per_epoch_and_index(images):
    paths, labels = images
    data = ImageDataset(paths[:6], labels[:6], ImageTransform.for_model(make_model(), AUGMENT))
    eval_x = data.__getitems__([0, 1])[0]
    data.set_epoch(1, seed=3)
    x1 = data.__getitems__([1, 0])[0]
    assert torch.equal(x1[1], data[0][0]) and torch.equal(x1[0], data[1][0])  # order-independent
    image = load_image(paths[1])  # the augmentation drawn from (seed, epoch, index)
    assert torch.equal(x1[0], data.transform(image, derived_generator(3, 1, 2, 1)))
    data.set_epoch(2, seed=3)
    assert not torch.equal(data[0][0], x1[1])
    data.set_epoch(None)
    assert torch.equal(data.__getitems__([0, 1])[0], eval_x)


def test_cache_decoded_in_worker_processes_is_the_same_file(images, tmp_path):
    from taxotrait.dataset import ImageError

    paths, _ = images
    model = make_model()
    caches = [build_token_cache(model, paths, tmp_path / f"{workers}.npy", views=2, augment=AUGMENT, seed=3,
                                batch_size=5, progress=False, precision="fp32", num_workers=workers)
              for workers in (0, 2)]
    assert caches[0].read_bytes() == caches[1].read_bytes()
    assert (tmp_path / "0.npy.json").read_text() == (tmp_path / "2.npy.json").read_text()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageError, match=r"broken\.png: not an image"):  # raised in a worker, named as it was
        build_token_cache(model, [*paths[:6], broken], tmp_path / "b.npy", augment=EVAL, batch_size=2,
                          progress=False, num_workers=2)
    assert not (tmp_path / "b.npy").exists()
