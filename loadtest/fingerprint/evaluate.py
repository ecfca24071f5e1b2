"""Pairwise clustering metrics.

A pair of messages is *predicted-same* when the method put both in one cluster, *true-same*
when they carry the same campaign label.  Precision = predicted-same and true-same over
predicted-same; recall = over true-same; F1 their harmonic mean (1.0 when there is nothing to
find and nothing was wrongly found).

Per part, the pairs are those of two messages of that part.  Two more figures count mistakes
across parts too:

* hard negatives merged (part b): pairs of two messages made from one template but of
  different campaigns (two issues of one newsletter, two receipts of one shop) that were put in
  one cluster, over all such pairs;
* singletons merged (part c): pairs with at least one singleton (the other from any part) put
  in one cluster, over all such pairs; and the share of singletons not left alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loadtest.fingerprint.corpus import PARTS, TRICKS, Labelled


def c2(n: int) -> int:
    return n * (n - 1) // 2


@dataclass(slots=True)
class PairScore:
    tp: int
    pred: int  # predicted-same pairs
    true: int  # true-same pairs
    total: int  # all pairs

    @property
    def precision(self) -> float:
        return self.tp / self.pred if self.pred else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.true if self.true else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def false_merges(self) -> int:
        return self.pred - self.tp

    @property
    def negatives(self) -> int:
        return self.total - self.true

    @property
    def merged_rate(self) -> float:
        """Wrongly merged pairs over all negative pairs."""
        return self.false_merges / self.negatives if self.negatives else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "tp_pairs": self.tp,
            "predicted_pairs": self.pred,
            "true_pairs": self.true,
            "pairs": self.total,
            "wrongly_merged_pairs": self.false_merges,
            "wrongly_merged_rate": self.merged_rate,
        }


def pair_score(true: Sequence[str], pred: Sequence[str]) -> PairScore:
    both = Counter(zip(true, pred, strict=True))
    return PairScore(
        tp=sum(c2(n) for n in both.values()),
        pred=sum(c2(n) for n in Counter(pred).values()),
        true=sum(c2(n) for n in Counter(true).values()),
        total=c2(len(true)),
    )


@dataclass(slots=True)
class Evaluation:
    overall: PairScore
    parts: dict[str, PairScore]
    hard_negatives_merged: float
    hard_negative_pairs: int
    hard_negative_merged_pairs: int
    hard_merged_by_kind: dict[str, float]
    singletons_merged: float
    singleton_pairs: int
    singletons_not_alone: float
    trick_recall: dict[str, float] = field(default_factory=dict)
    kind_recall: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "overall": self.overall.as_dict(),
            "parts": {p: s.as_dict() for p, s in self.parts.items()},
            "hard_negatives_merged_rate": self.hard_negatives_merged,
            "hard_negative_pairs": self.hard_negative_pairs,
            "hard_negative_merged_pairs": self.hard_negative_merged_pairs,
            "hard_negatives_merged_rate_by_kind": self.hard_merged_by_kind,
            "singletons_merged_rate": self.singletons_merged,
            "singleton_pairs": self.singleton_pairs,
            "singletons_not_alone": self.singletons_not_alone,
            "adversarial_recall_by_trick": self.trick_recall,
            "campaign_recall_by_length": self.kind_recall,
        }


def _recall_where(
    msgs: Sequence[Labelled], pred: dict[int, str], keep: Callable[[Labelled], bool]
) -> float:
    """Recall over true-same pairs within msgs where at least one message satisfies keep."""
    hit = tot = 0
    by_camp: dict[str, list[Labelled]] = {}
    for m in msgs:
        by_camp.setdefault(m.campaign, []).append(m)
    for group in by_camp.values():
        for i, x in enumerate(group):
            for y in group[i + 1 :]:
                if keep(x) or keep(y):
                    tot += 1
                    hit += pred[x.index] == pred[y.index]
    return hit / tot if tot else 1.0


def evaluate(messages: Sequence[Labelled], clusters: Sequence[str]) -> Evaluation:
    """clusters[i] is the predicted cluster of messages[i]."""
    true = [m.campaign for m in messages]
    overall = pair_score(true, clusters)
    parts: dict[str, PairScore] = {}
    for p in PARTS:
        idx = [i for i, m in enumerate(messages) if m.part == p]
        parts[p] = pair_score([true[i] for i in idx], [clusters[i] for i in idx])

    # Hard negatives: pairs of one template (newsletter or shop), different campaigns.
    hard_pairs = hard_merged = 0
    hard_by_kind: dict[str, list[int]] = {}
    fams: dict[str, list[int]] = {}
    for i, m in enumerate(messages):
        if m.part == "b":
            fams.setdefault(m.family, []).append(i)
    for idx in fams.values():
        kind = messages[idx[0]].kind
        acc = hard_by_kind.setdefault(kind, [0, 0])
        for x, i in enumerate(idx):
            for j in idx[x + 1 :]:
                if true[i] != true[j]:
                    same = clusters[i] == clusters[j]
                    hard_pairs += 1
                    hard_merged += same
                    acc[0] += same
                    acc[1] += 1

    # Singletons: pairs with at least one singleton, the other from anywhere.
    n = len(messages)
    single = [i for i, m in enumerate(messages) if m.part == "c"]
    sizes = Counter(clusters)
    in_c = Counter(clusters[i] for i in single)
    merged = 0
    for i in single:
        k = clusters[i]
        # Others in the cluster; pairs of two singletons are counted once.
        others_outside = sizes[k] - in_c[k]
        merged += others_outside
    merged += sum(c2(v) for v in in_c.values())
    nc = len(single)
    singleton_pairs = c2(nc) + nc * (n - nc)
    not_alone = sum(sizes[clusters[i]] > 1 for i in single) / nc if nc else 0.0

    pred = {m.index: clusters[i] for i, m in enumerate(messages)}
    adv = [m for m in messages if m.part == "d"]

    def has_trick(trick: str) -> Callable[[Labelled], bool]:
        return lambda m: trick in m.tricks

    def of_kind(kind: str) -> Callable[[Labelled], bool]:
        return lambda m: m.kind == kind

    trick_recall = {t: _recall_where(adv, pred, has_trick(t)) for t in TRICKS}
    camp = [m for m in messages if m.part == "a"]
    kinds = sorted({m.kind for m in camp})
    kind_recall = {k: _recall_where(camp, pred, of_kind(k)) for k in kinds}
    return Evaluation(
        overall=overall,
        parts=parts,
        hard_negatives_merged=hard_merged / hard_pairs if hard_pairs else 0.0,
        hard_negative_pairs=hard_pairs,
        hard_negative_merged_pairs=hard_merged,
        hard_merged_by_kind={k: a / b if b else 0.0 for k, (a, b) in hard_by_kind.items()},
        singletons_merged=merged / singleton_pairs if singleton_pairs else 0.0,
        singleton_pairs=singleton_pairs,
        singletons_not_alone=not_alone,
        trick_recall=trick_recall,
        kind_recall=kind_recall,
    )
