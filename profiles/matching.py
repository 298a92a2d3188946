"""Which image region a generated token reads: the three matching rules of ``sparsemm profile --match``.

* ``official`` — upstream's rule: the raw tokenizer piece (``convert_ids_to_tokens``) must occur, as a substring,
  in exactly one box's text. With SentencePiece, word-initial pieces carry ``▁`` and never match.
* ``decoded`` — the token decoded to text with surrounding whitespace stripped (empty → no credit) must occur in
  exactly one box's text. The default for real tokenizers.
* ``aligned`` — glyph alignment for character-level models: the generated characters are walked along the
  expected text (boxes in order, whitespace skipped); each correctly read character credits its own glyph box.
  Scoring of an image stops at the first misread character.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsemm.profiles.probe_data import Box, Probe

MATCH_RULES = ("official", "decoded", "aligned")


class Matcher:
    """Per-image matcher: ``region(token_id)`` is the list of boxes the token reads, or None (no credit)."""

    def region(self, token_id: int) -> list[Box] | None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class SubstringMatcher(Matcher):
    probe: Probe
    tokenizer: object
    decoded: bool

    def region(self, token_id: int) -> list[Box] | None:
        if self.decoded:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=True).strip()
        else:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not piece:
            return None
        hits = [b for b in self.probe.boxes if piece in b.text]
        return [hits[0].box] if len(hits) == 1 else None


class AlignedMatcher(Matcher):
    """Walks the generated text along the probe's characters; needs per-character boxes (else word boxes)."""

    def __init__(self, probe: Probe, tokenizer: object):
        self.tokenizer = tokenizer
        self.expected: list[tuple[str, Box]] = []
        for b in probe.boxes:
            chars = b.chars or (b.box,) * len(b.text)
            self.expected += [(ch, box) for ch, box in zip(b.text, chars) if not ch.isspace()]
        self.cursor = 0
        self.failed = False

    def region(self, token_id: int) -> list[Box] | None:
        if self.failed:
            return None
        text = "".join(self.tokenizer.decode([token_id], skip_special_tokens=True).split())
        if not text:
            return None
        want = self.expected[self.cursor : self.cursor + len(text)]
        if "".join(ch for ch, _ in want) != text:
            self.failed = True
            return None
        self.cursor += len(text)
        return [box for _, box in want]


def make_matcher(rule: str, probe: Probe, tokenizer: object) -> Matcher:
    if rule == "aligned":
        return AlignedMatcher(probe, tokenizer)
    if rule in ("official", "decoded"):
        return SubstringMatcher(probe, tokenizer, decoded=rule == "decoded")
    raise ValueError(f"unknown match rule {rule!r}; choose one of {', '.join(MATCH_RULES)}")
