"""`tabmesh rag eval`'s pure parts: reading passage/query files (errors name the line) and
the metrics; plus the eval fixture itself."""
import json
from pathlib import Path

import pytest

from tabmesh.rag.evaluate import (EvalInputError, Passage, document_text, percentile,
                                  read_passages, read_queries, retrieval_metrics,
                                  unique_sources)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rag_eval"


def write(tmp_path, name: str, lines: list) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_fixture_reads_and_every_relevant_id_exists():
    passages = read_passages(FIXTURE / "passages.jsonl")
    queries = read_queries(FIXTURE / "queries.jsonl", [p.id for p in passages])
    assert len(passages) == 60 and len(queries) == 20
    assert len({p.id.split("-")[0] for p in passages}) == 20  # 20 topics, 3 passages each


def test_reads_passages_in_order_skipping_blank_lines(tmp_path):
    path = write(tmp_path, "p.jsonl", [{"id": "a", "title": "T", "text": "x"}, "",
                                       {"id": "b", "text": "y"}])
    assert read_passages(path) == [Passage("a", "T", "x"), Passage("b", "", "y")]
    assert document_text(Passage("a", "T", "x")) == "T\nx"
    assert document_text(Passage("b", "", "y")) == "y"


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "text": "x"}', "{not json"], r"p\.jsonl:2: not valid JSON"),
    (["[1, 2]"], r"p\.jsonl:1: expected a JSON object, got list"),
    ([{"title": "t", "text": "x"}], r"p\.jsonl:1: missing field 'id'"),
    ([{"id": 3, "text": "x"}], r"p\.jsonl:1: field 'id' must be a string, got int"),
    ([{"id": "a", "text": "  "}], r"p\.jsonl:1: field 'text' is empty"),
    ([{"id": "a", "text": "x", "title": None}], r"p\.jsonl:1: field 'title' must be a string"),
    ([{"id": "a", "text": "x"}, "", {"id": "a", "text": "y"}],
     r"p\.jsonl:3: passage id 'a' already used on line 1"),
    ([""], r"p\.jsonl: no passages"),
])
def test_bad_passage_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(EvalInputError, match=message):
        read_passages(write(tmp_path, "p.jsonl", lines))


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(EvalInputError, match="cannot read"):
        read_passages(tmp_path / "missing.jsonl")
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "\xff"}\n')
    with pytest.raises(EvalInputError, match=r"p\.jsonl:2: not UTF-8"):
        read_passages(path)


@pytest.mark.parametrize("line, message", [
    ({"text": "q", "relevant_ids": ["a"]}, "missing field 'qid'"),
    ({"qid": "1", "relevant_ids": ["a"]}, "missing field 'text'"),
    ({"qid": "1", "text": "q"}, "missing field 'relevant_ids'"),
    ({"qid": "1", "text": "q", "relevant_ids": []}, "field .relevant_ids. must be a non-empty list"),
    ({"qid": "1", "text": "q", "relevant_ids": "a"}, "field .relevant_ids. must be a non-empty list"),
    ({"qid": "1", "text": "q", "relevant_ids": [1]}, "field .relevant_ids. must be a non-empty list"),
    ({"qid": "1", "text": "q", "relevant_ids": ["zzz"]}, "relevant id 'zzz' is not a passage id"),
])
def test_bad_query_files_name_the_line(tmp_path, line, message):
    good = {"qid": "0", "text": "fine", "relevant_ids": ["a"]}
    path = write(tmp_path, "q.jsonl", [good, line])
    with pytest.raises(EvalInputError, match=r"q\.jsonl:2: " + message):
        read_queries(path, ["a", "b"])


def test_duplicate_qids_and_unchecked_ids(tmp_path):
    q = {"qid": "1", "text": "q", "relevant_ids": ["x"]}
    with pytest.raises(EvalInputError, match=r"q\.jsonl:2: qid '1' already used on line 1"):
        read_queries(write(tmp_path, "q.jsonl", [q, q]))
    (only,) = read_queries(write(tmp_path, "q.jsonl", [q]))  # no passage ids given: not checked
    assert only.relevant_ids == frozenset({"x"})


def test_unique_sources_keeps_rank_order():
    assert unique_sources(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def test_metrics_by_hand():
    ranked = [["a", "b"], ["x", "y", "a"], ["n"] * 1, [f"p{i}" for i in range(12)]]
    relevant = [{"a"}, {"a", "y"}, {"a"}, {"p10"}]
    m = retrieval_metrics(ranked, relevant)
    # first relevant ranks: 1, 2, none, 11 (beyond 10)
    assert m == {"recall_at_1": 0.25, "recall_at_10": 0.5, "mrr_at_10": pytest.approx((1 + 0.5) / 4)}
    assert retrieval_metrics(ranked, relevant, ks=(1, 2, 20), mrr_k=20)["recall_at_20"] == 0.75
    with pytest.raises(ValueError):
        retrieval_metrics([["a"]], [])


def test_percentile_nearest_rank():
    xs = list(range(1, 101))
    assert percentile(xs, 0.5) in (50, 51) and percentile(xs, 0.99) == 99 and percentile([7], 0.99) == 7


def test_cli_rejects_a_bad_query_file_before_starting_a_browser(tmp_path):
    import subprocess
    import sys
    q = write(tmp_path, "q.jsonl", [{"qid": "1", "text": "q", "relevant_ids": ["bees-dance"]},
                                    {"qid": "2", "text": "q", "relevant_ids": ["nope"]}])
    out = subprocess.run([sys.executable, "-m", "tabmesh", "rag", "eval", "--passages",
                          str(FIXTURE / "passages.jsonl"), "--queries", str(q), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert "q.jsonl:2: relevant id 'nope' is not a passage id" in out.stderr
    assert "booting" not in out.stderr
