"""Stratified samples for capped checks: every class represented, seeded, order-free."""

from __future__ import annotations

from collections import Counter

import pytest

from saliaudit.sampling import stratified_sample


def test_balanced_over_classes_and_deterministic():
    names = [f"{c}/{i}.png" for c in "abc" for i in range(10)]
    classes = [n[0] for n in names]
    pick = stratified_sample(names, classes, 6, seed=0)
    assert len(pick) == 6 and len(set(pick)) == 6
    assert Counter(p[0] for p in pick) == {"a": 2, "b": 2, "c": 2}
    assert pick == stratified_sample(list(reversed(names)), list(reversed(classes)), 6, seed=0)
    assert pick != stratified_sample(names, classes, 6, seed=1)
    # the first j of a larger sample are balanced too
    big = stratified_sample(names, classes, 12, seed=0)
    assert Counter(p[0] for p in big[:3]) == {"a": 1, "b": 1, "c": 1}


def test_small_classes_are_exhausted_then_the_others_fill_up():
    names = ["a/1", "b/1", "b/2", "b/3", "b/4", "c/1"]
    pick = stratified_sample(names, [n[0] for n in names], 5, seed=3)
    assert Counter(p[0] for p in pick) == {"a": 1, "b": 3, "c": 1}
    assert sorted(stratified_sample(names, [n[0] for n in names], 50, seed=3)) == sorted(names)
    assert stratified_sample(names, [n[0] for n in names], 0, seed=3) == []
    with pytest.raises(ValueError):
        stratified_sample(names, ["a"], 2, seed=0)


def test_sorted_path_order_would_have_missed_a_class():
    """The failure this replaces: the first 4 of 12 in path order are all one class."""
    names = [f"{c}/{i:02d}.png" for c in ("circle", "square", "triangle") for i in range(4)]
    classes = [n.split("/")[0] for n in names]
    assert {n.split("/")[0] for n in sorted(names)[:4]} == {"circle"}
    assert {n.split("/")[0] for n in stratified_sample(names, classes, 4, seed=0)} == {
        "circle",
        "square",
        "triangle",
    }
