"""Train the sample vision transformer ``digits_vit`` (called by ``train.py``; also alone).

    python sample_models/train_vit.py

A tiny ViT (``archs.TinyViT``: 4x4 patches of a 32x32 image, an 8 x 8 grid, 4 blocks of
dimension 64) on the same digits as ``digits_cnn`` (scikit-learn's ``load_digits``, the same
split), seeded and deterministic on the CPU. Writes ``digits_vit.pt2`` (torch.export program,
dynamic batch, "saliaudit.json" metadata), ``digits_vit.pt`` (state_dict) and the
``digits_vit`` entry of ``metrics.json``, and checks that the saved files reload and give the
in-memory outputs on the saved digit images.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import train as T
from archs import MEAN, STD, TinyViT

EPOCHS = 40


def train_vit(tr_img: np.ndarray, tr_y: np.ndarray, te_img: np.ndarray, te_y: np.ndarray) -> dict:
    """Train, export, verify; the metrics."""
    torch.manual_seed(T.SEED)
    model = TinyViT(num_classes=len(T.DIGITS_CLASSES), size=T.DIGITS_SIZE, patch=4)
    T.train(
        model,
        T.to_input(tr_img),
        tr_y,
        epochs=EPOCHS,
        bs=32,
        lr=2e-3,
        wd=5e-2,
        seed=T.SEED,
        augment=T.shift_augment,
        name="digits_vit",
    )
    x_te = T.to_input(te_img)
    acc = float((T.predict(model, x_te).argmax(1).numpy() == te_y).mean())
    print(f"digits_vit: test accuracy {acc:.4f} on {len(te_y)} held-out digits", flush=True)
    meta = {
        "input_size": [T.DIGITS_SIZE, T.DIGITS_SIZE],
        "mean": list(MEAN),
        "std": list(STD),
        "class_names": T.DIGITS_CLASSES,
        "name": "digits_vit",
        "description": "TinyViT (tiny vision transformer: 4x4 patches, class token, 4 blocks) "
        "trained on scikit-learn's 8x8 digits upsampled to 32x32, grayscale replicated to 3 "
        "channels; saliaudit sample model.",
    }
    torch.save(model.state_dict(), T.HERE / "digits_vit.pt")
    T.export(model, T.DIGITS_SIZE, T.HERE / "digits_vit.pt2", meta)
    # verification: the saved files give the in-memory outputs on the saved digit images
    extra = {"saliaudit.json": ""}
    ep = torch.export.load(str(T.HERE / "digits_vit.pt2"), extra_files=extra)
    assert json.loads(extra["saliaudit.json"])["name"] == "digits_vit"
    assert not any(n.meta.get("stack_trace") for n in ep.graph.nodes)
    fresh = TinyViT(num_classes=len(T.DIGITS_CLASSES), size=T.DIGITS_SIZE, patch=4)
    fresh.load_state_dict(torch.load(T.HERE / "digits_vit.pt", weights_only=True), strict=True)
    files = sorted((T.HERE / "images" / "digits").rglob("*.png"))
    x = torch.cat([T.load_png_input(p) for p in files])
    labels = [T.DIGITS_CLASSES.index(p.parent.name) for p in files]
    with torch.no_grad():
        out_ep, out_mem, out_sd = ep.module()(x), model(x), fresh.eval()(x)
    assert torch.allclose(out_ep, out_mem, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out_sd, out_mem, atol=1e-4, rtol=1e-4)
    saved_acc = float(np.mean([int(p) == y for p, y in zip(out_ep.argmax(1), labels)]))
    print(f"digits_vit.pt2: reloaded, {len(files)} saved images, accuracy {saved_acc:.4f}", flush=True)
    return {
        "test_accuracy": acc,
        "n_test": int(len(te_y)),
        "saved_images": len(files),
        "saved_images_accuracy_pt2": saved_acc,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def main() -> int:
    t0 = time.perf_counter()
    T.setup_determinism(T.SEED)
    tr_img, tr_y, te_img, te_y = T.make_digits(seed=T.SEED)
    metrics_path = T.HERE / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["digits_vit"] = train_vit(tr_img, tr_y, te_img, te_y)
    metrics.setdefault("sha256", {})["digits_vit.pt"] = T.sha256(T.HERE / "digits_vit.pt")[:16]
    metrics["sha256"]["digits_vit.pt2"] = T.sha256(T.HERE / "digits_vit.pt2")[:16]
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"SUMMARY digits_vit test acc {metrics['digits_vit']['test_accuracy']:.4f} | "
        f"runtime {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
