"""``python -m loadtest.fingerprint``: the fingerprint benchmark.  See README.md."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

from loadtest.fingerprint import corpus as corpus_mod
from loadtest.fingerprint import decode, methods, report, sources, speed
from loadtest.fingerprint.evaluate import evaluate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.fingerprint",
        description="Clustering quality and speed: mailguard's fingerprint vs fuzzy hashes.",
    )
    ap.add_argument(
        "--size",
        type=float,
        default=1.0,
        help="corpus scale: 1.0 is ~1,100 messages (pairwise baselines grow quadratically)",
    )
    ap.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    ap.add_argument(
        "--methods",
        default=",".join(methods.DEFAULT_METHODS),
        help="comma-separated, each NAME or NAME:THRESHOLD (default: %(default)s)",
    )
    ap.add_argument(
        "--decoder",
        choices=("auto", "own", "mailguard"),
        default="own",
        help="text given to the baselines: this package's visible-text decoder (own, default), "
        "or mailguard's MIME extraction (mailguard; auto: it when importable, else own)",
    )
    ap.add_argument(
        "--speed-messages",
        type=int,
        default=2000,
        help="size of the ~10 KB multipart set for the speed target (0: skip)",
    )
    ap.add_argument("--speed-repeats", type=int, default=3, help="timed passes (default 3)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="write all figures as JSON")
    ap.add_argument(
        "--dump",
        type=Path,
        metavar="DIR",
        help="also write the corpus as DIR/NNNNN.eml (stream order) and DIR/labels.tsv",
    )
    args = ap.parse_args(argv)
    if args.size <= 0:
        ap.error("--size must be > 0")
    args.methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    for spec in args.methods:
        name, _, thr = spec.partition(":")
        if name not in methods.REGISTRY:
            ap.error(f"unknown method {name!r} (known: {', '.join(methods.REGISTRY)})")
        try:
            float(thr or 0)
        except ValueError:
            ap.error(f"bad threshold in {spec!r}")
    return args


def dump(corpus: corpus_mod.Corpus, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = ["file\tpart\tcampaign\tkind\tshape\ttricks\trecipients\tnow"]
    for m in corpus.messages:
        name = f"{m.index:05d}.eml"
        (out / name).write_bytes(m.raw)
        rows.append(
            f"{name}\t{m.part}\t{m.campaign}\t{m.kind}\t{m.shape}\t{','.join(m.tricks)}\t"
            f"{','.join(m.recipients)}\t{m.now:.3f}"
        )
    (out / "labels.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    print("# mailguard fingerprint benchmark\n")
    print(f"python {platform.python_version()}, seed {args.seed}, size {args.size:g}")

    t0 = time.perf_counter()
    pools = sources.collect()
    print(
        f"{pools.summary()} (pool digest {sources.digest(pools)}, {time.perf_counter() - t0:.1f} s)"
    )

    t0 = time.perf_counter()
    corpus = corpus_mod.build_corpus(pools, seed=args.seed, size=args.size)
    msgs = corpus.messages
    print(
        f"corpus: {len(msgs)} messages (digest {corpus.digest()}) built in "
        f"{time.perf_counter() - t0:.1f} s",
        end="",
    )
    print(f"; texts reused after a pool ran out: {corpus.reused}" if corpus.reused else "")
    print()
    print(report.corpus_table(corpus.counts()))
    kinds = Counter(f"{m.part}:{m.kind}" for m in msgs)
    shapes = Counter(m.shape for m in msgs)
    print("\nkinds: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    print("MIME shapes: " + ", ".join(f"{k} {n}" for k, n in sorted(shapes.items())))
    if args.dump:
        dump(corpus, args.dump)
        print(f"corpus written to {args.dump}/ (labels.tsv)")

    dec_name, dec = decode.choose(args.decoder)
    t0 = time.perf_counter()
    texts = [dec(m.raw) for m in msgs]
    decode_s = time.perf_counter() - t0
    print(
        f"\nbaselines' text: {dec_name} ({len(msgs) / decode_s:,.0f} msgs/s,"
        " counted in their msgs/s)"
    )

    results: list[report.MethodResult] = []
    skipped: dict[str, str] = {}
    mg_method: methods.Method | None = None
    print("\n## Methods\n")
    for spec in args.methods:
        try:
            meth = methods.make(spec)
        except methods.Unavailable as exc:
            skipped[spec] = str(exc)
            print(f"- {spec}: SKIPPED: {exc}")
            continue
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        meth.reset()
        assign = meth.assign
        t0 = time.perf_counter()
        try:
            clusters = [assign(m, t) for m, t in zip(msgs, texts, strict=True)]
        except Exception as exc:  # a method that crashes is reported, not fatal
            skipped[spec] = f"crashed: {exc!r}"
            print(f"- {spec}: FAILED while clustering: {exc!r}")
            continue
        secs = time.perf_counter() - t0 + (decode_s if meth.uses_text else 0.0)
        ev = evaluate(msgs, clusters)
        results.append(
            report.MethodResult(
                meth.name, meth.description, ev, secs, len(msgs), len(set(clusters))
            )
        )
        if spec.split(":")[0] == "mailguard":
            mg_method = meth
        print(f"- {meth.name}: {meth.description} ({secs:.1f} s, {len(set(clusters))} clusters)")

    speed_res = None
    if args.speed_messages > 0 and mg_method is not None:
        t0 = time.perf_counter()
        sset = corpus_mod.build_speed_set(pools, args.seed, args.speed_messages)
        print(f"\nspeed set: {len(sset)} messages built in {time.perf_counter() - t0:.1f} s")
        try:
            speed_res = speed.measure(mg_method, sset, repeats=max(1, args.speed_repeats))
        except Exception as exc:
            print(f"speed measurement failed: {exc!r}")

    print("\n## Results\n")
    print(report.main_table(results))
    print("\nPairwise precision / recall / F1 by part:\n")
    print(report.detail_table(results))
    print("\nRecall by adversarial trick and campaign length; hard negatives merged by kind:\n")
    print(report.breakdown_table(results))
    if speed_res is not None:
        passes = ", ".join(f"{p:,.0f}" for p in speed_res.passes)
        print(
            f"\nSpeed (mailguard, fingerprint + ClusterIndex.assign, {speed_res.cpu}): "
            f"{speed_res.messages} messages of {speed_res.mean_bytes / 1024:.1f} KB on average; "
            f"passes {passes} msgs/s"
        )
    print("\n## Targets (issue 3)\n")
    why = skipped.get("mailguard")
    table, verdicts = report.targets_table(results, speed_res, why)
    print(table)
    total = time.perf_counter() - t_start
    print(f"\n(total {total:.0f} s)")

    if args.json:
        payload = {
            "seed": args.seed,
            "size": args.size,
            "python": platform.python_version(),
            "pool_digest": sources.digest(pools),
            "corpus_digest": corpus.digest(),
            "pool_stats": dict(pools.stats),
            "corpus": {p: {"messages": n, "campaigns": c} for p, (n, c) in corpus.counts().items()},
            "decoder": dec_name,
            "methods": [r.as_dict() for r in results],
            "skipped": skipped,
            "speed": speed_res.as_dict() if speed_res else None,
            "targets": verdicts,
            "seconds": total,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
