"""A small fact world of invented countries and cities: facts a pretrained model cannot already know.

Why: to see whether tracing finds the documents that taught a fine-tuned model a fact, the fact
must come from the fine-tuning corpus and nowhere else. The built-in world (`tracestar.world`)
uses real geography, which a pretrained model such as SmolLM2 largely knows before it sees a
single document. Here every subject and object is a made-up name ("The capital of Quorvasta is
Drenholm."), so the model's first-token accuracy before fine-tuning is near zero, and whatever it
knows afterwards it learned from these documents.

The layout follows the built-in world, and so does the file format (`corpus.jsonl`,
`queries.jsonl`, `facts.jsonl`; queries carry `relevant`, `bucket`, `relation`), so `tracestar
eval` reads it as it is:
- relations `capital` and `currency` of invented countries, `city_country` of invented cities
  (the sentence templates of `tracestar.world.facts.RELATIONS`; the first is the query wording);
- each queried fact is stated in 1 to 6 documents (frequency buckets "1", "2-3", "4-10"), the
  first time in the query wording;
- documents are short abstracts about one subject, sometimes with a fact-free filler sentence;
  look-alike countries (same first syllable, never queried), prompt echoes ("The capital of X is
  a common quiz question.", for capitals) and template-only distractors make the ranking non-trivial;
- which documents state a fact is recorded while writing and then re-checked on the text alone
  with the built-in world's own definition (`facts.scan_statements`); a mismatch is an error.

    python bench/invented_world.py --out WORLD_DIR [--seed 0] [--countries 20] [--cities 24]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from tracestar.files import write_jsonl
from tracestar.world.facts import RELATIONS, Fact, frequency_bucket, scan_statements

#: Documents stating one queried fact, drawn per fact: label -> ((lo, hi), weight). Capped at 6
#: (not the built-in world's 13) to keep the corpus a few hundred documents.
COUNTS: dict[str, tuple[tuple[int, int], float]] = {"1": ((1, 1), 0.3), "2-3": ((2, 3), 0.35), "4-10": ((4, 6), 0.35)}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "th", "tr", "st", "sk", "qu", "vr", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "o", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")
_SUFFIX = {
    "country": ("ia", "ar", "esh", "ovia", "asta", "and", "eth"),
    "city": ("holm", "ford", "vik", "grad", "mouth", "ara", "ine"),
    "currency": ("", "et", "a", "in"),
    "other": ("",),
}
_ECHO_ENDINGS = ("a common quiz question.", "something every student learns.", "asked in many exams.")
_GENERIC = ("the old trading company", "the river guild", "the chess club", "the northern league")


@dataclass
class Entity:
    """A document subject: its facts (queried or look-alike) and its fact-free filler sentences."""

    name: str
    facts: list[Fact]
    fillers: list[str]


class NameMaker:
    """Pronounceable invented names, unique across the world; names of one kind start differently,
    so that two answers of the same relation rarely share a first token."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.taken: set[str] = set()
        self.heads: dict[str, set[str]] = {}

    def make(self, kind: str, *, head: str | None = None) -> str:
        """A new name of `kind`; with `head` it starts with that syllable (a look-alike)."""
        for _ in range(10_000):
            syllables = [head] if head else []
            n_syllables = self.rng.choice((1, 2, 2)) if kind in ("country", "city") else 2
            while len(syllables) < n_syllables:
                syllables.append(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS))
            name = ("".join(syllables) + self.rng.choice(_SUFFIX[kind])).capitalize()
            first = name[:3].lower()
            if 5 <= len(name) <= 10 and name not in self.taken and (head or first not in self.heads.setdefault(kind, set())):
                self.taken.add(name)
                self.heads.setdefault(kind, set()).add(first)
                return name
        raise RuntimeError(f"ran out of invented {kind} names")


def _count(rng: random.Random) -> int:
    labels = list(COUNTS)
    label = rng.choices(labels, weights=[COUNTS[b][1] for b in labels])[0]
    lo, hi = COUNTS[label][0]
    return rng.randint(lo, hi)


def _country(names: NameMaker, rng: random.Random, *, head: str | None = None, kind: str = "query") -> Entity:
    name = names.make("country", head=head)
    count = _count if kind == "query" else (lambda r: r.randint(1, 2))
    facts = [
        Fact("capital", name, names.make("city"), count(rng), kind),
        Fact("currency", name, names.make("currency"), count(rng), kind),
    ]
    fillers = [f"{name} has a population of about {rng.randint(2, 90) / 10:.1f} million people.",
               f"{name} is famous for its {rng.choice(('tea', 'glass', 'horses', 'salt', 'lace', 'copper'))}."]
    return Entity(name, facts, fillers)


def _city(names: NameMaker, countries: list[Entity], rng: random.Random) -> Entity:
    name = names.make("city")
    country = rng.choice(countries).name
    fillers = [f"{name} has about {rng.randint(5, 400) * 1000:,} inhabitants.",
               f"{name} lies on the river {names.make('other')}."]
    return Entity(name, [Fact("city_country", name, country, _count(rng), "query")], fillers)


def _entity_docs(entity: Entity, rng: random.Random) -> list[tuple[list[str], list[Fact]]]:
    """max(count) abstracts about `entity`; each fact lands in exactly `count` of them, the first
    time in the query wording, later in random paraphrases."""
    n_docs = max(f.count for f in entity.facts)
    docs: list[tuple[list[str], list[Fact]]] = [([], []) for _ in range(n_docs)]
    for fact in entity.facts:
        relation = RELATIONS[fact.relation]
        for j, slot in enumerate(sorted(rng.sample(range(n_docs), fact.count))):
            template = 0 if j == 0 else rng.randrange(len(relation.templates))
            docs[slot][0].append(relation.sentence(template, fact.subject, fact.obj))
            docs[slot][1].append(fact)
    for sentences, _ in docs:
        rng.shuffle(sentences)
        if rng.random() < 0.5:
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(entity.fillers))
    return docs


def _distractors(facts: list[Fact], rng: random.Random, echo_rate: float, n_template: int) -> list[tuple[list[str], list[Fact]]]:
    """Documents that share a query's words and state no fact."""
    out: list[tuple[list[str], list[Fact]]] = []
    for fact in facts:
        if fact.kind == "query" and fact.relation == "capital" and rng.random() < echo_rate:
            out.append(([f"{RELATIONS[fact.relation].prompt(fact.subject)} {rng.choice(_ECHO_ENDINGS)}"], []))
    for _ in range(n_template):
        relation = RELATIONS[rng.choice(("capital", "currency", "city_country"))]
        text = rng.choice(relation.distractors).format(x=rng.choice(_GENERIC))
        out.append(([text[0].upper() + text[1:]], []))
    return out


def build_invented_world(*, seed: int = 0, countries: int = 20, cities: int = 24, lookalike_rate: float = 0.3,
                         echo_rate: float = 0.3, template_distractors: int = 8
                         ) -> tuple[list[tuple[str, str]], list[Fact], list[dict]]:
    """(documents as (id, text), every fact, query records), the same for the same arguments."""
    rng = random.Random(f"tracestar-invented-world:{seed}:{countries}:{cities}")
    names = NameMaker(rng)
    queried = [_country(names, rng) for _ in range(countries)]
    lookalikes = [_country(names, rng, head=_first_syllable(e.name), kind="lookalike")
                  for e in queried if rng.random() < lookalike_rate]
    towns = [_city(names, queried, rng) for _ in range(cities)]
    entities = queried + lookalikes + towns
    facts = [f for e in entities for f in e.facts]
    drafts = [d for e in entities for d in _entity_docs(e, rng)]
    drafts += _distractors(facts, rng, echo_rate, template_distractors)
    rng.shuffle(drafts)
    docs = []
    for n, (sentences, stated) in enumerate(drafts):
        doc_id = f"d{n:05d}"
        for fact in stated:
            fact.docs.append(doc_id)
        docs.append((doc_id, " ".join(sentences)))
    _verify(docs, facts)
    asked = [f for f in facts if f.kind == "query"]
    rng.shuffle(asked)
    queries = [
        {"id": f"q{n:04d}", "prompt": RELATIONS[f.relation].prompt(f.subject), "target": " " + f.obj,
         "relevant": sorted(f.docs), "bucket": frequency_bucket(f.count), "relation": f.relation}
        for n, f in enumerate(asked)
    ]
    return docs, facts, queries


def _first_syllable(name: str) -> str:
    """The name's leading onset + vowel run (a look-alike shares it): 'Quorvasta' -> 'quo'."""
    low = name.lower()
    i = 0
    while i < len(low) and low[i] not in "aeiouy":
        i += 1
    while i < len(low) and low[i] in "aeiouy":
        i += 1
    return low[:i]


def _verify(docs: list[tuple[str, str]], facts: list[Fact]) -> None:
    """Refuse a world whose recorded fact -> documents map differs from what the text states."""
    found = scan_statements(docs, facts)
    for i, fact in enumerate(facts):
        if sorted(found.get(i, [])) != sorted(fact.docs) or len(fact.docs) != fact.count:
            raise RuntimeError(f"invented world is inconsistent for {fact.relation}({fact.subject!r}): "
                               f"recorded {sorted(fact.docs)}, stated in {sorted(found.get(i, []))}")


def write_invented_world(out_dir: str | Path, **kwargs) -> dict[str, Path]:
    """Write corpus.jsonl, queries.jsonl, facts.jsonl (as `tracestar world` does); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs, facts, queries = build_invented_world(**kwargs)
    rows = {
        "corpus": [{"id": i, "text": t} for i, t in docs],
        "queries": queries,
        "facts": [{"relation": f.relation, "subject": f.subject, "object": f.obj, "kind": f.kind, "count": f.count,
                   "bucket": frequency_bucket(f.count), "docs": sorted(f.docs)} for f in facts],
    }
    paths = {}
    for name, records in rows.items():
        path = out / f"{name}.jsonl"
        write_jsonl(path, records)
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write a small world of invented facts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--countries", type=int, default=20)
    parser.add_argument("--cities", type=int, default=24)
    args = parser.parse_args(argv)
    paths = write_invented_world(args.out, seed=args.seed, countries=args.countries, cities=args.cities)
    for name, path in paths.items():
        print(f"{name:8} {path}  ({sum(1 for _ in open(path, encoding='utf-8'))} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
