"""The world's relations, the sentences that state a fact, and finding those sentences in text.

Ground truth must not depend on how documents were generated: `scan_statements` looks only at the
text, so the world builder can check that the documents it recorded for a fact are exactly the
documents that state it, and a user's own corpus can be scanned the same way.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from tracestar.world.facts import Fact


@dataclass(frozen=True)
class Relation:
    """A relation's sentence templates (`{s}` subject, `{o}` object); the first is the query wording.

    `distractors` use the relation's wording without stating any fact: `{x}` is filled with a
    generic noun phrase, so they match the prompt's words but never answer a query.
    """

    name: str
    templates: tuple[str, ...]
    distractors: tuple[str, ...]

    def sentence(self, index: int, subject: str, obj: str) -> str:
        """One rendered statement of (subject, relation, obj)."""
        return self.templates[index].format(s=subject, o=obj)

    def sentences(self, subject: str, obj: str) -> list[str]:
        """Every rendering of the fact: a document states it iff it contains one of these."""
        return [self.sentence(i, subject, obj) for i in range(len(self.templates))]

    def prompt(self, subject: str) -> str:
        """The query prompt: the query wording cut right before the object (no trailing space)."""
        head = self.templates[0].split("{o}")[0]
        return head.format(s=subject).rstrip()


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "capital",
            (
                "The capital of {s} is {o}.",
                "{o} is the capital of {s}.",
                "The seat of government of {s} is in {o}.",
                "The capital city of {s} is {o}.",
            ),
            ("The capital of {x} is hard to estimate.", "{x} is the capital of the region's trade."),
        ),
        Relation(
            "continent",
            (
                "{s} is a country in {o}.",
                "{s} is located in {o}.",
                "{s} lies on the continent of {o}.",
                "The country of {s} is part of {o}.",
            ),
            ("{x} is a country in name only.", "{x} lies on the continent of dreams."),
        ),
        Relation(
            "currency",
            (
                "The currency of {s} is the {o}.",
                "{s} uses the {o} as its currency.",
                "In {s}, people pay with the {o}.",
                "The official currency of {s} is the {o}.",
            ),
            ("The currency of {x} is trust.", "In {x}, people pay with favours."),
        ),
        Relation(
            "city_country",
            (
                "{s} is a city in {o}.",
                "The city of {s} lies in {o}.",
                "{s} is an urban centre in {o}.",
                "{s} is a town in the country of {o}.",
            ),
            ("{x} is a city in a popular novel.", "The city of {x} lies in ruins."),
        ),
        Relation(
            "city_state",
            (
                "The US city of {s} is in the state of {o}.",
                "{s}, a city in the United States, belongs to the state of {o}.",
                "The city of {s} is found in the US state of {o}.",
                "{s} is a US city in the state of {o}.",
            ),
            ("The US city of {x} is in the state of flux.", "{x} is a US city in the state of decline."),
        ),
        Relation(
            "county_state",
            (
                "{s} is a county in the state of {o}.",
                "{s} is one of the counties of {o}.",
                "The county called {s} lies in the US state of {o}.",
                "{s} is a US county in {o}.",
            ),
            ("{x} is a county in the state of denial.", "{x} is one of the counties of a board game."),
        ),
    )
}


_SENTENCE_START = re.compile(r"\. ")


def sentence_starts(text: str) -> Iterator[int]:
    """Positions where a sentence may begin: the start of the text and right after ". "."""
    yield 0
    for m in _SENTENCE_START.finditer(text):
        yield m.end()


def states(text: str, sentence: str) -> bool:
    """Whether `text` states `sentence` (a rendered fact) as a sentence of its own."""
    return any(text.startswith(sentence, pos) for pos in sentence_starts(text))


def _key(text: str, pos: int) -> tuple[str, ...]:
    return tuple(text[pos: pos + 200].split()[:4])


def scan_statements(docs: Iterable[tuple[str, str]], facts: list[Fact]) -> dict[int, list[str]]:
    """For each fact (by position in `facts`), the ids of the documents that state it.

    Independent of how the documents were generated: it looks only at the text, so it can tell
    whether the recorded ground truth is exact. Renderings are indexed by their first four words
    to keep the scan linear in the corpus size.
    """
    index: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for i, fact in enumerate(facts):
        for s in fact.sentences:
            index[_key(s, 0)].append((s, i))
    found: dict[int, list[str]] = defaultdict(list)
    for doc_id, text in docs:
        hits = set()
        for pos in sentence_starts(text):
            for s, i in index.get(_key(text, pos), ()):
                if text.startswith(s, pos):
                    hits.add(i)
        for i in sorted(hits):
            found[i].append(doc_id)
    return found
