"""WebSocket signaling end to end over real sockets on localhost."""

import asyncio
import contextlib
import json
import random
import time

import aiohttp
import pytest

from signaling.server import ServerConfig, start
from tabmesh.mesh import signal_messages as sm


@contextlib.asynccontextmanager
async def serving(tmp_path, **overrides):
    config = ServerConfig(root=tmp_path, port=0, **overrides)
    runner, _, port = await start(config)
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(f"http://127.0.0.1:{port}", session)
    finally:
        await runner.cleanup()


class Server:
    def __init__(self, base, session):
        self.base, self.session = base, session

    async def connect(self, **kwargs):
        return Client(await self.session.ws_connect(self.base + "/ws", **kwargs))

    async def join(self, room="lab"):
        client = await self.connect()
        client.welcome = await client.join(room)
        return client

    async def health(self):
        async with self.session.get(self.base + "/healthz") as r:
            return await r.json()


class Client:
    def __init__(self, ws):
        self.ws = ws
        self.welcome = None

    @property
    def id(self):
        return self.welcome["peerId"]

    async def send(self, obj):
        await self.ws.send_str(obj if isinstance(obj, str) else json.dumps(obj))

    async def recv(self, timeout=2.0):
        msg = await self.ws.receive(timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        return sm.validate_server_message(json.loads(msg.data))

    async def join(self, room):
        await self.send({"type": "join", "v": 1, "room": room})
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    async def error_code(self, frame):
        if isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.send(frame)
        reply = await self.recv()
        assert reply["type"] == "error", reply
        return reply["code"]

    async def closed_with(self, timeout=2.0):
        """Read up to the close frame; return (close code, messages seen before it)."""
        seen = []
        while True:
            msg = await self.ws.receive(timeout)
            if msg.type is aiohttp.WSMsgType.TEXT:
                seen.append(json.loads(msg.data))
            else:
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
                return self.ws.close_code, seen


async def exchange(a, b):
    await a.send({"type": "signal", "to": b.id, "data": {"sdp": "offer"}})
    assert await b.recv() == {"type": "signal", "from": a.id, "data": {"sdp": "offer"}}
    await b.send({"type": "signal", "to": a.id, "data": {"sdp": "answer"}})
    assert await a.recv() == {"type": "signal", "from": b.id, "data": {"sdp": "answer"}}


def run(coro, timeout=5.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_two_peers_meet_and_signal_both_ways(tmp_path):
    async def go():
        async with serving(tmp_path) as srv:
            a = await srv.join()
            b = await srv.join()
            assert a.welcome["peers"] == [] and b.welcome["peers"] == [a.id]
            assert b.welcome["limits"]["maxMessageBytes"] == 16384
            assert await a.recv() == {"type": "peer-joined", "peerId": b.id}
            await exchange(a, b)
            await a.send({"type": "ping"})
            assert await a.recv() == {"type": "pong"}
            assert (await srv.health())["peers"] == 2
    run(go())


def test_rooms_are_isolated(tmp_path):
    async def go():
        async with serving(tmp_path) as srv:
            a, b = await srv.join("r1"), await srv.join("r1")
            await a.recv()  # peer-joined b
            x = await srv.join("r2")
            assert x.welcome["peers"] == []
            assert await x.error_code({"type": "signal", "to": a.id, "data": {"evil": 1}}) == "unknown-peer"
            await a.send({"type": "ping"})
            assert await a.recv() == {"type": "pong"}  # no peer-joined for x, no signal from x
            await b.send({"type": "ping"})
            assert await b.recv() == {"type": "pong"}
            assert (await srv.health())["rooms"] == 2
    run(go())


def test_leave_and_close_announce_closed(tmp_path):
    async def go():
        async with serving(tmp_path) as srv:
            a, b, c = await srv.join(), await srv.join(), await srv.join()
            await a.recv(), await a.recv(), await b.recv()
            await b.send({"type": "leave"})
            assert await a.recv() == {"type": "peer-left", "peerId": b.id, "reason": "closed"}
            assert await c.recv() == {"type": "peer-left", "peerId": b.id, "reason": "closed"}
            assert (await b.closed_with())[0] == 1000
            await c.ws.close()
            assert await a.recv() == {"type": "peer-left", "peerId": c.id, "reason": "closed"}
            await a.ws.close()
            for _ in range(50):
                health = await srv.health()
                if health["rooms"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert (health["rooms"], health["peers"]) == (0, 0)
    run(go())


def test_silent_peer_times_out(tmp_path):
    async def go():
        async with serving(tmp_path, heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5) as srv:
            a, b = await srv.join(), await srv.join()
            assert b.welcome["heartbeatTimeoutMs"] == 500
            await a.recv()
            # b reads (so, like a browser, it answers wire-level pings) but sends nothing
            b_closed = asyncio.create_task(b.closed_with(timeout=3.0))
            t0 = time.monotonic()
            while True:  # a keeps pinging
                await a.send({"type": "ping"})
                msg = await a.recv()
                if msg["type"] == "peer-left":
                    break
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - t0
            assert msg == {"type": "peer-left", "peerId": b.id, "reason": "timeout"}
            assert 0.4 < elapsed < 1.2, elapsed
            assert (await b_closed) == (sm.CLOSE_TIMEOUT, [])
    run(go())


def test_bad_frames_get_their_error_and_others_keep_working(tmp_path):
    async def go():
        async with serving(tmp_path, max_message_bytes=1024) as srv:
            a, c = await srv.join(), await srv.join()
            await a.recv()
            cases = [
                ("x" * 2000, "too-large"),
                ("not json", "bad-json"),
                ("NaN", "bad-json"),
                (b"\x00\x01binary", "bad-message"),
                ("[1, 2]", "bad-message"),
                ({"type": "signal", "to": a.id}, "bad-message"),
                ({"type": "ping", "extra": True}, "bad-message"),
                ({"type": "signal", "to": a.id, "data": "sdp"}, "bad-message"),
                ({"type": "join", "v": 1, "room": "lab"}, "already-joined"),
                ({"type": "signal", "to": "000000000000", "data": {}}, "unknown-peer"),
            ]
            for frame, code in cases:
                assert await c.error_code(frame) == code, frame
            fresh = await srv.connect()
            assert await fresh.error_code({"type": "signal", "to": a.id, "data": {}}) == "not-joined"
            assert await fresh.error_code({"type": "join", "v": 1, "room": "no spaces"}) == "bad-message"
            await exchange(a, c)
            assert (await fresh.join("lab"))["peers"] == [a.id, c.id]
            versioned = await srv.connect()
            assert await versioned.error_code({"type": "join", "v": 2, "room": "lab"}) == "version"
            assert (await versioned.closed_with())[0] == sm.CLOSE_CODES["version"]
    run(go())


def test_oversized_frames(tmp_path):
    async def go():
        async with serving(tmp_path, max_message_bytes=1024) as srv:
            a = await srv.join()
            for _ in range(3):
                assert await a.error_code("y" * 1500) == "too-large"
            await a.send("y" * 1500)
            code, seen = await a.closed_with()
            assert code == sm.CLOSE_CODES["too-large"] and seen[-1]["code"] == "too-large"
            b = await srv.join()  # beyond the hard cap: never buffered, closed with 1009
            await b.send("z" * (4 * 1024 + 1))
            assert (await b.closed_with())[0] == 1009
            c = await srv.join()
            await c.send({"type": "ping"})
            assert await c.recv() == {"type": "pong"}
    run(go())


def test_rate_limit(tmp_path):
    async def go():
        async with serving(tmp_path, rate_per_s=20.0, rate_burst=10) as srv:
            a = await srv.join()
            for _ in range(30):
                await a.send({"type": "ping"})
            replies = [await a.recv() for _ in range(30)]
            pongs = sum(r["type"] == "pong" for r in replies)
            limited = sum(r.get("code") == "rate-limited" for r in replies)
            assert pongs + limited == 30 and 9 <= pongs <= 12, (pongs, limited)
            await asyncio.sleep(0.2)
            await a.send({"type": "ping"})
            assert await a.recv() == {"type": "pong"}
    run(go())


@pytest.mark.parametrize("limit,code", [
    ({"max_peers_per_room": 2}, "room-full"),
    ({"max_rooms": 1}, "too-many-rooms"),
])
def test_capacity_errors_are_fatal(tmp_path, limit, code):
    async def go():
        async with serving(tmp_path, **limit) as srv:
            keep = [await srv.join("lab"), await srv.join("lab")]  # unreferenced sockets get closed
            extra = await srv.connect()
            await extra.send({"type": "join", "v": 1, "room": "lab" if code == "room-full" else "other"})
            close_code, seen = await extra.closed_with()
            assert [m["code"] for m in seen] == [code] and close_code == sm.CLOSE_CODES[code]
            assert len(keep) == 2
    run(go())


def test_server_full(tmp_path):
    async def go():
        async with serving(tmp_path, max_connections=2) as srv:
            a, b = await srv.join(), await srv.join()
            extra = await srv.connect()
            close_code, seen = await extra.closed_with()
            assert [m["code"] for m in seen] == ["server-full"]
            assert close_code == sm.CLOSE_CODES["server-full"]
            await a.recv()
            await exchange(a, b)
    run(go())


def test_origin_check(tmp_path):
    async def go():
        async with serving(tmp_path) as srv:
            for origin in ("http://evil.example", "null", "https://127.0.0.1:" + srv.base.rsplit(":", 1)[1],
                           "http://127.0.0.1:1"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await srv.connect(origin=origin)
                assert info.value.status == 403, origin
            same = await srv.connect(origin=srv.base)
            await same.join("lab")
            no_origin = await srv.connect()
            await no_origin.join("lab")
    run(go())


def _fuzz_frames(rng: random.Random, n: int, max_bytes: int):
    templates = [
        {"type": "join", "v": 1, "room": "fuzz"}, {"type": "signal", "to": "0" * 12, "data": {"a": 1}},
        {"type": "ping"}, {"type": "leave"},
    ]
    atoms = [None, True, False, 0, 1, -1, 2**70, 1.5, "", "x", "\u00e9\u4e2d", "\ud800", [], {}, [1, [2]],
             "0" * 12, "join", "signal", {"type": "ping"}]
    for _ in range(n):
        obj = json.loads(json.dumps(rng.choice(templates)))
        for _ in range(rng.randint(0, 3)):
            op = rng.random()
            key = rng.choice(list(obj) + ["type", "v", "room", "to", "data", "from", "zz"])
            if op < 0.4:
                obj[key] = rng.choice(atoms)
            elif op < 0.6:
                obj.pop(key, None)
            elif op < 0.7:
                obj[key] = {"d": obj.get(key)}
        text = json.dumps(obj)
        kind = rng.random()
        if kind < 0.1:
            cut = rng.randrange(len(text) + 1)
            text = text[:cut]
        elif kind < 0.2:
            i = rng.randrange(len(text))
            text = text[:i] + chr(rng.randrange(32, 0x2FF)) + text[i + 1:]
        elif kind < 0.25:
            text = "[" * rng.randint(30, 1200) + "]" * rng.randint(0, 1200)
        elif kind < 0.3:
            text = json.dumps({"type": "signal", "to": "0" * 12, "data": {"p": "x" * rng.randint(max_bytes, 3 * max_bytes)}})
        elif kind < 0.33:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
            continue
        elif kind < 0.35:
            text = rng.choice(["NaN", "Infinity", '{"type": "ping", "x": NaN}', "\"\\ud800\"", "{}", "null"])
        yield text


def test_fuzz_keeps_the_server_alive(tmp_path):
    async def go():
        async with serving(tmp_path, max_message_bytes=512, rate_per_s=1e6, rate_burst=10**6) as srv:
            rng = random.Random(20261121)
            deadline = time.monotonic() + 10.0
            sent = reconnects = replies = 0
            client = None
            reader = None

            async def read_all(c):
                nonlocal replies
                async for msg in c.ws:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        sm.validate_server_message(json.loads(msg.data))  # every reply is well formed
                        replies += 1

            for frame in _fuzz_frames(rng, 2000, 512):
                if time.monotonic() > deadline:
                    break
                if client is None or client.ws.closed:
                    if reader is not None:
                        await asyncio.wait_for(reader, 2.0)
                    client = await srv.connect()
                    reader = asyncio.create_task(read_all(client))
                    reconnects += 1
                try:
                    if isinstance(frame, bytes):
                        await client.ws.send_bytes(frame)
                    else:
                        await client.ws.send_str(frame)
                    sent += 1
                except (ConnectionError, aiohttp.ClientError):  # the server closed us (fatal error)
                    await asyncio.wait_for(reader, 2.0)
                await asyncio.sleep(0)  # let replies and closes flow
            await client.ws.close()
            await reader
            assert sent > 1000 and replies > 500 and reconnects > 10, (sent, replies, reconnects)

            health = await srv.health()
            assert health["ok"] is True
            a, b = await srv.join("after-fuzz"), await srv.join("after-fuzz")
            await a.recv()
            await exchange(a, b)
            for _ in range(100):
                if (await srv.health())["connections"] == 2:
                    break
                await asyncio.sleep(0.02)
            assert (await srv.health())["connections"] == 2
    run(go(), timeout=15.0)


def test_ggml_rope_table_endpoint(tmp_path):
    """GET /api/ggml-rope: llama.cpp's RoPE table from the server's C library, bounded and
    validated (signaling/numerics.py)."""
    import numpy as np

    from signaling.numerics import libm_name
    from tabmesh.model.ggml_numerics import rope_cos_sin

    async def go():
        async with serving(tmp_path) as s:
            url = s.base + "/api/ggml-rope"
            q = {"base": "100000.0", "n_rot": "64", "freq_scale": "1.0", "n": "300"}
            async with s.session.get(url, params=q) as r:
                assert r.status == 200 and r.headers["X-Tabmesh-Libm"] == libm_name()
                table = np.frombuffer(await r.read(), "<f4")
            cos, sin = rope_cos_sin(100000.0, 64, 1.0, 300)
            assert np.array_equal(table, np.concatenate([cos.ravel(), sin.ravel()]))
            bad = [{**q, "n_rot": "63"}, {**q, "n": "0"}, {**q, "base": "nan"}, {**q, "base": "x"},
                   {**q, "n": str(1 << 20)}, {k: v for k, v in q.items() if k != "n"}]
            for params in bad:
                async with s.session.get(url, params=params) as r:
                    assert r.status == 400, params
                    assert (await r.text()).strip()
            assert (await s.health())["ok"] is not False  # the server keeps working

    run(go(), timeout=30)
