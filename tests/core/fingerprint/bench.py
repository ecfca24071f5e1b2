"""Throughput of fingerprinting plus cluster assignment, on one core (not a test: no asserts).

Run from the repository root::

    .venv/bin/python -m tests.core.fingerprint.bench [--messages 3000] [--rounds 3]

Messages are about 10 KB: multipart/alternative with a quoted-printable text part and a
base64 HTML part (inline styles, a hidden preheader, tracking links), personalized copies of
a few campaigns plus unrelated letters.  Prints the best round's messages per second and a
per-stage breakdown for one message.
"""

from __future__ import annotations

import argparse
import random
import time
import timeit

from mailguard.core.fingerprint import ClusterIndex, fingerprint, mime, normalize, sketch
from tests.core.fingerprint.messages import (
    FIRST_NAMES,
    LAST_NAMES,
    PARAGRAPHS,
    Letter,
    campaign_letter,
    render,
)


def corpus(count: int, seed: int = 1) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    campaigns = [tuple(rng.sample(PARAGRAPHS, 12)) for _ in range(20)]  # overlapping on purpose
    out = []
    for _ in range(count):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        token = "".join(rng.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(20))
        letter = campaign_letter(rng.choice(campaigns), first, last, token, rng.randrange(10**8))
        letter = Letter(
            **{**letter.__dict__, "links": (*letter.links, ("Shop", f"https://t.example/{token}"))}
        )
        message = render(letter, "alternative").replace(
            b"<td style='padding:0'>",
            b"<td style='padding:0'><div style='display:none;max-height:0;overflow:hidden'>"
            + token.encode()
            + b" preview</div>",
            1,
        )
        out.append((message, f"{first}.{last}@mail.example".lower()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    messages = corpus(args.messages)
    sizes = sorted(len(m) for m, _ in messages)
    print(f"{len(messages)} messages, median size {sizes[len(sizes) // 2]} bytes")
    chunk = 100
    rates: list[float] = []
    for _ in range(args.rounds):
        index = ClusterIndex(window=86400.0)
        start, cpu = time.perf_counter(), time.process_time()
        for first in range(0, len(messages), chunk):
            began = time.process_time()
            for number in range(first, min(first + chunk, len(messages))):
                message, recipient = messages[number]
                index.assign(fingerprint(message, [recipient]), float(number))
            rates.append(min(chunk, len(messages) - first) / (time.process_time() - began))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        clusters = len(index.alive(float(len(messages))))
        print(
            f"  round: {len(messages) / cpu:5.0f} messages/s of CPU time "
            f"({len(messages) / wall:.0f}/s wall), {clusters} clusters"
        )
    rates.sort()
    print(
        f"per {chunk}-message chunk: median {rates[len(rates) // 2]:.0f}/s, "
        f"best {rates[-1]:.0f}/s (the machine may be shared: the best chunk is the least disturbed)"
    )
    message, recipient = messages[0]
    extracted = mime.extract(message)
    exclude = normalize.encode_terms(
        normalize.recipient_terms((*extracted.names, *extracted.addresses, recipient))
    )
    words, _ = normalize.body_words(extracted.text, exclude)
    values = sketch._body_values(words)
    fp = fingerprint(message, [recipient])
    index = ClusterIndex(window=86400.0)
    index.assign(fp, 0.0)
    stages = {
        "mime.extract (incl. html)": lambda: mime.extract(message),
        "normalize.body_words": lambda: normalize.body_words(extracted.text, exclude),
        "word hashes and shingles": lambda: sketch._body_values(words),
        "one permutation lanes": lambda: sketch._lanes(list(values)),
        "ClusterIndex.assign": lambda: index.assign(fp, 1.0),
        "all": lambda: index.assign(fingerprint(message, [recipient]), 1.0),
    }
    for name, stage in stages.items():
        timer = timeit.Timer(stage, timer=time.process_time)
        seconds = min(timer.repeat(number=200, repeat=5)) / 200
        print(f"  {name:28s} {seconds * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
