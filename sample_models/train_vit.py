"""Train the sample vision transformer ``shapes_vit`` (called by ``train.py``; also alone).

    python sample_models/train_vit.py

A tiny ViT (``archs.ShapesViT``: 8x8 patches of a 64x64 image, 4 blocks of dimension 64) on
the same procedural shapes as ``shapes_vgg`` (the same seeds, so the same images), seeded and
deterministic on the CPU. Writes ``shapes_vit.pt2`` (torch.export program, dynamic batch,
"saliaudit.json" metadata), ``shapes_vit.pt`` (state_dict) and the ``shapes_vit`` entry of
``metrics.json``, and checks that the saved files reload and give the in-memory outputs.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import train as T
from archs import MEAN, STD, ShapesViT


def train_vit(tr_img: np.ndarray, tr_y: np.ndarray, te_img: np.ndarray, te_y: np.ndarray) -> dict:
    """Train, export, verify; the metrics."""
    torch.manual_seed(T.SEED)
    model = ShapesViT(num_classes=len(T.SHAPES_CLASSES))
    T.train(
        model,
        T.to_input(tr_img),
        tr_y,
        epochs=20,
        bs=64,
        lr=2e-3,
        wd=5e-2,
        seed=T.SEED,
        augment=T.flip_augment,
        name="shapes_vit",
    )
    x_te = T.to_input(te_img)
    acc = float((T.predict(model, x_te).argmax(1).numpy() == te_y).mean())
    print(f"shapes_vit: test accuracy {acc:.4f} on {len(te_y)} held-out single-object images", flush=True)
    meta = {
        "input_size": [T.SHAPES_SIZE, T.SHAPES_SIZE],
        "mean": list(MEAN),
        "std": list(STD),
        "class_names": T.SHAPES_CLASSES,
        "name": "shapes_vit",
        "description": "ShapesViT (tiny vision transformer: 8x8 patches, class token, 4 blocks) "
        "trained on procedural 64x64 images of one circle/square/triangle/cross on a textured "
        "background; saliaudit sample model.",
    }
    torch.save(model.state_dict(), T.HERE / "shapes_vit.pt")
    T.export(model, T.SHAPES_SIZE, T.HERE / "shapes_vit.pt2", meta)
    # verification: the saved files give the in-memory outputs on the saved shapes images
    extra = {"saliaudit.json": ""}
    ep = torch.export.load(str(T.HERE / "shapes_vit.pt2"), extra_files=extra)
    assert json.loads(extra["saliaudit.json"])["name"] == "shapes_vit"
    assert not any(n.meta.get("stack_trace") for n in ep.graph.nodes)
    fresh = ShapesViT(num_classes=len(T.SHAPES_CLASSES))
    fresh.load_state_dict(torch.load(T.HERE / "shapes_vit.pt", weights_only=True), strict=True)
    files = sorted((T.HERE / "images" / "shapes").rglob("*.png"))
    x = torch.cat([T.load_png_input(p) for p in files])
    labels = [T.SHAPES_CLASSES.index(p.parent.name) for p in files]
    with torch.no_grad():
        out_ep, out_mem, out_sd = ep.module()(x), model(x), fresh.eval()(x)
    assert torch.allclose(out_ep, out_mem, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out_sd, out_mem, atol=1e-4, rtol=1e-4)
    saved_acc = float(np.mean([int(p) == y for p, y in zip(out_ep.argmax(1), labels)]))
    print(f"shapes_vit.pt2: reloaded, {len(files)} saved images, accuracy {saved_acc:.4f}", flush=True)
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
    tr_img, tr_y, _ = T.make_singles(T.N_SHAPES_TRAIN, seed=1)
    te_img, te_y, _ = T.make_singles(T.N_SHAPES_TEST, seed=2)
    metrics_path = T.HERE / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["shapes_vit"] = train_vit(tr_img, tr_y, te_img, te_y)
    metrics.setdefault("sha256", {})["shapes_vit.pt"] = T.sha256(T.HERE / "shapes_vit.pt")[:16]
    metrics["sha256"]["shapes_vit.pt2"] = T.sha256(T.HERE / "shapes_vit.pt2")[:16]
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"SUMMARY shapes_vit test acc {metrics['shapes_vit']['test_accuracy']:.4f} | "
        f"runtime {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
