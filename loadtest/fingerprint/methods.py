"""The methods compared: mailguard's fingerprint and clustering, and established baselines.

Every method sees the corpus in stream order and puts each message in a cluster at once
(online), never looking ahead.  The baselines get the shared decoder's visible text (see
decode.py); mailguard gets the raw message and its envelope recipients, as in the gate.

Pairwise-score baselines (ssdeep, TLSH, Nilsimsa, simhash) cluster the same way: a message joins
the cluster of the first earlier message scoring at or past the method's customary threshold,
else starts a new one.  MinHash LSH does the same among the candidates its LSH index returns.
A threshold can be overridden on the command line: ``--methods tlsh:40,minhash:0.8``.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from loadtest.fingerprint.corpus import Labelled

DEFAULT_METHODS = ("mailguard", "minhash", "ssdeep", "tlsh", "nilsimsa", "simhash", "exact")
WINDOW = 7 * 86400.0  # longer than any corpus stream: the window never expires a cluster here


class Unavailable(Exception):
    """The method's library is missing; the message says why."""


class Method(ABC):
    name: str = ""
    uses_text = True  # gets the shared decoder's text (else the raw message)

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = threshold

    @property
    @abstractmethod
    def description(self) -> str:
        """Library, parameters and threshold, for the report."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every message seen."""

    @abstractmethod
    def assign(self, msg: Labelled, text: str) -> str:
        """The cluster id of msg (text: its decoded visible text, if uses_text)."""


# --------------------------------------------------------------------------- mailguard


class Mailguard(Method):
    name = "mailguard"
    uses_text = False

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__(threshold)
        try:
            from mailguard.core import fingerprint as fpmod
        except Exception as exc:  # not written yet, or broken while being written
            raise Unavailable(f"mailguard.core.fingerprint not importable: {exc!r}") from exc
        missing = [
            n
            for n in ("fingerprint", "similarity", "SIMILARITY_THRESHOLD", "ClusterIndex")
            if not hasattr(fpmod, n)
        ]
        if missing:
            raise Unavailable(f"mailguard.core.fingerprint lacks {', '.join(missing)}")
        self.mod: Any = fpmod
        self.index: Any = None
        self.reset()

    @property
    def description(self) -> str:
        thr = getattr(self.mod, "SIMILARITY_THRESHOLD", "?")
        return f"mailguard.core.fingerprint: ClusterIndex(window={WINDOW:.0f}) (threshold {thr})"

    def reset(self) -> None:
        self.index = self.mod.ClusterIndex(WINDOW)

    def assign(self, msg: Labelled, text: str) -> str:
        fp = self.mod.fingerprint(msg.raw, msg.recipients)
        return str(self.index.assign(fp, msg.now))


# --------------------------------------------------------------------------- exact hash


class Exact(Method):
    name = "exact"

    @property
    def description(self) -> str:
        return "SHA-256 of the decoded visible text"

    def reset(self) -> None:
        self.seen: dict[bytes, str] = {}

    def assign(self, msg: Labelled, text: str) -> str:
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        return self.seen.setdefault(key, f"x{len(self.seen)}")


# --------------------------------------------------------------------------- pairwise scores


class Pairwise(Method):
    """Online first-match clustering over a pairwise score."""

    default_threshold: float = 0.0
    library = ""

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__(self.default_threshold if threshold is None else threshold)
        self._load()
        self.reset()

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def digest(self, text: str) -> Any:
        """The method's digest, or None when it cannot hash the text (too short)."""

    @abstractmethod
    def similar(self, a: Any, b: Any) -> bool: ...

    def reset(self) -> None:
        self.digests: list[tuple[Any, str]] = []
        self.exact: dict[str, str] = {}
        self.n = 0

    def assign(self, msg: Labelled, text: str) -> str:
        self.n += 1
        d = self.digest(text)
        if d is None:
            # Too short or too uniform to hash: fall back to the exact text.
            return self.exact.setdefault(text, f"{self.name}-e{self.n}")
        similar = self.similar
        for other, cluster in self.digests:
            if similar(d, other):
                self.digests.append((d, cluster))
                return cluster
        cluster = f"{self.name}-{self.n}"
        self.digests.append((d, cluster))
        return cluster


class Ssdeep(Pairwise):
    name = "ssdeep"
    default_threshold = 50

    def _load(self) -> None:
        import importlib

        lib: Any = None
        for modname, label in (("ssdeep", "ssdeep"), ("ppdeep", "ppdeep (pure Python)")):
            try:
                lib = importlib.import_module(modname)
            except Exception:
                continue
            self.library = label
            break
        if lib is None:
            raise Unavailable("neither ssdeep (pip: ssdeep-wheel or ssdeep) nor ppdeep importable")
        self._hash: Callable[[bytes], str] = lib.hash
        self._compare: Callable[[str, str], int] = lib.compare

    @property
    def description(self) -> str:
        return f"{self.library}: compare score >= {self.threshold:g} (0-100)"

    def digest(self, text: str) -> Any:
        return self._hash(text.encode("utf-8"))

    def similar(self, a: Any, b: Any) -> bool:
        return self._compare(a, b) >= (self.threshold or 0)


class Tlsh(Pairwise):
    name = "tlsh"
    default_threshold = 100

    def _load(self) -> None:
        try:
            import tlsh
        except Exception as exc:
            raise Unavailable(f"tlsh (py-tlsh) not importable: {exc!r}") from exc
        self._hash: Callable[[bytes], str] = tlsh.hash
        self._diff: Callable[[str, str], int] = tlsh.diff

    @property
    def description(self) -> str:
        return (
            f"py-tlsh: distance <= {self.threshold:g} (Oliver et al. 2013: < 100 detects 94.5%);"
            " texts it cannot hash (< 50 bytes) by exact text"
        )

    def digest(self, text: str) -> Any:
        h = self._hash(text.encode("utf-8"))
        return None if not h or h == "TNULL" else h

    def similar(self, a: Any, b: Any) -> bool:
        return self._diff(a, b) <= (self.threshold or 0)


class Nilsimsa(Pairwise):
    name = "nilsimsa"
    default_threshold = 54

    def _load(self) -> None:
        try:
            from nilsimsa import Nilsimsa as N
        except Exception as exc:
            raise Unavailable(f"nilsimsa not importable: {exc!r}") from exc
        self._cls: Any = N

    @property
    def description(self) -> str:
        return (
            f"nilsimsa: score > {self.threshold:g} of 128 (Damiani et al. 2004);"
            " score = 128 - differing bits"
        )

    def digest(self, text: str) -> Any:
        if not text:
            return None
        return int(self._cls(text.encode("utf-8")).hexdigest(), 16)

    def similar(self, a: Any, b: Any) -> bool:
        # Same as nilsimsa.compare_digests(a, b) > threshold, on ints.
        return bool(128 - (a ^ b).bit_count() > (self.threshold or 0))


class Simhash(Pairwise):
    name = "simhash"
    default_threshold = 3

    def _load(self) -> None:
        try:
            from simhash import Simhash as S
        except Exception as exc:
            raise Unavailable(f"simhash not importable: {exc!r}") from exc

        import numpy as np

        class Weighted(S):  # type: ignore[misc,valid-type]
            # The library multiplies a feature's bits (uint8) by its weight: under numpy 2 a
            # weight over 255 (a 4-gram that often, in a long text) raises OverflowError.
            @staticmethod
            def _bitarray_from_bytes(b: bytes) -> Any:
                return np.unpackbits(np.frombuffer(b, dtype=">B")).astype(np.int64)

        self._cls: Any = Weighted

    @property
    def description(self) -> str:
        return (
            f"simhash (64-bit, its default char 4-gram features): Hamming distance <= "
            f"{self.threshold:g} (Manku et al. 2007)"
        )

    def digest(self, text: str) -> Any:
        if not text:
            return None
        return int(self._cls(text).value)

    def similar(self, a: Any, b: Any) -> bool:
        return bool((a ^ b).bit_count() <= (self.threshold or 0))


# --------------------------------------------------------------------------- MinHash LSH

_WORDS = re.compile(r"\w+")


def word_shingles(text: str, k: int = 3) -> set[bytes]:
    words = _WORDS.findall(text.lower())
    if len(words) < k:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)}


class MinHashLSH(Method):
    name = "minhash"
    num_perm = 128
    shingle = 3

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__(0.5 if threshold is None else threshold)
        try:
            import datasketch
        except Exception as exc:
            raise Unavailable(f"datasketch not importable: {exc!r}") from exc
        self.ds: Any = datasketch
        self.reset()

    @property
    def description(self) -> str:
        return (
            f"datasketch MinHashLSH: {self.num_perm} permutations, word {self.shingle}-shingles,"
            f" estimated Jaccard >= {self.threshold:g}"
        )

    def reset(self) -> None:
        self.lsh: Any = self.ds.MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self.items: dict[int, tuple[Any, str]] = {}
        self.empty: str | None = None
        self.n = 0

    def assign(self, msg: Labelled, text: str) -> str:
        self.n += 1
        sh = word_shingles(text, self.shingle)
        if not sh:
            if self.empty is None:
                self.empty = f"m{self.n}"
            return self.empty
        m = self.ds.MinHash(num_perm=self.num_perm)
        m.update_batch(sh)
        best: tuple[int, str] | None = None
        thr = self.threshold or 0.0
        for key in self.lsh.query(m):
            other, cluster = self.items[key]
            if (best is None or key < best[0]) and m.jaccard(other) >= thr:
                best = (key, cluster)
        cluster = best[1] if best else f"m{self.n}"
        self.lsh.insert(self.n, m)
        self.items[self.n] = (m, cluster)
        return cluster


REGISTRY: dict[str, type[Method]] = {
    "mailguard": Mailguard,
    "minhash": MinHashLSH,
    "ssdeep": Ssdeep,
    "tlsh": Tlsh,
    "nilsimsa": Nilsimsa,
    "simhash": Simhash,
    "exact": Exact,
}


def make(spec: str) -> Method:
    """A method from ``name`` or ``name:threshold``; raises Unavailable or ValueError."""
    name, _, thr = spec.partition(":")
    cls = REGISTRY.get(name.strip())
    if cls is None:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(REGISTRY)})")
    m = cls(float(thr) if thr else None)
    if thr:
        m.name = f"{m.name}:{thr}"
    return m
