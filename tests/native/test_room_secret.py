"""Room secrets (mesh/auth.py): signed SDP fingerprints, the HELLO proof, and Node's gate,
over the in-memory network of test_node (the browser test is tests/browser/test_secret.py)."""
import asyncio
import hashlib
import json
import random

import pytest

from tabmesh.mesh import auth
from tabmesh.mesh.frames import Kind, encode_message
from tabmesh.mesh.node import Node
from test_node import MemoryLink, MemoryNet

ROOM = "r"
A, B, C = "00000000000a", "00000000000b", "00000000000c"


def fp(seed: str) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(seed.encode()).digest())


def sdp(seed: str, extra: str = "") -> str:
    return (f"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
            f"a=fingerprint:sha-256 {fp(seed)}\r\n{extra}a=setup:actpass\r\n")


# ---- auth.py on its own ----------------------------------------------------------------------

def test_tag_verifies_and_binds_kind_ids_room_and_fingerprint():
    k = auth.RoomKey("s3cret", ROOM)
    offer = sdp("alice")
    tag = k.sdp_tag("offer", A, B, offer)
    k.check_sdp_tag("offer", A, B, offer, tag)
    # only the fingerprint counts: other SDP lines (ICE ufrag, candidates) may differ, and
    # case, \r and line order of fingerprint lines are normalized
    k.check_sdp_tag("offer", A, B, offer.replace("a=setup:actpass", "a=setup:active").lower()
                    .replace("a=fingerprint:sha-256", "a=fingerprint:SHA-256"), tag)
    bad = [
        ("answer", A, B, offer),                 # role bound
        ("offer", B, A, offer),                  # direction bound
        ("offer", C, B, offer),                  # sender bound (the server says who sent it)
        ("offer", A, C, offer),                  # receiver bound
        ("offer", A, B, sdp("mallory")),         # fingerprint swapped: the MITM case
        ("offer", A, B, sdp("alice", f"a=fingerprint:sha-256 {fp('mallory')}\r\n")),  # one added
    ]
    for args in bad:
        with pytest.raises(auth.AuthError) as e:
            k.check_sdp_tag(*args, tag)
        assert e.value.code == "bad-tag", args
    for other in (auth.RoomKey("s3cret!", ROOM), auth.RoomKey("s3cret", "r2")):   # wrong secret, other room
        with pytest.raises(auth.AuthError, match="bad-tag"):
            other.check_sdp_tag("offer", A, B, offer, tag)


def test_hostile_tags_and_sdps_are_auth_errors_never_crashes():
    k = auth.RoomKey("s", ROOM)
    good = sdp("alice")
    for tag in (None, 5, [], "", "0" * 63, "0" * 65, "G" * 64, "A" * 64, "0" * 10_000, {"x": 1}):
        with pytest.raises(auth.AuthError):
            k.check_sdp_tag("offer", A, B, good, tag)
    tag = k.sdp_tag("offer", A, B, good)
    for s in (None, 3, "", "v=0\r\n", "a=fingerprint:sha-256 zz", "a=fingerprint: sha-256 " + fp("a"),
              "A=FINGERPRINT:sha-256 " + fp("a"), good + "a=fingerprint:sha-256\r\n",
              "".join(f"a=fingerprint:sha-256 {fp(str(i))}\n" for i in range(9)), "x" * 100_000):
        with pytest.raises(auth.AuthError) as e:
            k.check_sdp_tag("offer", A, B, s, tag)
        assert e.value.code in ("bad-sdp", "bad-tag")
    with pytest.raises(ValueError):
        auth.RoomKey("", ROOM)
    assert "s3" not in repr(auth.RoomKey("s3", ROOM))


def test_fields_cannot_be_shifted():
    assert auth.fields("ab", "c") != auth.fields("a", "bc")
    assert auth.fields("a|b") != auth.fields("a", "b")


def test_open_signal_modes():
    k = auth.RoomKey("s", ROOM)
    offer = {"kind": "offer", "sdp": sdp("alice")}
    signed = auth.sign_signal(k, A, B, offer)
    assert auth.open_signal(k, A, B, signed) == offer           # the tag is stripped for rtc.py
    assert auth.open_signal(None, A, B, offer) == offer         # no secret on either side
    ice = {"kind": "ice", "candidate": "c", "sdpMid": "0", "sdpMLineIndex": 0}
    assert auth.sign_signal(k, A, B, ice) == ice and auth.open_signal(k, A, B, ice) == ice
    for key, data, code in ((k, offer, "secret-required"), (None, signed, "no-secret-here"),
                            (auth.RoomKey("t", ROOM), signed, "bad-tag")):
        with pytest.raises(auth.AuthError) as e:
            auth.open_signal(key, A, B, data)
        assert e.value.code == code


def test_hello_handshake_proves_both_ways_and_refuses_forgeries():
    k = auth.RoomKey("s", ROOM)
    a, b = auth.Handshake(k, A, B), auth.Handshake(k, B, A)
    pa, pb = a.receive(b.first()), b.receive(a.first())
    assert not a.peer_verified and not b.peer_verified
    assert a.receive(pb) is None and b.receive(pa) is None
    assert a.peer_verified and b.peer_verified
    # a proof is bound to the verifier's fresh nonce: replaying it to a new handshake fails
    b2 = auth.Handshake(k, B, A)
    b2.receive(a.first())
    with pytest.raises(auth.AuthError, match="bad-proof"):
        b2.receive(pa)
    # reflection: b's own proof sent back to b does not verify (prover and order are bound),
    # even when the reflector copies b's nonce as its own
    b3 = auth.Handshake(k, B, A)
    own = b3.receive({**b3.first(), "peerId": A})
    with pytest.raises(auth.AuthError, match="bad-proof"):
        b3.receive({**own, "peerId": A})
    # wrong key, mode mismatch both ways, junk
    m = auth.Handshake(auth.RoomKey("x", ROOM), A, B)
    b4 = auth.Handshake(k, B, A)
    proof = m.receive(b4.first())
    b4.receive(m.first())
    with pytest.raises(auth.AuthError, match="bad-proof"):
        b4.receive(proof)
    with pytest.raises(auth.AuthError, match="secret-required"):
        auth.Handshake(k, B, A).receive(auth.Handshake(None, A, B).first())
    with pytest.raises(auth.AuthError, match="no-secret-here"):
        auth.Handshake(None, B, A).receive(auth.Handshake(k, A, B).first())
    for junk in (None, [], {"v": 2}, {"v": 1, "peerId": C}, {"v": 1, "peerId": A},
                 {"v": 1, "peerId": A, "nonce": "zz", "secret": True}, {"v": 1, "peerId": A, "proof": "0" * 64}):
        with pytest.raises(auth.AuthError):
            auth.Handshake(k, B, A).receive(junk)
    # no secret anywhere: one HELLO each way, no proof
    x, y = auth.Handshake(None, A, B), auth.Handshake(None, B, A)
    assert x.receive(y.first()) is None and x.peer_verified


# ---- Node over the in-memory network ---------------------------------------------------------

class SdpLink(MemoryLink):
    """MemoryLink with SDPs that carry a DTLS fingerprint (of this end)."""

    async def start(self):
        if self.initiator:
            self.node.send_signal(self.peer_id, {"kind": "offer", "sdp": sdp(self.node.peer_id)})

    async def handle_signal(self, data):
        self.net.seen.append((self.node.peer_id, self.peer_id, data["kind"]))
        if data["kind"] == "offer":
            self.node.send_signal(self.peer_id, {"kind": "answer", "sdp": sdp(self.node.peer_id)})
            self.node.link_state(self.peer_id, "open")
        elif data["kind"] == "answer":
            self.node.link_state(self.peer_id, "open")


class SecretNet(MemoryNet):
    """Each node has its own key (or none); `tamper(sender, msg)` plays a hostile server."""

    def __init__(self, tamper=None):
        super().__init__()
        self.tamper = tamper or (lambda sender, msg: (sender, msg))
        self.seen = []          # (node, peer, kind) of every signal a link was handed
        self.frames = {}        # node -> [(from, kind)] of every frame that reached it

    def join(self, pid, key=None):
        node = Node(make_link=lambda n, peer, initiator: SdpLink(self, n, peer, initiator),
                    send_signaling=lambda msg, me=pid: self._relay(me, msg), room_key=key)
        frames = self.frames[pid] = []
        original = node.link_frame

        def recording(peer, data):
            try:
                frames.append((peer, Kind(data[3])))
            except (IndexError, ValueError):
                frames.append((peer, None))
            original(peer, data)
        node.link_frame = recording
        node.cluster_in = []
        node.on_cluster = lambda peer, payload: node.cluster_in.append(peer)
        node.opened = []
        node.peer_listeners.append(lambda peer, state: node.opened.append((peer, state)))
        others = list(self.nodes)
        self.nodes[pid] = node
        node.on_signaling({"type": "welcome", "peerId": pid, "room": ROOM, "peers": others})
        for other in others:
            self.nodes[other].on_signaling({"type": "peer-joined", "peerId": pid})
        return node

    def _relay(self, sender, msg):
        tampered = self.tamper(sender, msg)
        if tampered is not None:        # None: the server drops it
            super()._relay(*tampered)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def states(node):
    return {p["peerId"]: p["state"] for p in node.peer_list()}


async def settle(s=0.2):
    await asyncio.sleep(s)


def key(secret="s3cret"):
    return auth.RoomKey(secret, ROOM)


def test_two_nodes_with_the_secret_talk():
    async def main():
        net = SecretNet()
        a, b = net.join(A, key()), net.join(B, key())
        await a.wait_open(1, 5)
        await b.wait_open(1, 5)
        assert await a.echo(B, b"hi") == b"hi"
        await b.send_data(A, b"x" * 10_000)
        await b.send_cluster(A, b"c")
        await settle(0.05)
        assert a.inbox and a.cluster_in == [B]
        assert a.rejected == b.rejected == 0 and (B, "open") in a.opened
        a.close(); b.close()
    run(main())


@pytest.mark.parametrize("intruder_key", [None, "another secret"], ids=["no-secret", "wrong-secret"])
def test_a_peer_without_the_secret_is_rejected_by_both_and_gets_nothing(intruder_key):
    async def main():
        net = SecretNet()
        a, b = net.join(A, key()), net.join(B, key())
        await a.wait_open(1, 5)
        c = net.join(C, key(intruder_key) if intruder_key else None)
        await settle()
        assert states(a) == {B: "open", C: "rejected"} and states(b) == {A: "open", C: "rejected"}
        assert states(c) == {A: "rejected", B: "rejected"}
        assert a.rejected == b.rejected == 1 and c.rejected == 2
        code = "bad-tag" if intruder_key else "secret-required"
        row = {p["peerId"]: p for p in c.peer_list()}[A]
        assert row["reason"] == f"peer {A} refused this tab: {auth.REASONS[code][1]}"
        assert {p["peerId"]: p for p in a.peer_list()}[C]["reason"].startswith(f"refused peer {C}: ")
        # the honest pair never set C's offer, never opened a channel, and sends it nothing
        assert not [s for s in net.seen if s[1] == C and s[2] in ("offer", "answer")]
        for node in (a, b):
            with pytest.raises(ConnectionError):
                await node.send_data(C, b"activations")
            with pytest.raises(ConnectionError):
                await node.send_cluster(C, b"plan")
        assert net.frames[C] == [] and c.inbox == [] and c.cluster_in == []
        assert (C, "open") not in a.opened + b.opened
        # later ICE from the rejected peer is ignored; the honest pair keeps working
        a.on_signaling({"type": "signal", "from": C, "data": {"kind": "ice", "candidate": "x", "sdpMid": "0",
                                                              "sdpMLineIndex": 0}})
        assert await a.echo(B, b"still") == b"still"
        net.leave(C)
        assert states(a) == {B: "open"}
        for n in (a, b):
            n.close()
    run(main())


def test_a_secret_tab_and_a_secretless_tab_refuse_each_other_whoever_comes_first():
    async def main():
        net = SecretNet()
        c = net.join(C, None)           # C first: A offers (signed) to C, C refuses it
        a = net.join(A, key())
        await settle()
        assert states(a) == {C: "rejected"} and states(c) == {A: "rejected"}
        assert {p["peerId"]: p for p in a.peer_list()}[C]["reason"].endswith(auth.REASONS["no-secret-here"][1])
        a.close(); c.close()
    run(main())


def test_a_server_that_swaps_the_fingerprint_or_the_sender_is_caught():
    def swap_fingerprint(sender, msg):
        data = msg["data"]
        if data.get("kind") == "offer":    # the server puts its own certificate in A's offer
            msg = {**msg, "data": {**data, "sdp": data["sdp"].replace(fp(sender), fp("mitm"))}}
        return sender, msg

    async def main():
        net = SecretNet(tamper=swap_fingerprint)
        b = net.join(B, key())
        a = net.join(A, key())
        await settle()
        assert states(a) == {B: "rejected"} and states(b) == {A: "rejected"}
        assert "altered" in {p["peerId"]: p for p in b.peer_list()}[A]["reason"]
        assert not [s for s in net.seen if s[2] in ("offer", "answer")]   # never set as remote description
        a.close(); b.close()
    run(main())

    def relabel(sender, msg):
        if sender == A:
            return None                     # A's own offer never arrives...
        if sender == C and msg["to"] == B:
            return A, msg                   # ...and the server passes C's signed offer off as A's
        return sender, msg

    async def main2():
        net = SecretNet(tamper=relabel)
        b = net.join(B, key())
        a = net.join(A, key())
        c = net.join(C, key())
        await settle()
        assert states(b)[A] == "rejected" and b.rejected == 1
        assert not [s for s in net.seen if s[:2] == (B, A) and s[2] == "offer"]
        for n in (a, b, c):
            n.close()
    run(main2())


class ForgetfulKey(auth.RoomKey):
    """Signs SDPs correctly but cannot prove itself in HELLO (tests the second layer alone)."""
    __slots__ = ()

    def hello_proof(self, *args):
        return "0" * 64


def test_hello_proof_gates_every_frame_kind():
    async def main():
        net = SecretNet()
        a = net.join(A, key())
        m = net.join(B, ForgetfulKey("s3cret", ROOM))
        # Mallory pushes DATA, CLUSTER and CALL frames before and after her (bad) HELLO
        for kind in (Kind.DATA, Kind.CLUSTER, Kind.CALL, Kind.PING):
            for frame in encode_message(kind, 7, b"x" * 100, max_frame=net.max_frame):
                a.link_frame(B, frame)
        await settle()
        assert states(a) == {B: "rejected"} and "HELLO proof" in a.peer_list()[0]["reason"]
        assert a.inbox == [] and a.cluster_in == [] and a.dropped_frames >= 4
        assert (B, "open") not in a.opened
        assert {k for _, k in net.frames[B]} <= {Kind.HELLO}    # A sent Mallory nothing but HELLO
        with pytest.raises(ConnectionError):
            await a.send_data(B, b"x")
        a.close(); m.close()
    run(main())


def test_hostile_signals_and_hellos_never_crash_the_node():
    async def main():
        net = SecretNet()
        a, b = net.join(A, key()), net.join(B, key())
        await a.wait_open(1, 5)
        rng = random.Random(5)
        junk_data = [{}, {"kind": None}, {"kind": "offer"}, {"kind": "offer", "sdp": 5, "tag": []},
                     {"kind": "answer", "sdp": "x" * 20_000, "tag": "0" * 64}, {"kind": "reject", "reason": [1]},
                     {"kind": "reject"}, {"kind": "offer", "sdp": sdp("z"), "tag": "f" * 64}]
        for i, data in enumerate(junk_data * 3):
            pid = f"{i + 0x100:012x}"
            a.on_signaling({"type": "signal", "from": pid, "data": data})
        # a forged reject or a forged re-offer for the open peer B changes nothing
        a.on_signaling({"type": "signal", "from": B, "data": {"kind": "reject", "reason": "bad-tag"}})
        a.on_signaling({"type": "signal", "from": B, "data": {"kind": "offer", "sdp": sdp("mitm"), "tag": "0" * 64}})
        for _ in range(200):   # HELLO junk from the open peer is only dropped
            a.link_frame(B, encode_message(Kind.HELLO, 1, rng.randbytes(rng.randrange(0, 64)))[0])
        a.link_frame(B, encode_message(Kind.HELLO, 1, json.dumps({"v": 1, "peerId": B, "proof": "0" * 64}).encode())[0])
        await settle()
        assert states(a)[B] == "open" and await a.echo(B, b"ok") == b"ok"
        a.close(); b.close()
    run(main())


def test_a_peer_that_never_says_hello_is_rejected_after_the_deadline(monkeypatch):
    from tabmesh.mesh import node as node_mod
    monkeypatch.setattr(node_mod, "HELLO_TIMEOUT_S", 0.2)

    async def main():
        net = SecretNet()
        a = net.join(A, key())
        a.on_signaling({"type": "peer-joined", "peerId": B})
        a.link_state(B, "open")            # a channel opened, and nothing ever came over it
        assert states(a) == {B: "authenticating"}
        await asyncio.sleep(0.4)
        assert states(a) == {B: "rejected"} and "no valid HELLO" in a.peer_list()[0]["reason"]
        a.close()
    run(main())


def test_node_url_puts_key_and_secret_in_the_fragment_only():
    from urllib.parse import parse_qs, urlsplit
    from tabmesh.headless import node_url
    url = urlsplit(node_url("http://h:1", "r", "k+/&", True, secret="a b&c=#é"))
    assert parse_qs(url.query) == {"room": ["r"], "serve": ["1"]}
    assert parse_qs(url.fragment) == {"key": ["k+/&"], "secret": ["a b&c=#é"]}
    assert "#" not in node_url("http://h:1", "r", None)
