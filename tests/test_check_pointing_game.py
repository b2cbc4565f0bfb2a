"""Pointing games: analytic cases, and hit rates on the sample shapes model with its masks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saliaudit.checks.base import Batch, MapSource, Variant
from saliaudit.checks.pointing_game import (
    PointingGame,
    RestrictedPointingGame,
    point_scores,
    scaled_tolerance,
    tolerance_region,
)
from saliaudit.errors import SaliauditError
from saliaudit.masks import load_masks
from saliaudit.methods import build_source
from saliaudit.model import load_model

from .checks_util import SAMPLES, make_batch

H = W = 32
V = Variant("fake", post="signed", signed=True)


class FakeSource(MapSource):
    """Maps given per (image position, class): a peak at a chosen pixel, or a whole map."""

    method = "fake"
    variants = [V]

    def __init__(self, maps: dict[tuple[int, int], torch.Tensor]):
        self.table = maps

    def maps(self, model, x, targets):
        ids = x[:, 0, 0, 0].long().tolist()  # the image's position is written into x
        return {V: torch.stack([self.table[(i, int(t))] for i, t in zip(ids, targets.tolist())])}


def peak(y: int, x: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(H, W)
    m[y, x] = value
    return m


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def batch_of(masks: list[dict[int, np.ndarray]], targets: list[int]) -> Batch:
    n = len(targets)
    x = torch.zeros(n, 3, H, W)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    model = SimpleNamespace(class_names=["a", "b", "c"])
    t = torch.tensor(targets)
    return Batch(
        model, x, [f"{i}.png" for i in range(n)], t, torch.zeros(n, 3), [None] * n, masks, 0, 0, {"0.png"}
    )


def run(check, batch, source):
    maps = source.maps(batch.model, batch.x, batch.targets)
    out = check.measure(batch, source, maps)
    return out[V], check.judge(V, out[V])


def test_tolerance_is_scaled_to_the_input():
    assert scaled_tolerance(15, 224, (224, 224)) == 15
    assert scaled_tolerance(15, 224, (64, 64)) == pytest.approx(4.2857, abs=1e-4)
    assert scaled_tolerance(15, 224, (32, 48)) == pytest.approx(15 * 32 / 224)
    region = tolerance_region(box(10, 12, 10, 12), 3.0)
    assert region[10, 14] and not region[10, 15] and region[13, 13] and not region[14, 14]


def test_hits_misses_tolerance_ties_and_signed_maximum():
    mask = box(8, 16, 8, 16)
    cases = {
        (0, 0): peak(10, 10),  # inside: hit
        (1, 0): peak(28, 28),  # far outside: miss
        (2, 0): peak(10, 17),  # 2 px right of the mask: within 2.14 px
        (3, 0): torch.ones(H, W),  # constant: scores the chance level
        (4, 0): peak(10, 10, -5.0) + peak(28, 28, 1.0),  # signed: the positive max counts, a miss
        (5, 0): peak(10, 10) + peak(28, 28),  # two equal maxima: half a hit
    }
    masks = [{0: mask} for _ in range(6)]
    m, cell = run(PointingGame(), batch_of(masks, [0] * 6), FakeSource(cases))
    radius = 15 * 32 / 224  # 2.14 px at 32 px
    assert m.extra["tolerance_px"] == pytest.approx(radius)
    region = tolerance_region(mask, radius)
    assert m.values[:3] == [1.0, 0.0, 1.0]  # 2 px <= 2.14 px: a hit
    assert m.values[3] == pytest.approx(region.mean())
    assert m.values[4] == 0.0 and m.values[5] == 0.5
    assert cell.status == "pass" and cell.value == pytest.approx(np.mean(m.values))
    assert "informational" in cell.message and "strongest positive evidence" in cell.message
    assert "hit rate" in cell.message and "random point would hit" in cell.message
    assert cell.series["figures"]["0.png"]["point"] == [10, 10]
    # three pixels outside: a miss even with the tolerance
    _, cell = run(PointingGame(), batch_of([{0: mask}], [0]), FakeSource({(0, 0): peak(10, 18)}))
    assert cell.value == 0.0


def test_exclusions_thresholds_and_skips():
    mask = box(8, 16, 8, 16)
    src = FakeSource({(i, t): peak(10, 10) for i in range(4) for t in range(3)})
    batch = batch_of([{0: mask}, {}, {1: mask}, {0: mask}], [0, 0, 0, 2])
    m, cell = run(PointingGame(), batch, src)
    assert [v for v in m.values if not np.isnan(v)] == [1.0] and sum(np.isnan(m.values)) == 3
    assert "no masks for the image: 1 image(s)" in cell.message
    assert "no mask for the predicted class: 2 image(s)" in cell.message
    # thresholds set by the user: lower is worse, judged through the interval of the rate
    n = 12
    miss = FakeSource({(i, 0): peak(30, 30) for i in range(n)})
    hit = FakeSource({(i, 0): peak(10, 10) for i in range(n)})
    many = batch_of([{0: mask}] * n, [0] * n)
    assert run(PointingGame(thresholds={"fail": 0.5}), many, miss)[1].status == "fail"
    assert run(PointingGame(thresholds={"warn": 0.5}), many, miss)[1].status == "warn"
    judged = run(PointingGame(thresholds={"fail": 0.5, "warn": 0.9}), many, hit)[1]
    assert judged.status == "pass" and judged.n == n and judged.ci == [1.0, 1.0]
    # one image cannot decide: inconclusive, the interval is the whole range of a rate
    one = batch_of([{0: mask}], [0])
    single = run(PointingGame(thresholds={"fail": 0.5}), one, miss)[1]
    assert single.status == "warn" and single.inconclusive and single.ci == [0.0, 1.0]
    _, cell = run(PointingGame(), batch_of([{}, {1: mask}], [0, 0]), src)
    assert cell.status == "skipped" and cell.value is None and "no image qualifies" in cell.message
    assert PointingGame().skip_reason(src, None, False) == "needs object masks (--masks DIR)"
    with pytest.raises(SaliauditError, match="maps are 32x32"):
        run(PointingGame(), batch_of([{0: np.ones((8, 8), bool)}], [0]), src)


def test_restricted_game_needs_two_classes_and_class_sensitive_maps():
    a, b = box(2, 10, 2, 10), box(20, 28, 20, 28)
    masks = [{0: a, 1: b}, {0: a, 1: b}, {0: a, 1: b}, {0: a}]
    maps = {
        (0, 0): peak(5, 5),
        (0, 1): peak(24, 24),  # each class on its object: 1.0
        (1, 0): peak(5, 5) + peak(15, 15, 9.0),
        (1, 1): peak(5, 5),  # off-object max ignored
        (2, 0): peak(24, 24),
        (2, 1): peak(5, 5),  # swapped: 0.0
        (3, 0): peak(5, 5),
    }
    m, cell = run(RestrictedPointingGame(), batch_of(masks, [0, 1, 0, 0]), FakeSource(maps))
    assert m.values[:3] == [1.0, 0.5, 0.0] and np.isnan(m.values[3])
    assert cell.value == pytest.approx(0.5)
    assert "fewer than two classes: 1 image(s)" in cell.message and "scores 0.500" in cell.message
    assert len(m.extra["per_class"]) == 6
    same = {(i, c): peak(5, 5) for i in range(3) for c in range(2)}  # ignores the class
    m, _ = run(RestrictedPointingGame(), batch_of(masks[:3], [0, 0, 1]), FakeSource(same))
    assert m.values == [0.5, 0.5, 0.5]


def test_point_scores_ignore_non_finite_values():
    m = torch.stack([peak(1, 1), torch.full((H, W), float("nan"))])
    m[0, 3, 3] = float("inf")
    score, ties, first = point_scores(m, np.stack([box(0, 2, 0, 2)] * 2))
    assert score[0] == 1.0 and ties[0] == 1 and list(first[0]) == [1, 1]
    assert np.isnan(score[1])


@pytest.fixture(scope="module")
def shapes():
    lm = load_model(SAMPLES / "shapes_vgg.pt2")
    out = {}
    for d in ("shapes", "shapes_pairs"):
        b = make_batch(image_dir=SAMPLES / "images" / d, n=0, model=lm)
        b.masks = [load_masks(SAMPLES / "masks" / d, r, lm.class_names, lm.input_size) for r in b.images]
        out[d] = b
    return out


def test_sample_model_hit_rates(shapes):
    rates: dict[str, dict[str, float]] = {"single": {}, "pairs": {}, "restricted": {}}
    for name in ("fullgrad", "gradcam", "edge", "random"):
        src = build_source(name, psi=["paper"], post=["abs"])
        for d, games in (
            ("shapes", [("single", PointingGame)]),
            ("shapes_pairs", [("pairs", PointingGame), ("restricted", RestrictedPointingGame)]),
        ):
            b = shapes[d]
            maps = src.maps(b.model, b.x, b.targets)
            for key, check_cls in games:
                check = check_cls()
                ((v, m),) = check.measure(b, src, maps).items()
                cell = check.judge(v, m)
                assert cell.status == "pass" and cell.value is not None, cell.message
                rates[key][name] = cell.value
    print(rates)
    single, pairs, restricted = rates["single"], rates["pairs"], rates["restricted"]
    # the random control is near chance (13 % of a single-shape image lies within tolerance)
    assert single["random"] < single["gradcam"] and single["random"] < 0.5
    assert single["fullgrad"] > 0.5 and single["gradcam"] > 0.5
    assert pairs["random"] < 0.5
    # class-independent controls score exactly 1/2 on two-class images; Grad-CAM does better
    assert restricted["random"] == 0.5 and restricted["edge"] == 0.5
    assert restricted["gradcam"] > 0.5
