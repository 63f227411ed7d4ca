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
