"""Schema of the signaling protocol: every client message shape, right and wrong."""

import json

import pytest

from tabmesh.mesh import signal_messages as sm

PID = "0123456789ab"

VALID = [
    ({"type": "join", "v": 1, "room": "lab"}, sm.Join(room="lab")),
    ({"type": "join", "v": 1, "room": "A-z_0.9"}, sm.Join(room="A-z_0.9")),
    ({"type": "join", "v": 1, "room": "r" * 64}, sm.Join(room="r" * 64)),
    ({"type": "signal", "to": PID, "data": {}}, sm.Signal(to=PID, data={})),
    ({"type": "signal", "to": PID, "data": {"sdp": "v=0", "n": [1, {"x": None}]}},
     sm.Signal(to=PID, data={"sdp": "v=0", "n": [1, {"x": None}]})),
    ({"type": "ping"}, sm.Ping()),
    ({"type": "leave"}, sm.Leave()),
]


@pytest.mark.parametrize("obj,expected", VALID)
def test_valid_messages(obj, expected):
    assert sm.validate_client_message(obj) == expected


def _nested(depth):
    data = {}
    for _ in range(depth - 1):
        data = {"a": data}
    return data


INVALID = [
    # 1. object with a known type
    ([1, 2], "bad-message"),
    ("join", "bad-message"),
    (None, "bad-message"),
    ({}, "bad-message"),
    ({"type": "hello"}, "bad-message"),
    ({"type": 7}, "bad-message"),
    ({"type": "welcome", "v": 1}, "bad-message"),  # a server message sent by a client
    # 2. exact keys
    ({"type": "ping", "extra": 1}, "bad-message"),
    ({"type": "leave", "room": "x"}, "bad-message"),
    ({"type": "join", "room": "lab"}, "bad-message"),
    ({"type": "join", "v": 1}, "bad-message"),
    ({"type": "join", "v": 1, "room": "lab", "peerId": PID}, "bad-message"),
    ({"type": "signal", "to": PID}, "bad-message"),
    ({"type": "signal", "data": {}}, "bad-message"),
    ({"type": "signal", "to": PID, "data": {}, "from": PID}, "bad-message"),
    # 3. version
    ({"type": "join", "v": 2, "room": "lab"}, "version"),
    ({"type": "join", "v": 0, "room": "lab"}, "version"),
    ({"type": "join", "v": "1", "room": "lab"}, "version"),
    ({"type": "join", "v": 1.0, "room": "lab"}, "version"),
    ({"type": "join", "v": True, "room": "lab"}, "version"),
    ({"type": "join", "v": None, "room": "lab"}, "version"),
    # 4. room names
    ({"type": "join", "v": 1, "room": ""}, "bad-message"),
    ({"type": "join", "v": 1, "room": "r" * 65}, "bad-message"),
    ({"type": "join", "v": 1, "room": "a b"}, "bad-message"),
    ({"type": "join", "v": 1, "room": "a/b"}, "bad-message"),
    ({"type": "join", "v": 1, "room": "lab\n"}, "bad-message"),
    ({"type": "join", "v": 1, "room": "caf\u00e9"}, "bad-message"),
    ({"type": "join", "v": 1, "room": 5}, "bad-message"),
    ({"type": "join", "v": 1, "room": ["lab"]}, "bad-message"),
    # 5. peer ids
    ({"type": "signal", "to": PID.upper(), "data": {}}, "bad-message"),
    ({"type": "signal", "to": PID[:-1], "data": {}}, "bad-message"),
    ({"type": "signal", "to": PID + "0", "data": {}}, "bad-message"),
    ({"type": "signal", "to": "0123456789ag", "data": {}}, "bad-message"),
    ({"type": "signal", "to": 123456789012, "data": {}}, "bad-message"),
    # 6. data
    ({"type": "signal", "to": PID, "data": "sdp"}, "bad-message"),
    ({"type": "signal", "to": PID, "data": [1]}, "bad-message"),
    ({"type": "signal", "to": PID, "data": None}, "bad-message"),
    ({"type": "signal", "to": PID, "data": _nested(sm.MAX_DATA_DEPTH + 1)}, "bad-message"),
]


@pytest.mark.parametrize("obj,code", INVALID)
def test_invalid_messages(obj, code):
    with pytest.raises(sm.SignalError) as info:
        sm.validate_client_message(obj)
    assert info.value.code == code
    assert info.value.message  # says what is wrong


def test_data_depth_limit_is_inclusive():
    msg = sm.validate_client_message({"type": "signal", "to": PID, "data": _nested(sm.MAX_DATA_DEPTH)})
    assert isinstance(msg, sm.Signal)


@pytest.mark.parametrize("text", ["", "{", "nope", '{"type":"ping"', "NaN", '{"a": Infinity}',
                                  '{"a": -Infinity}', "[" * 100_000 + "]" * 100_000])
def test_decode_frame_refuses_non_json(text):
    with pytest.raises(sm.SignalError) as info:
        sm.decode_frame(text)
    assert info.value.code == "bad-json"


def test_decode_frame_accepts_json():
    assert sm.decode_frame('{"type":"ping"}') == {"type": "ping"}


def test_encode_is_compact_ascii_and_survives_lone_surrogates():
    data = sm.decode_frame('{"s": "\\ud800 caf\u00e9"}')
    text = sm.encode(sm.signal_from(PID, data))
    text.encode("utf-8")  # would raise if the lone surrogate were emitted raw
    assert " " not in text.replace("\\ud800 caf", "")
    assert json.loads(text)["data"] == data


def test_server_builders_pass_server_validation():
    msgs = [
        sm.welcome(PID, "lab", ["aaaaaaaaaaaa"], heartbeat_interval_ms=2000, heartbeat_timeout_ms=6000,
                   limits={"maxMessageBytes": 16384, "maxPeersPerRoom": 32,
                           "messagesPerSecond": 40.0, "messageBurst": 80}),
        sm.peer_joined(PID), sm.peer_left(PID, "closed"), sm.peer_left(PID, "timeout"),
        sm.signal_from(PID, {"candidate": "x"}), sm.PONG,
        sm.SignalError("room-full", "full").to_dict(),
    ]
    for msg in msgs:
        assert sm.validate_server_message(json.loads(sm.encode(msg))) == msg


@pytest.mark.parametrize("obj", [
    {}, {"type": "join"}, {"type": "peer-joined"}, {"type": "peer-joined", "peerId": "x"},
    {"type": "peer-left", "peerId": PID, "reason": "bored"},
    {"type": "signal", "from": PID, "data": 3},
    {"type": "error", "code": "nope", "message": ""},
    {"type": "welcome", "v": 2, "peerId": PID, "room": "r", "peers": [], "heartbeatIntervalMs": 1,
     "heartbeatTimeoutMs": 1, "limits": {}},
])
def test_server_validation_refuses_malformed(obj):
    with pytest.raises(ValueError):
        sm.validate_server_message(obj)


def test_error_codes_fatality_and_close_codes():
    assert set(sm.FATAL_CODES) <= set(sm.ERROR_CODES)
    for code in sm.FATAL_CODES:
        assert sm.SignalError(code, "x").fatal
        assert 4000 <= sm.CLOSE_CODES[code] < 5000
    for code in ("bad-json", "bad-message", "too-large", "rate-limited", "not-joined",
                 "already-joined", "unknown-peer"):
        assert not sm.SignalError(code, "x").fatal
    assert len(set(sm.CLOSE_CODES.values()) | {sm.CLOSE_TIMEOUT, sm.CLOSE_SLOW_CONSUMER}) == len(sm.CLOSE_CODES) + 2
    with pytest.raises(AssertionError):
        sm.SignalError("made-up", "x")
