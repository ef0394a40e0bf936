"""Cluster messages: what mesh nodes tell each other over the data channels. Schema and checks.

Stdlib only, no I/O, no asyncio: the same module validates under CPython and Pyodide. The
sender of a message is the peer at the other end of the data channel (its id comes from
the channel, never from the message), so no message names its own sender.

Envelope, version 1
===================
One message is one frame payload (frames.py chunks and reassembles it):

    offset  size  field
    0       4     json_len   u32 little-endian, 2 <= json_len <= MAX_JSON (65536)
    4       n     header     a strict JSON object in UTF-8 (NaN/Infinity refused)
    4+n     ...   body       raw little-endian tensor bytes for compute-request,
                             compute-result and tensor-chunk; empty for every other type

Every header has "t" (the type) and "v" (PROTOCOL_VERSION); another version is refused (both
ends must run the same page). A header has exactly the keys listed, none unknown, none
missing. Integers are JSON integers (never booleans or 1.0) in 0..2**53; numbers are finite.
Ids: peer ids are 12 lowercase hex characters (signal_messages.PEER_ID_RE); a model id is
[A-Za-z0-9_.:+-]{1,128}; a session id [A-Za-z0-9_-]{1,64}. A layer range [a, b) is a pair
0 <= a < b <= n_layers.

Membership and load (every node)
  join        {gpu: {vendor, architecture, device, description, f16: bool, limits: {name: int}},
               memoryBytes: int, bench: BENCH | null, cached: [{model, layers: [[a, b], ...]}]}
              sent when a channel opens and again whenever the advert changes; cached ranges
              are sorted and disjoint
  leave       {reason: "closing" | "reload" | "error"}
  heartbeat   {status: "idle" | "loading" | "ready" | "busy" | "error", load: number (queued
               requests), epoch: int (plan epoch it runs, 0 = none), rttMs: {peerId: ms}}
  benchmark-request  {kernels: ["matmul" | "bandwidth" | "dispatch", ...]} (distinct, >= 1)
  benchmark-result   {bench: BENCH}
  BENCH = {matmulGflops, bandwidthGBs, dispatchUs}: positive numbers measured by the kernel set

Coordination (raft.py; terms and epochs are ints >= 0)
  request-vote       {term, planTerm, epoch}       candidate's term and its latest plan entry
  vote               {term, granted: bool}
  distribution-plan  {term, plan: PLAN | null, commit: [planTerm, epoch] | null}
                     the leader's heartbeat: the one-entry log (its latest plan) and the
                     entry it knows committed; plan.term <= term
  plan-ack           {term, planTerm, epoch}       the entry the follower holds after it
  PLAN = {term, epoch, model, nLayers, stages: [{node, layers: [a, b], ms}], msPerToken,
          requester: peerId | null}; stages run in order, cover [0, nLayers) contiguously,
          and name each node once

Pipeline (payload in the body; dtype sizes: f32 4, f16 2, u32 4)
  compute-request  {epoch, session, seq, layers: [a, b], pos, shape: [n, w], dtype, want}
                   want: "hidden" unless b == n_layers, then "logits" | "argmax"
                   a == 0: token ids, dtype u32, w == 1, each id < n_vocab
                   a > 0:  hidden states, dtype f32 | f16, w == n_embd;  pos + n <= n_ctx
  compute-result   {epoch, session, seq, layers, output: "hidden" | "logits" | "argmax", shape, dtype, ms}
                   argmax: the last token's greedy id, shape [1, 1], dtype u32
                   hidden: w == n_embd; logits: b == n_layers and w == n_vocab; dtype f32 | f16;
                   ms = this stage's compute time (feeds planner.ThroughputEstimator)
  compute-error    {epoch, session, seq, error: {type, message}}   (tabmesh.errors wire form)
  tensor-chunk     {model, tensor, offset, total, sha256}   body = bytes offset..offset+len of
                   one GGUF tensor's data (total bytes in all, sha256 of all of it); tensor is
                   blk.N.NAME.weight|bias with N < n_layers, token_embd / output_norm / output.weight
In every body-carrying message len(body) == n * w * dtype size (tensor-chunk: 1 <= len and
offset + len <= total).

Checks that need the model (n_layers, n_embd, n_vocab, n_ctx) run when `decode` gets one:
any object with attributes model_id, n_layers, n_embd, n_vocab, n_ctx (planner.ModelInfo).
Checks that need the current plan (epoch, this node's layers) are `check_compute_request`.
Anything malformed raises ClusterMessageError and nothing else; the node drops the message.
"""
from __future__ import annotations

import array
import json
import math
import re
import sys
from dataclasses import dataclass, is_dataclass, replace
from typing import Any, Callable, ClassVar, Optional, Union

from ..errors import TabmeshError
from .signal_messages import PEER_ID_RE

PROTOCOL_VERSION = 1
MAX_JSON = 65536
MAX_INT = 2**53
MAX_LAYERS = 1024
MAX_TOKENS = 1 << 16
MAX_WIDTH = 1 << 20
MAX_STAGES = 64
MAX_PEERS = 64
MAX_TENSOR_BYTES = 1 << 32
DTYPE_SIZES = {"f32": 4, "f16": 2, "u32": 4}
MODEL_RE = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")
SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
LIMIT_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
TENSOR_RE = re.compile(r"blk\.(\d{1,4})\.[a-z0-9_]{1,32}\.(?:weight|bias)"
                       r"|token_embd\.weight|output_norm\.weight|output\.weight")
ERROR_TYPE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class ClusterMessageError(TabmeshError):
    """A cluster message from a peer breaks the schema above; the message names the field.
    The node drops the message (and may report it to the peer as compute-error)."""

    code = "bad_cluster_message"


def _short(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return f"a {type(v).__name__} of {len(v)}"
    return repr(v[:40] if isinstance(v, str) else v)[:48]


def _bad(where: str, what: str) -> ClusterMessageError:
    return ClusterMessageError(f"{where}: {what}")


# ---- field checkers: check(value, where) -> python value ----------------------------
Check = Callable[[Any, str], Any]


def _int(lo: int = 0, hi: int = MAX_INT) -> Check:
    def check(v, where):
        if type(v) is not int or not lo <= v <= hi:
            raise _bad(where, f"must be an integer in {lo}..{hi}, got {_short(v)}")
        return v
    return check


def _num(lo: float = 0.0, hi: float = 1e12, lo_open: bool = False) -> Check:
    def check(v, where):
        if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi or (lo_open and v == lo):
            raise _bad(where, f"must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {_short(v)}")
        return float(v)
    return check


def _str(pattern: re.Pattern | None = None, max_len: int = 256) -> Check:
    def check(v, where):
        if not isinstance(v, str) or len(v) > max_len or (pattern is not None and not pattern.fullmatch(v)):
            rule = f"match {pattern.pattern}" if pattern is not None else f"be a string of at most {max_len}"
            raise _bad(where, f"must {rule}, got {_short(v)}")
        return v
    return check


def _enum(*values: str) -> Check:
    def check(v, where):
        if not isinstance(v, str) or v not in values:
            raise _bad(where, f"must be one of {list(values)}, got {_short(v)}")
        return v
    return check


def _bool(v, where):
    if type(v) is not bool:
        raise _bad(where, f"must be true or false, got {_short(v)}")
    return v


def _opt(check: Check) -> Check:
    return lambda v, where: None if v is None else check(v, where)


def _list(check: Check, max_items: int, min_items: int = 0) -> Check:
    def run(v, where):
        if not isinstance(v, list) or not min_items <= len(v) <= max_items:
            raise _bad(where, f"must be a list of {min_items}..{max_items} items, got {_short(v)}")
        return tuple(check(x, f"{where}[{i}]") for i, x in enumerate(v))
    return run


def _map(key: re.Pattern, check: Check, max_items: int) -> Check:
    def run(v, where):
        if not isinstance(v, dict) or len(v) > max_items:
            raise _bad(where, f"must be an object of at most {max_items} entries, got {_short(v)}")
        return {_str(key)(k, f"{where} key"): check(x, f"{where}.{k}") for k, x in v.items()}
    return run


def _pair(first: Check, second: Check) -> Check:
    def run(v, where):
        if not isinstance(v, list) or len(v) != 2:
            raise _bad(where, f"must be a pair [x, y], got {_short(v)}")
        return first(v[0], f"{where}[0]"), second(v[1], f"{where}[1]")
    return run


def _layer_range(v, where):
    a, b = _pair(_int(0, MAX_LAYERS - 1), _int(1, MAX_LAYERS))(v, where)
    if a >= b:
        raise _bad(where, f"layer range [{a}, {b}) is empty or reversed")
    return a, b


def _obj(cls) -> Check:
    return lambda v, where: _from_fields(cls, v, where)


def _from_fields(cls, obj: Any, where: str, extra: frozenset = frozenset()):
    """Build `cls` from a JSON object that has exactly the keys of cls.WIRE (plus `extra`)."""
    if not isinstance(obj, dict):
        raise _bad(where, f"must be an object, got {_short(obj)}")
    keys = {key for key, _ in cls.WIRE.values()} | extra
    unknown = sorted(str(k)[:40] for k in obj if k not in keys)
    if unknown:
        raise _bad(where, f"unknown key(s) {unknown}; allowed: {sorted(keys)}")
    missing = sorted(k for k in keys if k not in obj)
    if missing:
        raise _bad(where, f"missing key(s) {missing}")
    return cls(**{attr: check(obj[key], f"{where}.{key}") for attr, (key, check) in cls.WIRE.items()})


def _to_wire(value: Any) -> Any:
    if is_dataclass(value):
        return {key: _to_wire(getattr(value, attr)) for attr, (key, _) in type(value).WIRE.items()}
    if isinstance(value, (tuple, list)):
        return [_to_wire(x) for x in value]
    if isinstance(value, dict):
        return {k: _to_wire(x) for k, x in value.items()}
    return value


def _same_model(model: Any, model_id: str) -> bool:
    return model is not None and getattr(model, "model_id", None) == model_id


# ---- parts -------------------------------------------------------------------------------
_ID = _str(PEER_ID_RE)
_EPOCH = _int()


@dataclass(frozen=True)
class Bench:
    matmul_gflops: float  # dense matmul throughput (prefill is compute-bound)
    bandwidth_gbs: float  # weight bytes read per second by the matvec kernel (decode is memory-bound)
    dispatch_us: float  # cost of one compute dispatch inside a pass
    WIRE: ClassVar = {"matmul_gflops": ("matmulGflops", _num(0, 1e7, True)),
                      "bandwidth_gbs": ("bandwidthGBs", _num(0, 1e5, True)),
                      "dispatch_us": ("dispatchUs", _num(0, 1e7, True))}


@dataclass(frozen=True)
class GpuInfo:
    vendor: str
    architecture: str
    device: str
    description: str
    f16: bool  # adapter has shader-f16
    limits: dict  # GPUSupportedLimits by name, integers only
    WIRE: ClassVar = {"vendor": ("vendor", _str(max_len=64)), "architecture": ("architecture", _str(max_len=64)),
                      "device": ("device", _str(max_len=128)), "description": ("description", _str(max_len=256)),
                      "f16": ("f16", _bool), "limits": ("limits", _map(LIMIT_RE, _int(), 64))}


def _disjoint(ranges: tuple, where: str) -> None:
    for (a0, b0), (a1, b1) in zip(ranges, ranges[1:]):
        if a1 < b0:
            raise _bad(where, f"ranges [{a0}, {b0}) and [{a1}, {b1}) overlap or are out of order")


@dataclass(frozen=True)
class CachedLayers:
    model: str
    layers: tuple  # ((a, b), ...) sorted and disjoint
    WIRE: ClassVar = {"model": ("model", _str(MODEL_RE)), "layers": ("layers", _list(_layer_range, 256))}

    def layer_set(self) -> frozenset:
        return frozenset(i for a, b in self.layers for i in range(a, b))


@dataclass(frozen=True)
class Stage:
    node: str
    layers: tuple  # (a, b): this node runs blocks a .. b-1
    ms: float  # estimated compute time of this stage per decoded token
    WIRE: ClassVar = {"node": ("node", _ID), "layers": ("layers", _layer_range), "ms": ("ms", _num(0, 1e7))}

    @property
    def start(self) -> int:
        return self.layers[0]

    @property
    def end(self) -> int:
        return self.layers[1]


@dataclass(frozen=True)
class Plan:
    """Who runs which layers. Built by planner.plan; `term` and `epoch` are set by raft.py."""

    term: int
    epoch: int
    model: str
    n_layers: int
    stages: tuple  # (Stage, ...) in pipeline order
    ms_per_token: float  # estimated decode latency, hops included
    requester: Optional[str]  # the node whose requests the latency was estimated for
    WIRE: ClassVar = {"term": ("term", _int()), "epoch": ("epoch", _EPOCH), "model": ("model", _str(MODEL_RE)),
                      "n_layers": ("nLayers", _int(1, MAX_LAYERS)),
                      "stages": ("stages", _list(_obj(Stage), MAX_STAGES, 1)),
                      "ms_per_token": ("msPerToken", _num(0, 1e9)), "requester": ("requester", _opt(_ID))}

    def stage_of(self, node: str) -> Optional[Stage]:
        return next((s for s in self.stages if s.node == node), None)

    def check(self, model: Any = None, where: str = "plan") -> None:
        # 1. stages cover [0, n_layers) in order, without gaps; 2. a node runs one stage
        end = 0
        for i, s in enumerate(self.stages):
            if s.start != end:
                raise _bad(where, f"stage {i} starts at layer {s.start}, expected {end} (contiguous ranges)")
            end = s.end
        if end != self.n_layers:
            raise _bad(where, f"stages end at layer {end}, the model has {self.n_layers}")
        if len({s.node for s in self.stages}) != len(self.stages):
            raise _bad(where, "a node appears in more than one stage")
        # 3. the model's layer count, when this node knows the model
        if _same_model(model, self.model) and self.n_layers != model.n_layers:
            raise _bad(where, f"nLayers {self.n_layers} but model {self.model} has {model.n_layers}")


@dataclass(frozen=True)
class WireError:
    type: str
    message: str
    WIRE: ClassVar = {"type": ("type", _str(ERROR_TYPE_RE)), "message": ("message", _str(max_len=2000))}


# ---- messages ----------------------------------------------------------------------------
class Message:
    TYPE: ClassVar[str] = ""
    HAS_BODY: ClassVar[bool] = False

    def check(self, model: Any) -> None:
        """Cross-field checks; field types and bounds are already checked."""


@dataclass(frozen=True)
class Join(Message):
    gpu: GpuInfo
    memory_bytes: int  # estimate of GPU memory usable for weights + KV cache
    bench: Optional[Bench]  # None until the benchmark kernels ran
    cached: tuple  # (CachedLayers, ...)
    TYPE = "join"
    WIRE: ClassVar = {"gpu": ("gpu", _obj(GpuInfo)), "memory_bytes": ("memoryBytes", _int()),
                      "bench": ("bench", _opt(_obj(Bench))), "cached": ("cached", _list(_obj(CachedLayers), 16))}

    def check(self, model):
        for i, c in enumerate(self.cached):
            _disjoint(c.layers, f"join.cached[{i}].layers")
            if _same_model(model, c.model) and c.layers and c.layers[-1][1] > model.n_layers:
                raise _bad(f"join.cached[{i}]", f"layers past the model's {model.n_layers}")

    def cached_layers(self, model_id: str) -> frozenset:
        return frozenset().union(*(c.layer_set() for c in self.cached if c.model == model_id))


@dataclass(frozen=True)
class Leave(Message):
    reason: str
    TYPE = "leave"
    WIRE: ClassVar = {"reason": ("reason", _enum("closing", "reload", "error"))}


@dataclass(frozen=True)
class Heartbeat(Message):
    status: str
    load: float  # queued requests
    epoch: int  # plan epoch this node runs (0: none)
    rtt_ms: dict  # {peerId: round trip in ms} as this node measured them
    TYPE = "heartbeat"
    WIRE: ClassVar = {"status": ("status", _enum("idle", "loading", "ready", "busy", "error")),
                      "load": ("load", _num(0, 1e6)), "epoch": ("epoch", _EPOCH),
                      "rtt_ms": ("rttMs", _map(PEER_ID_RE, _num(0, 600000), MAX_PEERS))}


_ENTRY = _pair(_int(), _EPOCH)  # (planTerm, epoch)


@dataclass(frozen=True)
class RequestVote(Message):
    term: int
    plan_term: int  # term and epoch of the candidate's latest plan entry ((0, 0): none)
    epoch: int
    TYPE = "request-vote"
    WIRE: ClassVar = {"term": ("term", _int(1)), "plan_term": ("planTerm", _int()), "epoch": ("epoch", _EPOCH)}

    def check(self, model):
        if self.plan_term > self.term:
            raise _bad(self.TYPE, f"planTerm {self.plan_term} is ahead of term {self.term}")


@dataclass(frozen=True)
class Vote(Message):
    term: int
    granted: bool
    TYPE = "vote"
    WIRE: ClassVar = {"term": ("term", _int()), "granted": ("granted", _bool)}


@dataclass(frozen=True)
class DistributionPlan(Message):
    term: int  # the leader's term
    plan: Optional[Plan]  # the leader's latest entry
    commit: Optional[tuple]  # (planTerm, epoch) of the entry the leader knows committed
    TYPE = "distribution-plan"
    WIRE: ClassVar = {"term": ("term", _int(1)), "plan": ("plan", _opt(_obj(Plan))), "commit": ("commit", _opt(_ENTRY))}

    def check(self, model):
        if self.plan is not None:
            self.plan.check(model, f"{self.TYPE}.plan")
            if self.plan.term > self.term:
                raise _bad(self.TYPE, f"plan.term {self.plan.term} is ahead of term {self.term}")
        if self.commit is not None and self.commit[0] > self.term:
            raise _bad(self.TYPE, f"commit term {self.commit[0]} is ahead of term {self.term}")


@dataclass(frozen=True)
class PlanAck(Message):
    term: int
    plan_term: int  # the entry the follower holds after handling the plan
    epoch: int
    TYPE = "plan-ack"
    WIRE: ClassVar = {"term": ("term", _int()), "plan_term": ("planTerm", _int()), "epoch": ("epoch", _EPOCH)}

    def check(self, model):
        if self.plan_term > self.term:
            raise _bad(self.TYPE, f"planTerm {self.plan_term} is ahead of term {self.term}")


@dataclass(frozen=True)
class BenchmarkRequest(Message):
    kernels: tuple
    TYPE = "benchmark-request"
    WIRE: ClassVar = {"kernels": ("kernels", _list(_enum("matmul", "bandwidth", "dispatch"), 3, 1))}

    def check(self, model):
        if len(set(self.kernels)) != len(self.kernels):
            raise _bad(self.TYPE, "kernels are listed twice")


@dataclass(frozen=True)
class BenchmarkResult(Message):
    bench: Bench
    TYPE = "benchmark-result"
    WIRE: ClassVar = {"bench": ("bench", _obj(Bench))}


_SHAPE = _pair(_int(1, MAX_TOKENS), _int(1, MAX_WIDTH))
_STEP = {"epoch": ("epoch", _EPOCH), "session": ("session", _str(SESSION_RE)), "seq": ("seq", _int())}


def _check_body(msg, where: str) -> None:
    n, w = msg.shape
    want = n * w * DTYPE_SIZES[msg.dtype]
    if len(msg.data) != want:
        raise _bad(where, f"shape {list(msg.shape)} of {msg.dtype} needs {want} body bytes, got {len(msg.data)}")


@dataclass(frozen=True)
class ComputeRequest(Message):
    epoch: int
    session: str  # one generation (one KV cache) on every stage
    seq: int  # step number within the session
    layers: tuple  # (a, b): the blocks the receiver is asked to run
    pos: int  # position of the first token (KV cache slot)
    shape: tuple  # (n_tokens, width)
    dtype: str
    data: bytes = b""  # (n_tokens, width) token ids (a == 0) or hidden states
    want: str = "hidden"  # "hidden" from a middle stage; "logits" or "argmax" from the last
    TYPE = "compute-request"
    HAS_BODY = True
    WIRE: ClassVar = {**_STEP, "layers": ("layers", _layer_range), "pos": ("pos", _int(0, MAX_TOKENS)),
                      "shape": ("shape", _SHAPE), "dtype": ("dtype", _enum(*DTYPE_SIZES)),
                      "want": ("want", _enum("hidden", "logits", "argmax"))}

    def check(self, model):
        n, w = self.shape
        if model is not None and (self.want == "hidden") != (self.layers[1] < model.n_layers):
            raise _bad(self.TYPE, f"want {self.want!r} from layers {list(self.layers)} of {model.n_layers}: "
                       "the last stage gives logits or argmax, the others hidden states")
        if self.layers[0] == 0 and (self.dtype != "u32" or w != 1):
            raise _bad(self.TYPE, f"the first stage takes token ids (u32, width 1), got {self.dtype} width {w}")
        if self.layers[0] > 0 and self.dtype == "u32":
            raise _bad(self.TYPE, "hidden states must be f32 or f16")
        _check_body(self, self.TYPE)
        if model is None:
            return
        if self.layers[1] > model.n_layers:
            raise _bad(self.TYPE, f"layers {list(self.layers)} run past the model's {model.n_layers}")
        if self.layers[0] > 0 and w != model.n_embd:
            raise _bad(self.TYPE, f"hidden width {w} but the model's n_embd is {model.n_embd}")
        if self.pos + n > model.n_ctx:
            raise _bad(self.TYPE, f"positions {self.pos}..{self.pos + n - 1} exceed the context of {model.n_ctx}")
        if self.layers[0] == 0:
            ids = array.array("I")
            ids.frombytes(self.data)
            if sys.byteorder != "little":
                ids.byteswap()
            if ids and max(ids) >= model.n_vocab:
                raise _bad(self.TYPE, f"token id {max(ids)} outside the vocabulary of {model.n_vocab}")


@dataclass(frozen=True)
class ComputeResult(Message):
    epoch: int
    session: str
    seq: int
    layers: tuple  # the blocks that ran
    output: str  # "hidden" for the next stage, "logits" from the last one
    shape: tuple
    dtype: str
    ms: float  # this stage's compute time
    data: bytes = b""
    TYPE = "compute-result"
    HAS_BODY = True
    WIRE: ClassVar = {**_STEP, "layers": ("layers", _layer_range),
                      "output": ("output", _enum("hidden", "logits", "argmax")),
                      "shape": ("shape", _SHAPE), "dtype": ("dtype", _enum("f32", "f16", "u32")),
                      "ms": ("ms", _num(0, 1e7))}

    def check(self, model):
        _check_body(self, self.TYPE)
        if (self.output == "argmax") != (self.dtype == "u32") or (self.output == "argmax" and self.shape != (1, 1)):
            raise _bad(self.TYPE, f"argmax comes as one u32 (shape [1, 1]); got {self.output} "
                       f"{self.dtype} {list(self.shape)}")
        if model is None:
            return
        w, end = self.shape[1], self.layers[1]
        if end > model.n_layers:
            raise _bad(self.TYPE, f"layers {list(self.layers)} run past the model's {model.n_layers}")
        if self.output == "argmax" and end != model.n_layers:
            raise _bad(self.TYPE, f"argmax comes from the last layer, got layers {list(self.layers)}")
        if self.output == "logits" and (end != model.n_layers or w != model.n_vocab):
            raise _bad(self.TYPE, f"logits come from the last layer with width n_vocab {model.n_vocab}, "
                       f"got layers {list(self.layers)} width {w}")
        if self.output == "hidden" and w != model.n_embd:
            raise _bad(self.TYPE, f"hidden width {w} but the model's n_embd is {model.n_embd}")


@dataclass(frozen=True)
class ComputeError(Message):
    epoch: int
    session: str
    seq: int
    error: WireError
    TYPE = "compute-error"
    WIRE: ClassVar = {**_STEP, "error": ("error", _obj(WireError))}

    @classmethod
    def from_exception(cls, epoch: int, session: str, seq: int, exc: BaseException) -> "ComputeError":
        d = exc.to_dict() if isinstance(exc, TabmeshError) else {"type": "TabmeshError", "message": str(exc)}
        name = d["type"] if ERROR_TYPE_RE.fullmatch(d["type"]) else "TabmeshError"
        return cls(epoch, session, seq, WireError(name, d["message"][:2000]))

    def to_exception(self) -> TabmeshError:
        return TabmeshError.from_dict({"type": self.error.type, "message": self.error.message})


@dataclass(frozen=True)
class TensorChunk(Message):
    model: str
    tensor: str  # GGUF tensor name
    offset: int  # of this chunk within the tensor's data
    total: int  # bytes of the whole tensor
    sha256: str  # of the whole tensor, hex
    data: bytes = b""
    TYPE = "tensor-chunk"
    HAS_BODY = True
    WIRE: ClassVar = {"model": ("model", _str(MODEL_RE)), "tensor": ("tensor", _str(TENSOR_RE, 64)),
                      "offset": ("offset", _int(0, MAX_TENSOR_BYTES)), "total": ("total", _int(1, MAX_TENSOR_BYTES)),
                      "sha256": ("sha256", _str(SHA256_RE))}

    def check(self, model):
        if not self.data or self.offset + len(self.data) > self.total:
            raise _bad(self.TYPE, f"{len(self.data)} bytes at offset {self.offset} do not fit a tensor of {self.total}")
        layer = TENSOR_RE.fullmatch(self.tensor).group(1)
        limit = model.n_layers if _same_model(model, self.model) else MAX_LAYERS
        if layer is not None and int(layer) >= limit:
            raise _bad(self.TYPE, f"tensor {self.tensor} names a layer past {limit}")


MESSAGES: dict[str, type] = {c.TYPE: c for c in (
    Join, Leave, Heartbeat, RequestVote, Vote, DistributionPlan, PlanAck, BenchmarkRequest,
    BenchmarkResult, ComputeRequest, ComputeResult, ComputeError, TensorChunk)}
AnyMessage = Union[Join, Leave, Heartbeat, RequestVote, Vote, DistributionPlan, PlanAck, BenchmarkRequest,
                   BenchmarkResult, ComputeRequest, ComputeResult, ComputeError, TensorChunk]


# ---- encode / decode ---------------------------------------------------------------------
def from_wire(obj: Any, body: bytes = b"", model: Any = None) -> AnyMessage:
    """Validate a decoded JSON header (+ body) and return the typed message."""
    # 1. an object with a known "t" and this protocol version
    if not isinstance(obj, dict):
        raise _bad("message", f"must be a JSON object, got {_short(obj)}")
    cls = MESSAGES.get(obj.get("t")) if isinstance(obj.get("t"), str) else None
    if cls is None:
        raise _bad("message", f"'t' must be one of {sorted(MESSAGES)}, got {_short(obj.get('t'))}")
    if type(obj.get("v")) is not int or obj["v"] != PROTOCOL_VERSION:
        raise _bad(cls.TYPE, f"protocol version {_short(obj.get('v'))}, this node speaks v{PROTOCOL_VERSION}; "
                   f"reload the tab so every node runs the same page")
    # 2. exactly the keys of that type, each of the right type and bounds
    msg = _from_fields(cls, obj, cls.TYPE, extra=frozenset(("t", "v")))
    # 3. a body only where the type carries one
    if cls.HAS_BODY:
        msg = replace(msg, data=bytes(body))
    elif body:
        raise _bad(cls.TYPE, f"carries no body, got {len(body)} bytes after the header")
    # 4. cross-field checks (ranges, shapes against dtype and body, the model when known)
    msg.check(model)
    return msg


def decode(payload: bytes | bytearray | memoryview, model: Any = None) -> AnyMessage:
    """Parse one frame payload. Raises ClusterMessageError, and only that, on bad input."""
    data = bytes(payload)
    if len(data) < 4:
        raise _bad("message", f"{len(data)} bytes is shorter than the 4-byte header length")
    n = int.from_bytes(data[:4], "little")
    if not 2 <= n <= MAX_JSON or 4 + n > len(data):
        raise _bad("message", f"header length {n} outside 2..{MAX_JSON} or past the {len(data)}-byte payload")
    try:
        obj = json.loads(data[4:4 + n].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad("message", f"header is not strict UTF-8 JSON: {str(exc)[:120]}") from None
    return from_wire(obj, data[4 + n:], model)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def encode(msg: AnyMessage, model: Any = None) -> bytes:
    """Serialize one message; it is validated first, so a node never sends what it would refuse."""
    obj = {"t": msg.TYPE, "v": PROTOCOL_VERSION, **_to_wire(msg)}
    body = bytes(msg.data) if msg.HAS_BODY else b""
    from_wire(obj, body, model)
    header = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    if len(header) > MAX_JSON:
        raise _bad(msg.TYPE, f"header of {len(header)} bytes exceeds {MAX_JSON}")
    return len(header).to_bytes(4, "little") + header + body


def check_compute_request(msg: ComputeRequest, plan: Optional[Plan], node: str) -> None:
    """A compute request must match the plan this node runs: same epoch, this node's layers."""
    if plan is None or msg.epoch != plan.epoch:
        have = "no plan" if plan is None else f"plan epoch {plan.epoch}"
        raise _bad(msg.TYPE, f"epoch {msg.epoch} but this node runs {have}; re-send under the current plan")
    stage = plan.stage_of(node)
    if stage is None or stage.layers != tuple(msg.layers):
        mine = "no stage" if stage is None else f"layers {list(stage.layers)}"
        raise _bad(msg.TYPE, f"asks for layers {list(msg.layers)}, plan epoch {plan.epoch} gives this node {mine}")
