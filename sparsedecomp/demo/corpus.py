"""The demo corpus: text that ships with every Python interpreter.

Prose: the interpreter's help topics (``pydoc_data.topics.topics``, the language reference as plain text).
Code: standard-library source files (the mix echoes gelu-2l's C4 + code). Documents are named, ordered and split
by hashes of their names only, so the same interpreter always yields the same corpus and the same split.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from ..errors import InputError

# Directories left out: tests (huge, repetitive), data tables (``encodings``), the topics module itself (it is
# the prose part already), vendored or GUI packages that add little language.
_SKIP_PARTS = frozenset(
    {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "encodings", "pydoc_data",
     "__pycache__", "turtledemo", "ensurepip", "tkinter", "distutils"}
)


@dataclass(frozen=True)
class Document:
    name: str
    kind: str  # "prose" or "code"
    text: str


@dataclass(frozen=True)
class Corpus:
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]

    def fingerprint(self) -> str:
        """sha256 over names and texts of both splits (recorded in the build report)."""
        h = hashlib.sha256()
        for split in (self.train, self.heldout):
            for doc in split:
                h.update(doc.name.encode())
                h.update(b"\0")
                h.update(doc.text.encode())
                h.update(b"\1")
            h.update(b"\2")
        return h.hexdigest()

    def heldout_texts(self, max_chars_per_document: int | None = None) -> list[str]:
        """Held-out texts, each cut to its first ``max_chars_per_document`` characters (``None``: whole).

        The cap keeps held-out statistics representative: without it one table-like file (``html/entities.py``,
        75k characters of entity names) made up over a third of the held-out tokens and decided which heads
        looked useful."""
        if max_chars_per_document is not None and max_chars_per_document < 1:
            raise InputError(f"max_chars_per_document must be a positive int or None, got {max_chars_per_document}")
        return [d.text[:max_chars_per_document] for d in self.heldout]

    def stats(self, max_heldout_chars_per_document: int | None = None) -> dict:
        def chars(docs, kind=None):
            return sum(len(d.text) for d in docs if kind is None or d.kind == kind)

        return {
            "train_documents": len(self.train),
            "heldout_documents": len(self.heldout),
            "train_chars_prose": chars(self.train, "prose"),
            "train_chars_code": chars(self.train, "code"),
            "heldout_chars": chars(self.heldout),
            "heldout_chars_used": sum(len(t) for t in self.heldout_texts(max_heldout_chars_per_document)),
        }


def _hash(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")


def prose_documents() -> list[Document]:
    """One document per pydoc help topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [Document(f"topics/{key}", "prose", topics[key]) for key in sorted(topics)]


def code_documents(stdlib: Path | None = None) -> list[Document]:
    """Standard-library ``.py`` files (outside :data:`_SKIP_PARTS`), sorted by relative path."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_PARTS or part.startswith("config-") for part in rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(Document(f"stdlib/{rel.as_posix()}", "code", text))
    return docs


def _take(docs: list[Document], budget: int | None, seed: int) -> list[Document]:
    """Documents in a fixed pseudo-random (name-hash) order until ``budget`` characters are reached."""
    ordered = sorted(docs, key=lambda d: _hash(d.name, seed))
    if budget is None:
        return ordered
    out, total = [], 0
    for doc in ordered:
        if total >= budget:
            break
        out.append(doc)
        total += len(doc.text)
    return out


def build_corpus(*, code_char_budget: int | None, prose_char_budget: int | None, heldout_every: int, seed: int = 0) -> Corpus:
    """Prose + code documents, split into train / held-out by name hash (independent of the budgets' order)."""
    if heldout_every < 2:
        raise InputError(f"heldout_every must be >= 2, got {heldout_every}")
    docs = _take(prose_documents(), prose_char_budget, seed) + _take(code_documents(), code_char_budget, seed)
    # Interleave prose and code in the training stream (hash order) so every batch holds both.
    docs.sort(key=lambda d: _hash("order:" + d.name, seed))
    heldout = tuple(d for d in docs if _hash("split:" + d.name, seed) % heldout_every == 0)
    train = tuple(d for d in docs if _hash("split:" + d.name, seed) % heldout_every != 0)
    if not train or not heldout:
        raise InputError("corpus split left an empty side; raise the character budgets")
    return Corpus(train=train, heldout=heldout)
