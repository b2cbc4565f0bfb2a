"""Regenerate the saliaudit sample models, images and masks.

    python sample_models/train.py

CPU only, seeded and deterministic (torch.use_deterministic_algorithms, 2 threads).
Writes, next to this file:

    shapes_vgg.pt2, digits_cnn.pt2,     torch.export programs (dynamic batch 1..1024) with
    digits_vit.pt2                      "saliaudit.json" metadata in extra_files
    shapes_vgg.pt, digits_cnn.pt,       plain state_dicts (weights_only=True loadable)
    digits_vit.pt                       (digits_vit: a tiny vision transformer, train_vit.py)
    shapes_labels.txt, digits_labels.txt
    images/shapes/<class>/NNN.png       single-object test images (ImageFolder layout)
    images/shapes_pairs/NNN.png         two-object test images (flat)
    images/digits/<digit>/NNN.png       held-out digits, 32x32 grayscale
    masks/<image path without extension>/<class>.png   binary 0/255 L-mode object masks
    metrics.json                        the accuracies printed at the end

and verifies at the end that the saved .pt2 files reload (with their metadata) and give
the same predictions on the saved PNGs as the in-memory models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from archs import MEAN, STD, DigitsCNN, ShapesVGG  # noqa: E402

SEED = 0
SHAPES_CLASSES = ["circle", "square", "triangle", "cross"]
DIGITS_CLASSES = [str(d) for d in range(10)]
SHAPES_SIZE = 64
DIGITS_SIZE = 32

N_SHAPES_TRAIN = 8000
N_SHAPES_TEST = 1000
N_PAIRS_TEST = 240
SAVE_PER_SHAPE_CLASS = 6
SAVE_PAIRS = 8
SAVE_PER_DIGIT = 4


# ---------------------------------------------------------------------------------------
# setup


def setup_determinism(seed: int = SEED) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(2)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. when imported after parallel work)
        pass
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


# ---------------------------------------------------------------------------------------
# procedural shapes

_YY, _XX = np.mgrid[0:SHAPES_SIZE, 0:SHAPES_SIZE].astype(np.float64) + 0.5


def shape_mask(cls: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Boolean mask of one object of class ``cls`` centred at (cx, cy), size r, angle theta."""
    dx, dy = _XX - cx, _YY - cy
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    name = SHAPES_CLASSES[cls]
    if name == "circle":
        return dx * dx + dy * dy <= r * r
    if name == "square":
        half = 0.8 * r
        return np.maximum(np.abs(u), np.abs(v)) <= half
    if name == "triangle":  # equilateral, circumradius 1.15 r, inradius half of it
        inr = 0.5 * 1.15 * r
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = -math.pi / 2 + k * 2 * math.pi / 3
            m &= u * math.cos(a) + v * math.sin(a) <= inr
        return m
    if name == "cross":  # plus sign, arm half-length r
        t = max(1.5, 0.28 * r)
        au, av = np.abs(u), np.abs(v)
        return ((au <= r) & (av <= t)) | ((av <= r) & (au <= t))
    raise ValueError(cls)


BOUND = 1.2  # every shape lies within a disc of radius BOUND * r around its centre


def background(rng: np.random.Generator) -> np.ndarray:
    """Float (H, W, 3) background in [0, 1]: colour ramp + low-frequency texture."""
    c1, c2 = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(ang) * _XX + math.sin(ang) * _YY) / SHAPES_SIZE
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-9)
    img = c1 * (1 - ramp[..., None]) + c2 * ramp[..., None]
    k = int(rng.integers(4, 9))
    low = torch.from_numpy(rng.uniform(-1.0, 1.0, (1, 3, k, k)))
    low = F.interpolate(low, size=(SHAPES_SIZE, SHAPES_SIZE), mode="bilinear", align_corners=False)
    img = img + rng.uniform(0.05, 0.2) * low[0].permute(1, 2, 0).numpy()
    return img


def pick_colour(rng: np.random.Generator, ref: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    for _ in range(100):
        col = rng.uniform(0.0, 1.0, 3)
        if np.linalg.norm(col - ref) >= 0.45 and all(np.linalg.norm(col - o) >= 0.3 for o in others):
            return col
    return col


def render(rng: np.random.Generator, classes: list[int], r_range: tuple[float, float]):
    """One image holding the given (distinct) classes, non-overlapping.

    Returns uint8 (H, W, 3) and a list of boolean masks, one per object.
    """
    img = background(rng)
    placed: list[tuple[float, float, float]] = []
    masks, cols = [], []
    for cls in classes:
        for _ in range(1000):
            r = rng.uniform(*r_range)
            bound = BOUND * r
            cx = rng.uniform(bound + 1, SHAPES_SIZE - bound - 1)
            cy = rng.uniform(bound + 1, SHAPES_SIZE - bound - 1)
            if all(math.hypot(cx - px, cy - py) > bound + pb + 2 for px, py, pb in placed):
                break
        else:  # pragma: no cover - the ranges used below always leave room
            raise RuntimeError("could not place object")
        placed.append((cx, cy, bound))
        m = shape_mask(cls, cx, cy, r, rng.uniform(0, 2 * math.pi))
        col = pick_colour(rng, img[m].mean(axis=0), cols)
        cols.append(col)
        shade = 1.0 + rng.uniform(-0.08, 0.08) * (_XX - cx) / max(r, 1.0)  # slight shading
        img[m] = np.clip(col[None, :] * shade[m][:, None], 0.0, 1.0)
        masks.append(m)
    img = img + rng.normal(0.0, rng.uniform(0.02, 0.08), img.shape)
    img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return img, masks


def make_singles(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPES_CLASSES)
    rng.shuffle(labels)
    imgs = np.empty((n, SHAPES_SIZE, SHAPES_SIZE, 3), np.uint8)
    masks = np.empty((n, SHAPES_SIZE, SHAPES_SIZE), bool)
    for i, y in enumerate(labels):
        imgs[i], (masks[i],) = render(rng, [int(y)], (6.0, 15.0))
    return imgs, labels.astype(np.int64), masks


def make_pairs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    combos = list(combinations(range(len(SHAPES_CLASSES)), 2))
    imgs = np.empty((n, SHAPES_SIZE, SHAPES_SIZE, 3), np.uint8)
    classes = np.empty((n, 2), np.int64)
    masks = np.empty((n, 2, SHAPES_SIZE, SHAPES_SIZE), bool)
    for i in range(n):
        pair = list(combos[i % len(combos)])
        if rng.random() < 0.5:
            pair.reverse()
        imgs[i], ms = render(rng, pair, (6.0, 11.0))
        classes[i] = pair
        masks[i] = np.stack(ms)
        assert not (masks[i, 0] & masks[i, 1]).any()
    return imgs, classes, masks


# ---------------------------------------------------------------------------------------
# digits


def make_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    # quantize to 8 bit so that the in-memory test set is exactly what the saved PNGs hold
    imgs = np.clip(np.rint(x[:, 0].numpy() * 255.0), 0, 255).astype(np.uint8)  # (N,32,32)
    y = d.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)
    return imgs[idx_tr], y[idx_tr], imgs[idx_te], y[idx_te]


# ---------------------------------------------------------------------------------------
# training


def to_input(imgs_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) or (N,H,W) -> normalized float (N,3,H,W): (x/255 - mean) / std."""
    x = torch.from_numpy(imgs_u8).float() / 255.0
    if x.ndim == 3:
        x = x[:, None].expand(-1, 3, -1, -1)
    else:
        x = x.permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@torch.no_grad()
def predict(model, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i : i + bs]) for i in range(0, len(x), bs)])


def train(model, x, y, *, epochs, bs, lr, wd, seed, augment=None, name=""):
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * (len(x) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    yt = torch.from_numpy(y)
    for ep in range(epochs):
        model.train()
        perm = rng.permutation(len(x))
        tot, correct, n = 0.0, 0, 0
        for b in range(len(x) // bs):  # drop the last partial batch (batch-norm)
            idx = torch.from_numpy(perm[b * bs : (b + 1) * bs])
            xb, yb = x[idx], yt[idx]
            if augment is not None:
                xb = augment(xb, rng)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            n += len(yb)
        print(
            f"  [{name}] epoch {ep + 1}/{epochs} loss {tot / n:.4f} train acc {correct / n:.4f}", flush=True
        )
    return model.eval()


def flip_augment(xb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    flip = torch.from_numpy(rng.random(len(xb)) < 0.5)
    return torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)


def shift_augment(xb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random translation by up to 2 px, padding with the background value (-1 = black)."""
    pad = 2
    padded = F.pad(xb, (pad, pad, pad, pad), value=-1.0)
    out = torch.empty_like(xb)
    offs = rng.integers(0, 2 * pad + 1, (len(xb), 2))
    h, w = xb.shape[-2:]
    for i, (dy, dx) in enumerate(offs):
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


# ---------------------------------------------------------------------------------------
# export and files


def export(model, size: int, path: Path, meta: dict) -> None:
    example = torch.zeros(2, 3, size, size)
    ep = torch.export.export(
        model.eval(),
        (example,),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
    )
    # Debug stack traces hold the absolute path of archs.py: drop them so the saved file
    # leaks no local path and is byte-identical wherever and whenever it is regenerated.
    for node in ep.graph.nodes:
        node.meta.pop("stack_trace", None)
    torch.export.save(ep, str(path), extra_files={"saliaudit.json": json.dumps(meta)})


def save_png(arr: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, optimize=True)
    return str(path.relative_to(HERE))


def save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path, optimize=True)


def load_png_input(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"))  # writable copy
    return to_input(arr[None])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------


def main() -> int:
    t0 = time.perf_counter()
    setup_determinism(SEED)
    metrics: dict = {"torch": torch.__version__, "seed": SEED}

    for sub in ("images", "masks"):  # regenerated from scratch: no stale files
        shutil.rmtree(HERE / sub, ignore_errors=True)

    # ---------------- shapes ----------------
    print("generating shapes ...", flush=True)
    tr_img, tr_y, _ = make_singles(N_SHAPES_TRAIN, seed=1)
    te_img, te_y, te_mask = make_singles(N_SHAPES_TEST, seed=2)
    pr_img, pr_cls, pr_mask = make_pairs(N_PAIRS_TEST, seed=3)
    print(f"  {time.perf_counter() - t0:.1f}s", flush=True)

    torch.manual_seed(SEED)
    shapes = ShapesVGG(num_classes=len(SHAPES_CLASSES))
    train(
        shapes,
        to_input(tr_img),
        tr_y,
        epochs=8,
        bs=64,
        lr=3e-3,
        wd=1e-4,
        seed=SEED,
        augment=flip_augment,
        name="shapes",
    )
    x_te = to_input(te_img)
    shapes_acc = (predict(shapes, x_te).argmax(1).numpy() == te_y).mean()
    logits_pr = predict(shapes, to_input(pr_img))
    top2 = logits_pr.topk(2, dim=1).indices.numpy()
    pairs_top2 = np.mean([set(t) == set(c) for t, c in zip(top2, pr_cls)])
    pairs_top1 = np.mean([t[0] in c for t, c in zip(top2, pr_cls)])
    metrics["shapes"] = {
        "test_accuracy": float(shapes_acc),
        "n_test": int(len(te_y)),
        "pairs_top1_is_present_class": float(pairs_top1),
        "pairs_top2_equals_present_classes": float(pairs_top2),
        "n_pairs": int(len(pr_cls)),
    }
    print(f"shapes: test accuracy {shapes_acc:.4f} on {len(te_y)} held-out single-object images")
    print(
        f"shapes: two-object images: top-1 is a present class {pairs_top1:.4f}, "
        f"top-2 = both present classes {pairs_top2:.4f} (n={len(pr_cls)})",
        flush=True,
    )

    # ---------------- digits ----------------
    print("loading digits ...", flush=True)
    dtr_img, dtr_y, dte_img, dte_y = make_digits(seed=SEED)
    torch.manual_seed(SEED)
    digits = DigitsCNN(num_classes=len(DIGITS_CLASSES))
    train(
        digits,
        to_input(dtr_img),
        dtr_y,
        epochs=30,
        bs=32,
        lr=3e-3,
        wd=1e-4,
        seed=SEED,
        augment=shift_augment,
        name="digits",
    )
    digits_acc = (predict(digits, to_input(dte_img)).argmax(1).numpy() == dte_y).mean()
    metrics["digits"] = {
        "test_accuracy": float(digits_acc),
        "n_test": int(len(dte_y)),
        "n_train": int(len(dtr_y)),
    }
    print(f"digits: test accuracy {digits_acc:.4f} on {len(dte_y)} held-out images", flush=True)

    # ---------------- files ----------------
    meta_shapes = {
        "input_size": [SHAPES_SIZE, SHAPES_SIZE],
        "mean": list(MEAN),
        "std": list(STD),
        "class_names": SHAPES_CLASSES,
        "name": "shapes_vgg",
        "description": "ShapesVGG (small VGG-style CNN with batch-norm) trained on procedural "
        "64x64 images of one circle/square/triangle/cross on a textured "
        "background; saliaudit sample model.",
    }
    meta_digits = {
        "input_size": [DIGITS_SIZE, DIGITS_SIZE],
        "mean": list(MEAN),
        "std": list(STD),
        "class_names": DIGITS_CLASSES,
        "name": "digits_cnn",
        "description": "DigitsCNN (small CNN with batch-norm) trained on scikit-learn's 8x8 "
        "digits upsampled to 32x32, grayscale replicated to 3 channels; "
        "saliaudit sample model.",
    }
    for model, size, stem, meta, _names in (
        (shapes, SHAPES_SIZE, "shapes_vgg", meta_shapes, SHAPES_CLASSES),
        (digits, DIGITS_SIZE, "digits_cnn", meta_digits, DIGITS_CLASSES),
    ):
        torch.save(model.state_dict(), HERE / f"{stem}.pt")
        export(model, size, HERE / f"{stem}.pt2", meta)
    (HERE / "shapes_labels.txt").write_text("\n".join(SHAPES_CLASSES) + "\n")
    (HERE / "digits_labels.txt").write_text("\n".join(DIGITS_CLASSES) + "\n")

    saved: dict[str, list[tuple[str, int]]] = {"shapes": [], "pairs": [], "digits": []}
    for c, name in enumerate(SHAPES_CLASSES):
        for j, i in enumerate(np.flatnonzero(te_y == c)[:SAVE_PER_SHAPE_CLASS]):
            rel = f"shapes/{name}/{j:03d}"
            saved["shapes"].append((save_png(te_img[i], HERE / "images" / f"{rel}.png"), c))
            save_mask(te_mask[i], HERE / "masks" / rel / f"{name}.png")
    for j in range(SAVE_PAIRS):  # the first 8 pairs cover all 6 class combinations
        rel = f"shapes_pairs/{j:03d}"
        saved["pairs"].append((save_png(pr_img[j], HERE / "images" / f"{rel}.png"), -1))
        for k in range(2):
            save_mask(pr_mask[j, k], HERE / "masks" / rel / f"{SHAPES_CLASSES[pr_cls[j, k]]}.png")
    for d in range(10):
        for j, i in enumerate(np.flatnonzero(dte_y == d)[:SAVE_PER_DIGIT]):
            rel = f"digits/{d}/{j:03d}.png"
            saved["digits"].append((save_png(dte_img[i], HERE / "images" / rel), d))

    # ---------------- verification ----------------
    print("verifying saved files ...", flush=True)
    for stem, model, key, n_cls in (
        ("shapes_vgg", shapes, "shapes", 4),
        ("digits_cnn", digits, "digits", 10),
    ):
        extra = {"saliaudit.json": ""}
        ep = torch.export.load(str(HERE / f"{stem}.pt2"), extra_files=extra)
        meta = json.loads(extra["saliaudit.json"])
        assert meta["name"] == stem and len(meta["class_names"]) == n_cls, meta
        assert not any(n.meta.get("stack_trace") for n in ep.graph.nodes)
        gm = ep.module()
        sd = torch.load(HERE / f"{stem}.pt", weights_only=True)
        fresh = (ShapesVGG if key == "shapes" else DigitsCNN)(num_classes=n_cls)
        fresh.load_state_dict(sd, strict=True)
        fresh.eval()
        files = saved[key] + (saved["pairs"] if key == "shapes" else [])
        x = torch.cat([load_png_input(HERE / p) for p, _ in files])
        with torch.no_grad():
            out_ep = gm(x)
            out_mem = model(x)
            out_sd = fresh(x)
            out_one = gm(x[:1])  # batch size 1 works with the dynamic batch dim
        assert torch.allclose(out_ep, out_mem, atol=1e-4, rtol=1e-4)
        assert torch.allclose(out_sd, out_mem, atol=1e-4, rtol=1e-4)
        assert torch.allclose(out_one, out_mem[:1], atol=1e-4, rtol=1e-4)
        labelled = [(i, y) for i, (_, y) in enumerate(files) if y >= 0]
        pred = out_ep.argmax(1)
        acc = np.mean([pred[i].item() == y for i, y in labelled])
        metrics[key]["saved_images"] = len(labelled)
        metrics[key]["saved_images_accuracy_pt2"] = float(acc)
        print(
            f"{stem}.pt2: reloaded, meta ok, {len(labelled)} saved labelled images, "
            f"accuracy {acc:.4f}; max |pt2 - in-memory| = "
            f"{(out_ep - out_mem).abs().max().item():.2e}"
        )
        if key == "shapes":
            pp = out_ep[len(saved["shapes"]) :].topk(2, dim=1).indices.numpy()
            ok = sum(set(t) == {int(c) for c in pr_cls[j]} for j, t in enumerate(pp))
            metrics[key]["saved_pairs_top2_equals_present"] = f"{ok}/{len(pp)}"
            print(f"  saved pairs: top-2 = both present classes for {ok}/{len(pp)}")
    # masks: one per present class, same size as the image, binary
    n_masks = 0
    for m in sorted((HERE / "masks").rglob("*.png")):
        with Image.open(m) as im:
            a = np.asarray(im)
            assert im.mode == "L" and set(np.unique(a)) <= {0, 255} and a.any(), m
        img_path = HERE / "images" / (str(m.parent.relative_to(HERE / "masks")) + ".png")
        with Image.open(img_path) as im:
            assert im.size == a.shape[::-1]
        n_masks += 1
    print(f"masks: {n_masks} files ok")

    # ---------------- the sample transformer, on the same digits ----------------
    from train_vit import train_vit

    metrics["digits_vit"] = train_vit(dtr_img, dtr_y, dte_img, dte_y)

    runtime = time.perf_counter() - t0
    metrics["sha256"] = {
        p: sha256(HERE / p)[:16]
        for p in (
            "shapes_vgg.pt",
            "digits_cnn.pt",
            "digits_vit.pt",
            "shapes_vgg.pt2",
            "digits_cnn.pt2",
            "digits_vit.pt2",
        )
    }
    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"SUMMARY shapes test acc {shapes_acc:.4f} | digits test acc {digits_acc:.4f} | "
        f"runtime {runtime:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
