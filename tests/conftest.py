"""Shared fixtures: real photographs shipped with scikit-image, small models."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def real_images(size: int = 64, n: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` real photographs (scikit-image's bundled samples), resized, ImageNet-normalized."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket"]
    batch = []
    for name in names[:n]:
        arr = getattr(skimage.data, name)()
        img = Image.fromarray(arr).convert("RGB").resize((size, size), Image.BILINEAR)
        batch.append(np.asarray(img, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype).contiguous()


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch-norm layer non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    return model


def hook_counts(model: torch.nn.Module) -> int:
    """Total number of hooks of every kind registered on any submodule."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(m, attr, {}) or {})
    return total


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """The test models are tiny (32-64 px images, small CNNs): one intra-op thread is as fast,
    and on a shared or oversubscribed CI box (2 cores, other jobs) OpenMP's spinning threads
    made the suite several times slower. Subprocess tests keep PyTorch's default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def lazy_importorskip(name: str):
    """Module ``name``, imported when a test first uses one of its attributes: a test that
    needs a missing optional package (Captum) is skipped, with pytest's reason, while the
    other tests of its file still run (a module-level ``pytest.importorskip`` skips them all)."""

    class _Lazy:
        def __getattr__(self, attr: str):
            if attr.startswith(("_", "pytest")):  # pytest inspects module globals when collecting
                raise AttributeError(attr)
            return getattr(pytest.importorskip(name), attr)

    return _Lazy()
