"""Mesh node logic over an in-memory network (the browser uses RTCPeerConnection instead)."""
import asyncio
import hashlib
import random

from tabmesh.mesh.frames import HEADER_SIZE
from tabmesh.mesh.node import Node


class MemoryNet:
    """A fake signaling server plus in-memory data channels with a small max frame."""

    def __init__(self, max_frame=4096 + HEADER_SIZE):
        self.nodes: dict[str, Node] = {}
        self.links: dict[tuple[str, str], "MemoryLink"] = {}
        self.max_frame = max_frame
        self.signals = 0

    def join(self, pid: str) -> Node:
        node = Node(make_link=lambda n, peer, initiator: MemoryLink(self, n, peer, initiator),
                    send_signaling=lambda msg, me=pid: self._relay(me, msg))
        others = list(self.nodes)
        self.nodes[pid] = node
        node.on_signaling({"type": "welcome", "peerId": pid, "room": "r", "peers": others})
        for other in others:
            self.nodes[other].on_signaling({"type": "peer-joined", "peerId": pid})
        return node

    def leave(self, pid: str) -> None:
        node = self.nodes.pop(pid)
        node.close()
        for other in self.nodes.values():
            other.on_signaling({"type": "peer-left", "peerId": pid, "reason": "closed"})

    def _relay(self, sender: str, msg: dict) -> None:
        self.signals += 1
        target = self.nodes.get(msg["to"])
        if target is not None:
            target.on_signaling({"type": "signal", "from": sender, "data": msg["data"]})


class MemoryLink:
    def __init__(self, net, node, peer_id, initiator):
        self.net, self.node, self.peer_id, self.initiator = net, node, peer_id, initiator
        self.max_frame = net.max_frame
        net.links[(node.peer_id, peer_id)] = self

    async def start(self):
        if self.initiator:
            self.node.send_signal(self.peer_id, {"kind": "offer", "sdp": "fake"})

    async def handle_signal(self, data):
        if data["kind"] == "offer":
            self.node.send_signal(self.peer_id, {"kind": "answer", "sdp": "fake"})
            self.node.link_state(self.peer_id, "open")
        elif data["kind"] == "answer":
            self.node.link_state(self.peer_id, "open")

    async def send(self, frame):
        other = self.net.links.get((self.peer_id, self.node.peer_id))
        await asyncio.sleep(0)
        if other is not None:
            other.node.link_frame(self.node.peer_id, bytes(frame))

    def close(self):
        self.net.links.pop((self.node.peer_id, self.peer_id), None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_two_nodes_connect_ping_and_exchange_a_megabyte():
    async def main():
        net = MemoryNet()
        a, b = net.join("a"), net.join("b")
        await a.wait_open(1, 5)
        await b.wait_open(1, 5)
        rtt = await a.ping("b")
        assert rtt >= 0
        payload = random.Random(7).randbytes(1 << 20)
        assert await a.echo("b", payload) == payload
        await b.send_data("a", payload)
        for _ in range(200):
            if a.inbox:
                break
            await asyncio.sleep(0.01)
        assert a.inbox[-1] == {"from": "b", "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        assert [p["peerId"] for p in a.peer_list()] == ["b"] and a.peer_list()[0]["state"] == "open"
        a.close(); b.close()
    run(main())


def test_malformed_frames_are_dropped_and_node_keeps_working():
    async def main():
        net = MemoryNet()
        a, b = net.join("a"), net.join("b")
        await a.wait_open(1, 5)
        rng = random.Random(3)
        for _ in range(500):
            b.link_frame("a", rng.randbytes(rng.randrange(0, 80)))
        b.link_frame("a", b"TM\x01\x05" + b"\xff" * 20)  # hostile header: chunk index past count
        assert b.dropped_frames >= 500
        assert await a.echo("b", b"still alive") == b"still alive"
        a.close(); b.close()
    run(main())


def test_peer_left_removes_peer_and_fails_pending_requests():
    async def main():
        net = MemoryNet()
        a, b, c = net.join("a"), net.join("b"), net.join("c")
        await a.wait_open(2, 5)
        assert {p["peerId"] for p in c.peer_list()} == {"a", "b"}
        net.leave("b")
        assert {p["peerId"] for p in a.peer_list()} == {"c"}
        assert {p["peerId"] for p in c.peer_list()} == {"a"}
        assert await a.echo("c", b"x") == b"x"
        a.close(); c.close()
    run(main())
