"""The signaling state machine (rooms.Hub) with fake sockets and a fake clock."""

import itertools
import json

import pytest

from signaling.rooms import Hub, HubLimits
from tabmesh.mesh import signal_messages as sm


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeSink:
    def __init__(self, accept=True):
        self.accept = accept
        self.sent: list[dict] = []
        self.closed_with = None

    def send(self, text):
        if not self.accept:
            return False
        self.sent.append(sm.validate_server_message(json.loads(text)))
        return True

    def close(self, code, reason):
        assert self.closed_with is None, "closed twice"
        self.closed_with = (code, reason)

    def take(self):
        out, self.sent = self.sent, []
        return out


def make_hub(**limits):
    clock = FakeClock()
    return Hub(HubLimits(**limits), clock=clock), clock


def send(hub, peer, obj):
    hub.receive_text(peer, obj if isinstance(obj, str) else json.dumps(obj))


def connect_and_join(hub, room="lab"):
    sink = FakeSink()
    peer = hub.connect(sink)
    send(hub, peer, {"type": "join", "v": 1, "room": room})
    [welcome] = sink.take()
    assert welcome["type"] == "welcome" and welcome["room"] == room
    return peer, sink, welcome


def codes(sink):
    return [m["code"] for m in sink.take() if m["type"] == "error"]


def test_join_welcome_and_peer_joined():
    hub, _ = make_hub()
    a, sa, wa = connect_and_join(hub)
    b, sb, wb = connect_and_join(hub)
    assert wa["peers"] == [] and wb["peers"] == [wa["peerId"]]
    assert wa["peerId"] != wb["peerId"] and len(wa["peerId"]) == 12
    assert wb["limits"] == {"maxMessageBytes": 16384, "maxPeersPerRoom": 32,
                            "messagesPerSecond": 40.0, "messageBurst": 80}
    assert (wb["heartbeatIntervalMs"], wb["heartbeatTimeoutMs"]) == (2000, 6000)
    assert sa.take() == [sm.peer_joined(wb["peerId"])]
    assert sb.take() == []
    assert hub.stats() == {"rooms": 1, "peers": 2, "connections": 2}


def test_relay_both_ways_and_only_inside_the_room():
    hub, _ = make_hub()
    a, sa, wa = connect_and_join(hub, "r1")
    b, sb, wb = connect_and_join(hub, "r1")
    x, sx, wx = connect_and_join(hub, "r2")
    sa.take()
    send(hub, a, {"type": "signal", "to": wb["peerId"], "data": {"sdp": "offer"}})
    assert sb.take() == [sm.signal_from(wa["peerId"], {"sdp": "offer"})]
    send(hub, b, {"type": "signal", "to": wa["peerId"], "data": {"sdp": "answer"}})
    assert sa.take() == [sm.signal_from(wb["peerId"], {"sdp": "answer"})]
    # another room: same answer as for an id that does not exist at all
    send(hub, x, {"type": "signal", "to": wa["peerId"], "data": {}})
    send(hub, x, {"type": "signal", "to": "ffffffffffff", "data": {}})
    errors = sx.take()
    assert [e["code"] for e in errors] == ["unknown-peer", "unknown-peer"]
    assert errors[0]["message"].replace(wa["peerId"], "ID") == errors[1]["message"].replace("ffffffffffff", "ID")
    assert wx["peers"] == [] and sa.take() == [] and sb.take() == []
    send(hub, a, {"type": "signal", "to": wa["peerId"], "data": {}})  # yourself
    assert codes(sa) == ["unknown-peer"]


def test_leave_and_disconnect_announce_closed_and_rooms_are_deleted():
    hub, _ = make_hub()
    a, sa, wa = connect_and_join(hub)
    b, sb, wb = connect_and_join(hub)
    c, sc, wc = connect_and_join(hub)
    sa.take(), sb.take()
    send(hub, b, {"type": "leave"})
    assert sb.closed_with == (1000, "left")
    assert sa.take() == [sm.peer_left(wb["peerId"], "closed")] == sc.take()
    hub.disconnect(c)
    assert sa.take() == [sm.peer_left(wc["peerId"], "closed")]
    hub.disconnect(c)  # idempotent
    assert hub.stats() == {"rooms": 1, "peers": 1, "connections": 1}
    hub.disconnect(a)
    assert hub.stats() == {"rooms": 0, "peers": 0, "connections": 0}
    send(hub, a, {"type": "ping"})  # frames after the end are ignored
    assert sa.take() == []


def test_sweep_drops_silent_peers_with_timeout():
    hub, clock = make_hub(heartbeat_timeout_s=6.0)
    a, sa, wa = connect_and_join(hub)
    b, sb, wb = connect_and_join(hub)
    idle = hub.connect(FakeSink())  # never joins, never speaks
    sa.take()
    clock.now += 5.0
    send(hub, a, {"type": "ping"})
    assert sa.take() == [sm.PONG]
    assert hub.sweep() == []
    clock.now += 1.5
    dropped = hub.sweep()
    assert set(dropped) == {b, idle}
    assert sb.closed_with[0] == sm.CLOSE_TIMEOUT and idle.sink.closed_with[0] == sm.CLOSE_TIMEOUT
    assert sa.take() == [sm.peer_left(wb["peerId"], "timeout")]
    assert a.sink.closed_with is None
    # an invalid frame still proves liveness
    clock.now += 5.0
    send(hub, a, "garbage")
    clock.now += 5.0
    assert hub.sweep() == []


def test_token_bucket_rate_limit():
    hub, clock = make_hub(rate_per_s=10.0, rate_burst=5)
    a, sa, _ = connect_and_join(hub)  # the join took one token
    for _ in range(6):
        send(hub, a, {"type": "ping"})
    msgs = sa.take()
    assert [m["type"] for m in msgs] == ["pong"] * 4 + ["error"] * 2
    assert msgs[-1]["code"] == "rate-limited"
    clock.now += 0.2  # two tokens back
    for _ in range(3):
        send(hub, a, {"type": "ping"})
    assert [m["type"] for m in sa.take()] == ["pong", "pong", "error"]
    clock.now += 100.0  # refill stops at the burst
    for _ in range(6):
        send(hub, a, {"type": "ping"})
    assert [m["type"] for m in sa.take()].count("pong") == 5
    assert a.sink.closed_with is None


def test_too_large_is_tolerated_three_times_then_fatal():
    hub, _ = make_hub(max_message_bytes=100)
    a, sa, _ = connect_and_join(hub)
    big = json.dumps({"type": "signal", "to": "0" * 12, "data": {"x": "y" * 200}})
    for _ in range(3):
        send(hub, a, big)
    assert codes(sa) == ["too-large"] * 3 and sa.closed_with is None
    send(hub, a, {"type": "ping"})
    assert sa.take() == [sm.PONG]
    send(hub, a, "\u00e9" * 60)  # 60 characters, 120 bytes: counted in bytes
    assert codes(sa) == ["too-large"]
    assert sa.closed_with == (sm.CLOSE_CODES["too-large"], "too many oversized frames")
    assert hub.stats()["connections"] == 0


def test_fatal_join_errors_close_with_their_codes():
    hub, _ = make_hub(max_peers_per_room=2, max_rooms=1, max_connections=4)
    connect_and_join(hub, "r")
    connect_and_join(hub, "r")
    for room, code in (("r", "room-full"), ("other", "too-many-rooms")):
        sink = FakeSink()
        peer = hub.connect(sink)
        send(hub, peer, {"type": "join", "v": 1, "room": room})
        assert codes(sink) == [code]
        assert sink.closed_with[0] == sm.CLOSE_CODES[code]
    sink = FakeSink()
    send(hub, hub.connect(sink), {"type": "join", "v": 2, "room": "r"})
    assert codes(sink) == ["version"] and sink.closed_with[0] == sm.CLOSE_CODES["version"]
    assert hub.stats() == {"rooms": 1, "peers": 2, "connections": 2}


def test_server_full():
    hub, _ = make_hub(max_connections=2)
    hub.connect(FakeSink()), hub.connect(FakeSink())
    sink = FakeSink()
    peer = hub.connect(sink)
    assert peer.closed and codes(sink) == ["server-full"]
    assert sink.closed_with[0] == sm.CLOSE_CODES["server-full"]
    assert hub.stats()["connections"] == 2


def test_state_errors_keep_the_socket_open():
    hub, _ = make_hub()
    sink = FakeSink()
    peer = hub.connect(sink)
    send(hub, peer, {"type": "signal", "to": "0" * 12, "data": {}})
    send(hub, peer, {"type": "leave"})
    send(hub, peer, {"type": "ping"})
    assert [m.get("code", m["type"]) for m in sink.take()] == ["not-joined", "not-joined", "pong"]
    send(hub, peer, {"type": "join", "v": 1, "room": "a"})
    send(hub, peer, {"type": "join", "v": 1, "room": "b"})
    hub.receive_binary(peer)
    send(hub, peer, "{not json")
    msgs = sink.take()
    assert msgs[0]["type"] == "welcome"
    assert [m["code"] for m in msgs[1:]] == ["already-joined", "bad-message", "bad-json"]
    assert sink.closed_with is None and hub.stats()["rooms"] == 1


def test_slow_consumer_is_dropped_without_blocking_the_sender():
    hub, _ = make_hub()
    a, sa, wa = connect_and_join(hub)
    b, sb, wb = connect_and_join(hub)
    c, sc, wc = connect_and_join(hub)
    sa.take(), sb.take()
    sb.accept = False
    send(hub, a, {"type": "signal", "to": wb["peerId"], "data": {}})
    assert sb.closed_with[0] == sm.CLOSE_SLOW_CONSUMER
    assert sa.take() == [sm.peer_left(wb["peerId"], "closed")] == sc.take()
    assert hub.stats()["peers"] == 2


def test_peer_id_collisions_are_retried():
    ids = itertools.chain(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    hub = Hub(HubLimits(), clock=FakeClock(), new_peer_id=lambda: next(ids))
    _, _, w1 = connect_and_join(hub)
    _, _, w2 = connect_and_join(hub, "other-room")
    assert (w1["peerId"], w2["peerId"]) == ("aaaaaaaaaaaa", "bbbbbbbbbbbb")


@pytest.mark.parametrize("n", [1, 31, 32])
def test_room_capacity_boundary(n):
    hub, _ = make_hub(max_peers_per_room=32)
    welcomes = [connect_and_join(hub)[2] for _ in range(n)]
    assert len(welcomes[-1]["peers"]) == n - 1
