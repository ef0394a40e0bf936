"""Retrieval evaluation for `tabmesh rag eval`: reading the passage and query files, and
the metrics. Pure (no browser); the CLI drives the tab (cli_rag.py).

Input files are JSON Lines, one object a line (blank lines are skipped):

    passages   {"id": str, "title": str, "text": str}       ids unique, text not empty
    queries    {"qid": str, "text": str, "relevant_ids": [passage id, ...]}

Every relevant id must name a passage of the passage file. A bad line raises
``EvalInputError`` naming the file, the line number and the field.

Metrics over the ranked passage ids of each query (hits deduplicated by passage, best
rank kept, since a passage can be cut into several chunks):

    recall@k   fraction of queries with at least one relevant id in the top k
    MRR@k      mean over queries of 1/rank of the first relevant id in the top k (0 if none)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tabmesh.errors import TabmeshError

__all__ = ["EvalInputError", "Passage", "Query", "read_passages", "read_queries",
           "document_text", "unique_sources", "retrieval_metrics", "percentile"]

MAX_ID_CHARS = 256  # passage ids become the RAG source name (sync.MAX_SOURCE_CHARS is 1024)


class EvalInputError(TabmeshError):
    """A passage or query file of `tabmesh rag eval` is malformed; the message names the
    file, the line and the field to fix."""

    code = "eval_input"


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Query:
    qid: str
    text: str
    relevant_ids: frozenset[str]


def _lines(path: Path | str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise EvalInputError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise EvalInputError(f"{path}:{line}: not UTF-8 text") from e
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise EvalInputError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def _field_str(path, n: int, obj: dict, key: str, *, allow_empty: bool = False,
               max_chars: int | None = None) -> str:
    if key not in obj:
        raise EvalInputError(f"{path}:{n}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise EvalInputError(f"{path}:{n}: field {key!r} must be a string, got "
                             f"{type(value).__name__}")
    if not allow_empty and not value.strip():
        raise EvalInputError(f"{path}:{n}: field {key!r} is empty")
    if max_chars is not None and len(value) > max_chars:
        raise EvalInputError(f"{path}:{n}: field {key!r} is longer than {max_chars} characters")
    return value


def read_passages(path: Path | str) -> list[Passage]:
    """The passages of a JSON Lines file, in file order (ids unique)."""
    out, where = [], {}
    for n, obj in _lines(path):
        pid = _field_str(path, n, obj, "id", max_chars=MAX_ID_CHARS)
        title = _field_str(path, n, obj, "title", allow_empty=True) if "title" in obj else ""
        text = _field_str(path, n, obj, "text")
        if pid in where:
            raise EvalInputError(f"{path}:{n}: passage id {pid!r} already used on line {where[pid]}")
        where[pid] = n
        out.append(Passage(pid, title, text))
    if not out:
        raise EvalInputError(f"{path}: no passages (expected one JSON object a line)")
    return out


def read_queries(path: Path | str, passage_ids: Iterable[str] | None = None) -> list[Query]:
    """The queries of a JSON Lines file, in file order; with ``passage_ids``, every relevant
    id must be one of them."""
    known = None if passage_ids is None else set(passage_ids)
    out, where = [], {}
    for n, obj in _lines(path):
        qid = _field_str(path, n, obj, "qid")
        text = _field_str(path, n, obj, "text")
        rel = obj.get("relevant_ids")
        if "relevant_ids" not in obj:
            raise EvalInputError(f"{path}:{n}: missing field 'relevant_ids'")
        if not isinstance(rel, list) or not rel or not all(isinstance(r, str) and r for r in rel):
            raise EvalInputError(f"{path}:{n}: field 'relevant_ids' must be a non-empty list of "
                                 "passage ids (strings)")
        if known is not None:
            missing = [r for r in rel if r not in known]
            if missing:
                raise EvalInputError(f"{path}:{n}: relevant id {missing[0]!r} is not a passage id "
                                     "of the passage file")
        if qid in where:
            raise EvalInputError(f"{path}:{n}: qid {qid!r} already used on line {where[qid]}")
        where[qid] = n
        out.append(Query(qid, text, frozenset(rel)))
    if not out:
        raise EvalInputError(f"{path}: no queries (expected one JSON object a line)")
    return out


def document_text(p: Passage) -> str:
    """What gets ingested for a passage: its title on the first line, then its text."""
    return f"{p.title}\n{p.text}" if p.title.strip() else p.text


def unique_sources(sources: Iterable[str]) -> list[str]:
    """``sources`` in rank order with repeats (more chunks of one passage) removed."""
    return list(dict.fromkeys(sources))


def retrieval_metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[Iterable[str]],
                      ks: Sequence[int] = (1, 10), mrr_k: int = 10) -> dict[str, float]:
    """``recall_at_<k>`` for each k and ``mrr_at_<mrr_k>`` over queries: ``ranked[i]`` is
    query i's passage ids best first (deduplicated), ``relevant[i]`` its relevant ids."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} queries")
    if not ranked:
        raise ValueError("no queries to evaluate")
    firsts = []  # 1-based rank of the first relevant id, None if absent
    for ids, rel in zip(ranked, relevant):
        rel = set(rel)
        firsts.append(next((r for r, pid in enumerate(ids, 1) if pid in rel), None))
    n = len(firsts)
    out = {f"recall_at_{k}": sum(f is not None and f <= k for f in firsts) / n for k in ks}
    out[f"mrr_at_{mrr_k}"] = sum(1 / f for f in firsts if f is not None and f <= mrr_k) / n
    return out


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``xs``, nearest rank (as bench.percentile)."""
    if not xs:
        raise ValueError("percentile of no values")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]
