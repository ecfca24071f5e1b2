"""Markdown tables of the results, and the issue's targets with PASS/FAIL."""

from __future__ import annotations

from dataclasses import dataclass

from loadtest.fingerprint.corpus import PART_NAMES, TRICKS
from loadtest.fingerprint.evaluate import Evaluation
from loadtest.fingerprint.speed import SpeedResult

TARGET_F1_CAMPAIGN = 0.97
TARGET_F1_ADVERSARIAL = 0.95
TARGET_HARD_NEG = 0.01
TARGET_SINGLETONS = 0.005
TARGET_SPEED = 2000.0


@dataclass(slots=True)
class MethodResult:
    name: str
    description: str
    evaluation: Evaluation
    seconds: float  # clustering time, plus the shared decoding for text methods
    messages: int
    clusters: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.name,
            "description": self.description,
            "seconds": self.seconds,
            "msgs_per_s": self.rate,
            "clusters": self.clusters,
            **self.evaluation.as_dict(),
        }


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def main_table(results: list[MethodResult]) -> str:
    head = (
        "| method | a: campaigns F1 | d: adversarial F1 | b: hard negatives merged "
        "| c: singletons merged (not alone) | overall F1 | msgs/s |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        e = r.evaluation
        lines.append(
            f"| {r.name} | {e.parts['a'].f1:.3f} | {e.parts['d'].f1:.3f} "
            f"| {pct(e.hard_negatives_merged)} "
            f"| {pct(e.singletons_merged)} ({pct(e.singletons_not_alone)}) "
            f"| {e.overall.f1:.3f} | {r.rate:,.0f} |"
        )
    return "\n".join(lines)


def detail_table(results: list[MethodResult]) -> str:
    """Pairwise precision / recall / F1 per part and overall."""
    parts = ("a", "b", "c", "d")
    head = "| method | " + " | ".join(f"{p}: P / R / F1" for p in parts) + " | overall P / R / F1 |"
    lines = [head, "|---|" + "---:|" * (len(parts) + 1)]
    for r in results:
        e = r.evaluation
        cells = [
            f"{s.precision:.3f} / {s.recall:.3f} / {s.f1:.3f}"
            for s in (*(e.parts[p] for p in parts), e.overall)
        ]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(results: list[MethodResult]) -> str:
    """Recall on adversarial pairs by trick and campaign pairs by length; hard negatives merged
    by kind."""
    kinds = sorted({k for r in results for k in r.evaluation.kind_recall})
    cols = [f"d recall: {t}" for t in TRICKS] + [f"a recall: {k}" for k in kinds]
    hk = sorted({k for r in results for k in r.evaluation.hard_merged_by_kind})
    cols += [f"b merged: {k}" for k in hk]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in results:
        e = r.evaluation
        cells = [f"{e.trick_recall.get(t, 0):.3f}" for t in TRICKS]
        cells += [f"{e.kind_recall.get(k, 0):.3f}" for k in kinds]
        cells += [pct(e.hard_merged_by_kind.get(k, 0.0)) for k in hk]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(
    results: list[MethodResult], speed: SpeedResult | None, why_no_mailguard: str | None
) -> tuple[str, dict[str, str]]:
    mg = next((r for r in results if r.name == "mailguard"), None)
    verdicts: dict[str, str] = {}
    rows: list[tuple[str, str, str]] = []

    def row(key: str, target: str, measured: str, ok: bool | None) -> None:
        v = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        verdicts[key] = v
        rows.append((target, measured, v))

    if mg is None:
        na = f"mailguard not measured ({why_no_mailguard or 'not selected'})"
        for key, target in (
            ("f1_campaigns", f"F1 on campaign variants (a) >= {TARGET_F1_CAMPAIGN}"),
            ("f1_adversarial", f"F1 on adversarial copies (d) >= {TARGET_F1_ADVERSARIAL}"),
            ("hard_negatives", f"hard negatives (b) merged < {pct(TARGET_HARD_NEG)} of pairs"),
            ("singletons", f"singletons (c) merged < {pct(TARGET_SINGLETONS)} of pairs"),
            ("beats_baselines", "overall F1 above every baseline's"),
        ):
            row(key, target, na, None)
    else:
        e = mg.evaluation
        row(
            "f1_campaigns",
            f"F1 on campaign variants (a) >= {TARGET_F1_CAMPAIGN}",
            f"{e.parts['a'].f1:.4f}",
            e.parts["a"].f1 >= TARGET_F1_CAMPAIGN,
        )
        row(
            "f1_adversarial",
            f"F1 on adversarial copies (d) >= {TARGET_F1_ADVERSARIAL}",
            f"{e.parts['d'].f1:.4f}",
            e.parts["d"].f1 >= TARGET_F1_ADVERSARIAL,
        )
        row(
            "hard_negatives",
            f"hard negatives (b) merged < {pct(TARGET_HARD_NEG)} of pairs",
            f"{pct(e.hard_negatives_merged)} ({e.hard_negative_merged_pairs} of "
            f"{e.hard_negative_pairs} pairs)",
            e.hard_negatives_merged < TARGET_HARD_NEG,
        )
        row(
            "singletons",
            f"singletons (c) merged < {pct(TARGET_SINGLETONS)} of pairs",
            f"{pct(e.singletons_merged)} of {e.singleton_pairs} pairs",
            e.singletons_merged < TARGET_SINGLETONS,
        )
        others = [r for r in results if r is not mg]
        if others:
            best = max(others, key=lambda r: r.evaluation.overall.f1)
            row(
                "beats_baselines",
                "overall F1 above every baseline's",
                f"{e.overall.f1:.4f} vs best baseline {best.name} {best.evaluation.overall.f1:.4f}",
                e.overall.f1 > best.evaluation.overall.f1,
            )
        else:
            row("beats_baselines", "overall F1 above every baseline's", "no baseline ran", None)
    target = f">= {TARGET_SPEED:,.0f} msgs/s on one core, ~10 KB multipart, incl. clustering"
    if speed is None:
        row("speed", target, "not measured", None)
    else:
        row(
            "speed",
            target,
            f"best {speed.best:,.0f}, median {speed.median:,.0f} msgs/s "
            f"({speed.messages} msgs of {speed.mean_bytes / 1024:.1f} KB, {speed.cpu})",
            speed.best >= TARGET_SPEED,
        )
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in rows]
    return "\n".join(lines), verdicts


def corpus_table(counts: dict[str, tuple[int, int]]) -> str:
    lines = ["| part | messages | campaigns |", "|---|---:|---:|"]
    for p, (n, c) in counts.items():
        lines.append(f"| {p}: {PART_NAMES[p]} | {n} | {c} |")
    return "\n".join(lines)
