"""Representative image samples for the checks that measure at most ``max_images`` images.

Taking the first images in path order makes a capped check see one or two classes of an
ImageFolder tree. Instead each capped check gets a seeded sample stratified by class: the
classes are visited in a seeded order, round-robin, each contributing its images in a seeded
order, until the cap is reached, so every class is represented as evenly as the cap allows.
The class is the folder's label when the folder gives one, otherwise the predicted class.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

__all__ = ["stratified_sample"]


def stratified_sample(names: Sequence[str], classes: Sequence[object], k: int, seed: int) -> list[str]:
    """``k`` of ``names`` (all of them when there are fewer), balanced over ``classes``.

    Deterministic for the same names, classes, ``k`` and ``seed`` whatever the input order;
    the result is in round-robin order (the first ``j`` of it are the sample for ``j``).
    """
    if len(names) != len(classes):
        raise ValueError("one class per name")
    if k <= 0:
        return []
    by_class: dict[str, list[str]] = defaultdict(list)
    for name, cls in zip(names, classes):
        by_class[repr(cls)].append(name)
    rng = random.Random(seed)
    order = sorted(by_class)
    rng.shuffle(order)
    queues = []
    for key in order:
        members = sorted(by_class[key])
        rng.shuffle(members)
        queues.append(members)
    picked: list[str] = []
    depth = 0
    while len(picked) < min(k, len(names)):
        for q in queues:
            if depth < len(q):
                picked.append(q[depth])
                if len(picked) == k:
                    break
        depth += 1
    return picked
