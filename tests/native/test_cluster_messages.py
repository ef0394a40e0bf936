"""Cluster message schema: every type round-trips, every rule refuses, and fuzzed input only
ever raises ClusterMessageError."""
import json
import random
import struct

import pytest

from tabmesh.errors import GGUFError, TabmeshError
from tabmesh.mesh import cluster_messages as cm
from tabmesh.mesh.planner import ModelInfo

A, B, C = "0123456789ab", "00000000000b", "00000000000c"
MODEL = ModelInfo("tiny-q4", 4, 8, 16, 32, (1000,) * 4, 2000.0, 512, 800, 900)
SHA = "ab" * 32


def f32(n, w):
    return struct.pack(f"<{n * w}f", *range(n * w))


def plan(stages=((A, (0, 2)), (B, (2, 4))), term=1, epoch=1, n_layers=4, model="tiny-q4"):
    return cm.Plan(term, epoch, model, n_layers, tuple(cm.Stage(n, r, 1.5) for n, r in stages), 3.25, A)


GPU = cm.GpuInfo("nvidia", "hopper", "H100", "desc", True, {"maxBufferSize": 1 << 30, "maxComputeWorkgroupSizeX": 256})
BENCH = cm.Bench(1200.0, 900.5, 4.0)
VALID = [
    cm.Join(GPU, 8 << 30, BENCH, (cm.CachedLayers("tiny-q4", ((0, 2), (3, 4))),)),
    cm.Join(GPU, 0, None, ()),
    cm.Leave("closing"),
    cm.Heartbeat("ready", 2.0, 7, {B: 3.5, C: 0.25}),
    cm.RequestVote(3, 2, 9),
    cm.Vote(3, True),
    cm.DistributionPlan(2, plan(), (1, 1)),
    cm.DistributionPlan(2, None, None),
    cm.PlanAck(2, 1, 1),
    cm.BenchmarkRequest(("matmul", "dispatch")),
    cm.BenchmarkResult(BENCH),
    cm.ComputeRequest(1, "s-1", 0, (0, 2), 0, (3, 1), "u32", struct.pack("<3I", 1, 15, 0)),
    cm.ComputeRequest(1, "s-1", 1, (2, 4), 3, (1, 8), "f32", f32(1, 8), want="logits"),
    cm.ComputeRequest(1, "s-1", 1, (2, 4), 3, (2, 8), "f16", bytes(32), want="argmax"),
    cm.ComputeResult(1, "s-1", 1, (0, 2), "hidden", (1, 8), "f32", 2.5, f32(1, 8)),
    cm.ComputeResult(1, "s-1", 1, (2, 4), "logits", (1, 16), "f32", 2.5, f32(1, 16)),
    cm.ComputeError(1, "s-1", 1, cm.WireError("GGUFError", "bad tensor")),
    cm.TensorChunk("tiny-q4", "blk.3.attn_q.weight", 10, 100, SHA, b"x" * 90),
    cm.TensorChunk("tiny-q4", "output.weight", 0, 1, SHA, b"y"),
]


@pytest.mark.parametrize("msg", VALID, ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg):
    for model in (None, MODEL):
        data = cm.encode(msg, model)
        assert cm.decode(data, model) == msg
        assert cm.decode(memoryview(data)) == msg


def test_every_listed_type_has_a_message():
    assert {m.TYPE for m in VALID} == set(cm.MESSAGES)


def header(msg):
    data = cm.encode(msg)
    n = int.from_bytes(data[:4], "little")
    return json.loads(data[4:4 + n]), data[4 + n:]


def raw(obj, body=b""):
    h = json.dumps(obj).encode()
    return len(h).to_bytes(4, "little") + h + body


def raw_text(text):
    return len(text).to_bytes(4, "little") + text.encode()


def mutated(msg, body=None, **changes):
    obj, old_body = header(msg)
    for k, v in changes.items():
        if v is KeyError:
            del obj[k]
        else:
            obj[k] = v
    return raw(obj, old_body if body is None else body)


P = plan()
PW = header(cm.DistributionPlan(2, P, None))[0]["plan"]
REQ0, REQ1, RES_H, RES_L, CHUNK = VALID[11], VALID[12], VALID[14], VALID[15], VALID[17]
INVALID = [
    # envelope
    (b"", "shorter than"), (b"\x05\x00\x00", "shorter than"), (b"\x01\x00\x00\x00{", "outside 2.."),
    (b"\x10\x00\x00\x00{}", "past the"), (b"\x02\x00\x00\x00\xff\xfe", "UTF-8 JSON"),
    (raw([1, 2]), "JSON object"), (b"\x03\x00\x00\x00[1]", "JSON object"),
    (len(b"[" * 5000).to_bytes(4, "little") + b"[" * 5000, "JSON"),
    (raw({"t": "nope", "v": 1}), "'t' must be"), (raw({"t": 5, "v": 1}), "'t' must be"),
    (b"\x1f\x00\x00\x00" + b'{"t":"leave","v":1,"reason":NaN}', "JSON"),
    # version, keys
    (mutated(VALID[2], v=2), "protocol version"), (mutated(VALID[2], v=True), "protocol version"),
    (mutated(VALID[2], v=1.0), "protocol version"), (mutated(VALID[2], v=KeyError), "protocol version"),
    (mutated(VALID[2], extra=1), "unknown key"), (mutated(VALID[4], term=KeyError), "missing key"),
    # scalar types and bounds
    (mutated(VALID[2], reason="crash"), "must be one of"), (mutated(VALID[4], term=True), "integer"),
    (mutated(VALID[4], term=1.0), "integer"), (mutated(VALID[4], epoch=-1), "integer"),
    (mutated(VALID[4], epoch=2**53 + 1), "integer"), (mutated(VALID[4], term=0), "integer in 1"),
    (mutated(VALID[4], planTerm=4), "ahead of term"), (mutated(VALID[8], planTerm=3), "ahead of term"),
    (mutated(VALID[3], load=-0.5), "finite number"), (mutated(VALID[3], rttMs={"zz": 1.0}), "match"),
    (mutated(VALID[3], rttMs={B: "1"}), "finite number"),
    (b"\x2c\x00\x00\x00" + b'{"t":"heartbeat","v":1,"status":"idle","loa', "past the"),
    (raw_text('{"t":"heartbeat","v":1,"status":"idle","load":1e999,"epoch":0,"rttMs":{}}'), "finite number"),
    (mutated(VALID[9], kernels=["matmul", "matmul"]), "twice"), (mutated(VALID[9], kernels=[]), "list of 1"),
    (mutated(VALID[10], bench={"matmulGflops": 1, "bandwidthGBs": 0, "dispatchUs": 1}), "finite number in \\("),
    (mutated(VALID[0], gpu={**header(VALID[0])[0]["gpu"], "vendor": "v" * 65}), "string of at most"),
    (mutated(VALID[0], gpu={**header(VALID[0])[0]["gpu"], "limits": {"bad key": 1}}), "match"),
    (mutated(VALID[0], cached=[{"model": "tiny-q4", "layers": [[0, 3], [2, 4]]}]), "overlap"),
    (mutated(VALID[0], cached=[{"model": "tiny-q4", "layers": [[2, 2]]}]), "empty or reversed"),
    # plans
    (mutated(VALID[6], plan={**PW, "stages": PW["stages"][:1]}), "stages end at layer 2"),
    (mutated(VALID[6], plan={**PW, "stages": PW["stages"][::-1]}), "expected 0"),
    (mutated(VALID[6], plan={**PW, "stages": [{**s, "node": A} for s in PW["stages"]]}), "more than one stage"),
    (mutated(VALID[6], plan={**PW, "stages": []}), "list of 1"), (mutated(VALID[6], plan={**PW, "term": 3}), "ahead"),
    (mutated(VALID[6], commit=[3, 1]), "ahead"), (mutated(VALID[6], commit=[1]), "pair"),
    (mutated(VALID[6], plan={**PW, "stages": [{**PW["stages"][0], "node": "A"}] + PW["stages"][1:]}), "match"),
    # tensors against dtype, body and model
    (mutated(REQ1, body=f32(1, 8)[:-1]), "needs 32 body bytes"), (mutated(REQ1, dtype="u32"), "f32 or f16"),
    (mutated(REQ0, dtype="f32"), "token ids"), (mutated(REQ1, shape=[0, 8]), "integer in 1"),
    (mutated(VALID[2], body=b"x"), "carries no body"), (mutated(CHUNK, body=b""), "do not fit"),
    (mutated(CHUNK, offset=11), "do not fit"), (mutated(CHUNK, tensor="blk.x.attn_q.weight"), "match"),
    (mutated(CHUNK, sha256="AB" * 32), "match"), (mutated(VALID[16], error={"type": "a b", "message": ""}), "match"),
]
NEEDS_MODEL = [
    (mutated(REQ1, layers=[2, 5]), "past the model"), (mutated(REQ1, shape=[1, 4], body=f32(1, 4)), "n_embd"),
    (mutated(REQ1, pos=32), "exceed the context"),
    (mutated(REQ0, body=struct.pack("<3I", 1, 16, 0)), "outside the vocabulary"),
    (mutated(RES_H, output="logits"), "logits come from the last layer"),
    (mutated(RES_L, output="hidden"), "n_embd"),
    (mutated(CHUNK, tensor="blk.4.attn_q.weight"), "past 4"),
    (mutated(VALID[6], plan={**PW, "nLayers": 5, "stages": [PW["stages"][0], {**PW["stages"][1], "layers": [2, 5]}]}),
     "has 4"),
    (mutated(VALID[0], cached=[{"model": "tiny-q4", "layers": [[0, 9]]}]), "past the model"),
]


@pytest.mark.parametrize("data,why", INVALID + NEEDS_MODEL)
def test_malformed_messages_raise_the_typed_error(data, why):
    with pytest.raises(cm.ClusterMessageError, match=why):
        cm.decode(data, MODEL)


@pytest.mark.parametrize("data,why", NEEDS_MODEL)
def test_model_checks_run_only_with_the_model(data, why):
    cm.decode(data)  # structurally valid; the model is what refuses it
    assert issubclass(cm.ClusterMessageError, TabmeshError)


def test_plan_of_another_model_is_not_checked_against_this_one():
    other = plan(stages=((A, (0, 3)), (B, (3, 6))), n_layers=6, model="other")
    assert cm.decode(cm.encode(cm.DistributionPlan(2, other, None)), MODEL).plan == other


def test_encode_refuses_what_decode_would_refuse():
    bad = plan(stages=((A, (0, 2)), (B, (3, 4))))
    with pytest.raises(cm.ClusterMessageError, match="expected 2"):
        cm.encode(cm.DistributionPlan(2, bad, None))
    with pytest.raises(cm.ClusterMessageError, match="body bytes"):
        cm.encode(cm.ComputeRequest(1, "s", 0, (1, 2), 0, (1, 8), "f32", b"short"), MODEL)
    with pytest.raises(cm.ClusterMessageError, match="must be"):
        cm.encode(cm.Heartbeat("ready", float("nan"), 0, {}))


def test_compute_request_checked_against_the_plan():
    p = plan(epoch=5)
    ok = cm.ComputeRequest(5, "s", 0, (2, 4), 0, (1, 8), "f32", f32(1, 8))
    cm.check_compute_request(ok, p, B)
    with pytest.raises(cm.ClusterMessageError, match="epoch 4 but this node runs plan epoch 5"):
        cm.check_compute_request(cm.ComputeRequest(4, "s", 0, (2, 4), 0, (1, 8), "f32", f32(1, 8)), p, B)
    with pytest.raises(cm.ClusterMessageError, match=r"gives this node layers \[0, 2\]"):
        cm.check_compute_request(ok, p, A)
    with pytest.raises(cm.ClusterMessageError, match="no stage"):
        cm.check_compute_request(ok, p, C)
    with pytest.raises(cm.ClusterMessageError, match="no plan"):
        cm.check_compute_request(ok, None, B)


def test_compute_error_keeps_the_error_type():
    msg = cm.ComputeError.from_exception(3, "s", 9, GGUFError("tensor blk.0 truncated"))
    back = cm.decode(cm.encode(msg)).to_exception()
    assert type(back) is GGUFError and str(back) == "tensor blk.0 truncated"
    plain = cm.ComputeError.from_exception(3, "s", 9, RuntimeError("x" * 5000))
    assert type(cm.decode(cm.encode(plain)).to_exception()) is TabmeshError


def test_join_lists_cached_layers_per_model():
    join = cm.Join(GPU, 1, None, (cm.CachedLayers("tiny-q4", ((0, 2),)), cm.CachedLayers("x", ((3, 4),)),
                                  cm.CachedLayers("tiny-q4", ((3, 4),))))
    assert join.cached_layers("tiny-q4") == {0, 1, 3}
    assert join.cached_layers("none") == frozenset()


HOSTILE = [None, True, False, 0, -1, 1, 2**53 + 1, 2**64, 0.5, -0.0, 1e308, "", "x" * 5000,
           "\ud800", [], [0], [0, 1], [1, 0], [[0, 1]], {}, {"a": 1}, {"t": "leave"}, [[[[[]]]]], "blk.0.a.weight"]


def _fuzz_values(rng):
    def tree(depth):
        r = rng.random()
        if depth > 3 or r < 0.4:
            return rng.choice(HOSTILE)
        if r < 0.7:
            return [tree(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["t", "v", "term", "layers", "node", "x"]): tree(depth + 1) for _ in range(rng.randrange(4))}
    return tree


def _only_typed_errors(data, model):
    try:
        msg = cm.decode(data, model)
    except cm.ClusterMessageError:
        return None
    again = cm.decode(cm.encode(msg, model), model)  # what decode accepts, encode sends as is
    assert again == msg
    return msg


def test_fuzz_field_values_only_raise_the_typed_error():
    rng = random.Random(1234)
    tree = _fuzz_values(rng)
    accepted = 0
    for msg in VALID:
        obj, body = header(msg)
        for key in obj:
            for value in HOSTILE + [tree(0) for _ in range(12)]:
                for model in (None, MODEL):
                    accepted += _only_typed_errors(raw({**obj, key: value}, body), model) is not None
    assert accepted > 0  # some hostile values are legal (e.g. 0 for an epoch): they must round-trip


def test_fuzz_bytes_only_raise_the_typed_error():
    rng = random.Random(99)
    encoded = [cm.encode(m) for m in VALID]
    for i in range(4000):
        data = bytearray(rng.choice(encoded))
        op = i % 4
        if op == 0:
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            del data[rng.randrange(len(data)):]
        elif op == 2:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randrange(1, 9))
        else:
            data = bytearray(rng.randbytes(rng.randrange(0, 64)))
        _only_typed_errors(bytes(data), MODEL if i % 2 else None)
