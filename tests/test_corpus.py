"""Corpus and query readers: formats, default ids, renamed fields, one-line errors."""

from __future__ import annotations

import json

import pytest

from tracestar.corpus import iter_documents, read_queries, validate_corpus
from tracestar.errors import InputError

ROWS = [{"body": "first text", "key": "a"}, {"body": "second text", "key": "b"}]


def test_jsonl_default_ids_are_line_numbers(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    docs = list(iter_documents(p))
    assert [(d.id, d.text, d.line) for d in docs] == [("0", "one", 1), ("1", "two", 3)]


def test_parquet_with_renamed_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    docs = list(iter_documents(p, text_field="body", id_field="key"))
    assert [(d.id, d.text) for d in docs] == [("a", "first text"), ("b", "second text")]
    with pytest.raises(InputError, match=r"c.parquet:1: field 'text': missing"):
        validate_corpus(p)


def test_hf_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d))
    docs = list(iter_documents(d, text_field="body", id_field="key"))
    assert [(d.id, d.text) for d in docs] == [("a", "first text"), ("b", "second text")]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": 5}\n', "c.jsonl:1: field 'text': expected a string, got int"),
        ('[1, 2]\n', "c.jsonl:1: expected a JSON object, got list"),
        ('{"text": "ok"}\n{"text": "x", "id": ["a"]}\n', "c.jsonl:2: field 'id': expected a string, got list"),
        ("", "c.jsonl: no documents"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, content, message):
    p = tmp_path / "c.jsonl"
    p.write_text(content)
    with pytest.raises(InputError) as err:
        validate_corpus(p)
    assert str(err.value).endswith(message)


def test_queries_keep_extra_fields(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"id": "q", "prompt": "", "target": " x", "relevant": ["a"], "bucket": "1"}) + "\n")
    (q,) = read_queries(p)
    assert (q.id, q.prompt, q.target, q.extra) == ("q", "", " x", {"relevant": ["a"], "bucket": "1"})


def test_bad_bytes_and_json_messages_name_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes('\ufeff{"text": "one"}\n'.encode() + b'{"text": "tw\xe9"}\n')  # a BOM is fine, latin-1 is not
    with pytest.raises(InputError) as err:
        validate_corpus(p)
    assert str(err.value) == f"{p}:2: not valid UTF-8 (byte 0xe9 at column 13)"
    p.write_text('{"text": "one"}\n{"text": "two}\n')
    with pytest.raises(InputError) as err:
        validate_corpus(p)
    assert str(err.value) == f"{p}:2: not valid JSON (Unterminated string starting at column 10)"
    q = tmp_path / "q.jsonl"
    q.write_bytes(b'{"prompt": "a", "target": "\xff"}\n')
    with pytest.raises(InputError, match=r"q.jsonl:1: not valid UTF-8"):
        read_queries(q)


def test_a_query_too_long_for_the_window_loses_its_oldest_prompt_tokens():
    import tiny

    from tracestar.batching import TargetTooLong, encode_query

    tok = tiny.make_tokenizer()
    prompt = " ".join(["city"] * 10 + ["the", "capital", "of", "france", "is"])  # 15 tokens
    ex = encode_query(tok, prompt, " paris madrid", 0, max_length=8)
    target = tok(" paris madrid", add_special_tokens=False)["input_ids"]
    assert ex.truncated and len(ex.ids) == 8 and ex.ids[-2:] == target and ex.loss_from == 6
    assert tok.decode(ex.ids[:6]) == " city the capital of france is"  # the prompt's last 6 tokens
    assert encode_query(tok, prompt, " paris", 0, max_length=64).ids[: 15] == tok(prompt)["input_ids"]
    with pytest.raises(TargetTooLong, match="8 tokens do not fit in 8 positions"):
        encode_query(tok, "the", " " + " ".join(["city"] * 8), 0, max_length=8)


# --- formats: every one gives the documents plain JSONL gives ----------------------------------------

WORDS = ["the", "capital", "of", "france", "is", "paris", "river", "mountain", "city", "north", "south", "a", "small", "large"]


def _rows(n: int, *, with_ids: bool = True, words: int = 6) -> list[dict]:
    """n records with distinct ids and texts of `words` words (deterministic)."""
    rows = []
    for i in range(n):
        text = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words)) + f" {i}"
        rows.append({"id": f"d{i}", "text": text} if with_ids else {"text": text})
    return rows


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write_format(kind: str, rows: list[dict], root) -> object:
    """`rows` written as `kind`; the path to hand to the readers."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "jsonl":
        p = root / "c.jsonl"
        p.write_bytes(_jsonl_bytes(rows))
    elif kind == "jsonl.gz":
        p = root / "c.jsonl.gz"
        p.write_bytes(gzip.compress(_jsonl_bytes(rows)))
    elif kind == "jsonl.zst":
        zstandard = pytest.importorskip("zstandard")
        half = len(rows) // 2  # two frames, as `zstd a b > c` or a writer's flushes produce
        p = root / "c.jsonl.zst"
        p.write_bytes(b"".join(zstandard.ZstdCompressor().compress(_jsonl_bytes(part)) for part in (rows[:half], rows[half:])))
    elif kind == "parquet":
        p = root / "c.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=700)  # several row groups and batches
    elif kind == "parquet-dir":
        p = root / "pq"
        (p / "part=b").mkdir(parents=True)
        (p / "_temporary").mkdir()
        cut = [0, len(rows) // 3, 2 * len(rows) // 3, len(rows)]
        names = ["part-0.parquet", "part-1.parquet", "part=b/part-2.parquet"]  # sorted path order = row order
        for name, lo, hi in zip(names, cut, cut[1:]):
            pq.write_table(pa.Table.from_pylist(rows[lo:hi]), p / name)
        pq.write_table(pa.Table.from_pylist(rows[:5]), p / "_temporary" / "part-9.parquet")  # a writer's leftovers
        (p / "_SUCCESS").write_text("")
    elif kind == "hf":
        datasets = pytest.importorskip("datasets")
        p = root / "hf"
        datasets.Dataset.from_list(rows).save_to_disk(str(p))
    else:
        raise AssertionError(kind)
    return p


FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "parquet-dir", "hf"]


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("with_ids", [True, False])
def test_every_format_gives_the_documents_of_plain_jsonl(tmp_path, kind, with_ids):
    from tracestar.corpus import corpus_format

    rows = _rows(2500, with_ids=with_ids)  # more than one 1024-row batch
    expected = [(d.id, d.text) for d in iter_documents(_write_format("jsonl", rows, tmp_path))]
    assert len(expected) == 2500 and expected[0][0] == ("d0" if with_ids else "0")
    p = _write_format(kind, rows, tmp_path)
    assert corpus_format(p) == kind.replace("-dir", "")
    docs = list(iter_documents(p))
    assert [(d.id, d.text) for d in docs] == expected
    if kind != "parquet-dir":  # a single file: lines/rows count from 1 without gaps
        assert [d.line for d in docs] == list(range(1, 2501))
    assert validate_corpus(p) == 2500


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "parquet", "hf"])
def test_queries_read_from_every_format(tmp_path, kind):
    rows = [{"id": f"q{i}", "prompt": f"the capital of {c} is", "target": f" {t}", "bucket": str(i % 2)}
            for i, (c, t) in enumerate([("france", "paris"), ("italy", "rome"), ("spain", "madrid")])]
    plain = read_queries(_write_format("jsonl", rows, tmp_path))
    other = read_queries(_write_format(kind, rows, tmp_path))
    assert other == plain and [q.extra for q in other] == [{"bucket": "0"}, {"bucket": "1"}, {"bucket": "0"}]


def test_content_decides_the_format_not_the_name(tmp_path):
    import gzip

    rows = _rows(3)
    p = tmp_path / "really-gzip.jsonl"
    p.write_bytes(gzip.compress(_jsonl_bytes(rows)))
    assert [d.id for d in iter_documents(p)] == ["d0", "d1", "d2"]
    q = tmp_path / "plain.jsonl.gz"
    q.write_bytes(_jsonl_bytes(rows))
    with pytest.raises(InputError) as err:
        validate_corpus(q)
    assert str(err.value) == f"{q}: named .gz but does not start like gzip data"


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst"])
def test_a_truncated_compressed_corpus_is_refused_not_shortened(tmp_path, kind):
    """A cut-off stream must not read as a shorter corpus: the line it broke off in is named."""
    p = _write_format(kind, _rows(2000), tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 40])
    with pytest.raises(InputError) as err:
        validate_corpus(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}:") and "truncated or corrupt" in msg and "\n" not in msg
    line = int(msg[len(str(p)) + 1:].split(":")[0])
    # gzip stops near the cut; zstd decodes whole blocks, so the cut-off second frame (rows
    # 1001-2000, one block) is lost whole — but never silently, and the first frame was read
    assert (1900 if kind == "jsonl.gz" else 1000) < line <= 2000


def test_corrupt_gzip_names_the_line_it_reached(tmp_path):
    import gzip

    p = tmp_path / "c.jsonl.gz"
    data = bytearray(gzip.compress(_jsonl_bytes(_rows(50))))
    data[-6] ^= 0xFF  # the CRC at the end no longer matches
    p.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"c.jsonl.gz:\d+: truncated or corrupt gzip data \(CRC check failed"):
        validate_corpus(p)


def test_zstd_without_a_reader_is_one_line(tmp_path, monkeypatch):
    import sys

    p = _write_format("jsonl.zst", _rows(3), tmp_path)
    if sys.version_info >= (3, 14):
        pytest.skip("Python 3.14 reads zstd itself")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now raises ImportError
    with pytest.raises(InputError) as err:
        validate_corpus(p)
    assert str(err.value) == (f"{p}: reading zstd needs the zstandard package (pip install 'tracestar[zstd]') "
                              "or Python 3.14+")


def test_parquet_errors_name_the_file_inside_the_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(4)), d / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "x", "text": "ok"}, {"id": "y", "text": None}]), d / "b.parquet")
    with pytest.raises(InputError) as err:
        validate_corpus(d)
    assert str(err.value) == f"{d / 'b.parquet'}:2: field 'text': missing"
    pq.write_table(pa.Table.from_pylist([{"id": "x", "text": 5}]), d / "b.parquet")
    with pytest.raises(InputError) as err:
        validate_corpus(d)
    assert str(err.value) == f"{d / 'b.parquet'}:1: field 'text': expected a string, got int"
    pq.write_table(pa.Table.from_pylist([{"id": "d2", "text": "again"}]), d / "b.parquet")
    with pytest.raises(InputError) as err:
        validate_corpus(d)
    assert str(err.value) == f"{d / 'b.parquet'}:1: field 'id': duplicate id 'd2' (first at {d / 'a.parquet'}:3)"
    (d / "b.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"b.parquet: not a readable Parquet file"):
        validate_corpus(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="neither one written by datasets' save_to_disk nor one holding"):
        validate_corpus(empty)


def test_hf_dataset_dict_with_one_split_and_a_damaged_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(5))}).save_to_disk(str(d))
    assert [doc.id for doc in iter_documents(d)] == [f"d{i}" for i in range(5)]
    for f in (d / "train").glob("*.arrow"):
        f.unlink()
    with pytest.raises(InputError, match=r"dd: not a readable datasets directory \("):
        validate_corpus(d)


def test_duplicates_are_found_past_the_in_memory_window_and_collisions_are_not_duplicates(tmp_path, monkeypatch):
    from tracestar import corpus

    monkeypatch.setattr(corpus._SeenIds, "FLUSH", 4)  # ids move into the sorted array after 4
    rows = _rows(30)
    rows[25]["id"] = "d3"
    p = _write_format("jsonl", rows, tmp_path)
    with pytest.raises(InputError) as err:
        validate_corpus(p)
    assert str(err.value) == f"{p}:26: field 'id': duplicate id 'd3' (first at 4)"
    # Ids of one length share a hash, in the set and in the array: each hit is checked, none is real.
    monkeypatch.setattr(corpus, "_hash", lambda key: len(key))
    p = _write_format("jsonl", _rows(30), tmp_path)
    assert [d.id for d in iter_documents(p)] == [f"d{i}" for i in range(30)]


def test_reading_a_compressed_corpus_keeps_memory_flat(tmp_path):
    """tracemalloc's peak while reading 50,000 gzip lines vs 5,000: the growth per extra document
    is its 8-byte id hash (measured: 8.0 bytes), far below its ~200 bytes of text. A reader that
    kept the documents, or a set of their id strings (~80 bytes a document), would fail."""
    import gzip
    import tracemalloc

    def peak(n: int) -> tuple[int, int]:
        p = tmp_path / f"c{n}.jsonl.gz"
        p.write_bytes(gzip.compress(_jsonl_bytes(_rows(n, words=30)), compresslevel=1))
        tracemalloc.start()
        try:
            total = sum(len(d.text) for d in iter_documents(p))
            return tracemalloc.get_traced_memory()[1], total
        finally:
            tracemalloc.stop()

    small, _ = peak(5_000)
    large, text_bytes = peak(50_000)
    assert text_bytes > 50_000 * 150  # the text alone is 7.5 MB or more
    assert (large - small) / 45_000 < 12, (small, large)
    assert large < 2 * 2**20, large  # measured 1.27 MB


def test_texts_by_id_finds_the_wanted_texts_and_names_the_file_for_a_missing_id(tmp_path):
    from tracestar.corpus import indexed_texts, texts_by_id, write_jsonl
    from tracestar.errors import UserError

    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"id": f"d{i}", "text": f"text {i}"} for i in range(5)])
    assert texts_by_id(path, ["d3", "d1"]) == {"d3": "text 3", "d1": "text 1"}
    assert texts_by_id(path, []) == {}
    with pytest.raises(UserError, match=r"c\.jsonl: 1 document id\(s\) not in the corpus, e\.g\. \['d9'\]"):
        texts_by_id(path, ["d0", "d9"])
    # an index moved together with its corpus: the relative path is found beside the index
    spec = {"path": "c.jsonl", "text_field": "text", "id_field": "id"}
    assert indexed_texts(spec, tmp_path, ["d4"]) == {"d4": "text 4"}
    with pytest.raises(UserError, match="the index's corpus is missing"):
        indexed_texts({"path": "gone.jsonl"}, tmp_path, ["d4"])
    assert texts_by_id(path, ["d0", "d9"], allow_missing=True) == {"d0": "text 0"}
