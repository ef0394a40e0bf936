"""Two and three tabs over real WebRTC data channels (in the test's network namespace)."""
import base64
import hashlib
import random
import time

import pytest

from settings import config

ONE_MB = 1 << 20


def open_pair(open_node, new_browser, room):
    """Two nodes in separate browser processes, with an open channel between them."""
    a = open_node(room)
    b = open_node(room, on_browser=new_browser())
    a.wait_peers(lambda ps: [p["peerId"] for p in ps if p["state"] == "open"] == [b.peer_id], what="a sees b open")
    b.wait_peers(lambda ps: [p["peerId"] for p in ps if p["state"] == "open"] == [a.peer_id], what="b sees a open")
    return a, b


def test_two_tabs_connect_and_exchange_a_megabyte_intact(open_node, new_browser, room):
    a, b = open_pair(open_node, new_browser, room)
    payload = random.Random(11).randbytes(ONE_MB)
    digest = hashlib.sha256(payload).hexdigest()
    b64 = base64.b64encode(payload).decode()  # far cheaper through Playwright than a list of ints

    # a → b as DATA, two messages at once (1 MiB and 2 MiB): together they overfill the
    # channel's send buffer, so both sends wait on backpressure at the same time
    big = random.Random(12).randbytes(2 * ONE_MB)
    a.page.evaluate("""([id, b64s]) => Promise.all(b64s.map((b64) =>
        tabmesh.send(id, Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)))))""",
                    [b.peer_id, [b64, base64.b64encode(big).decode()]])
    deadline = time.monotonic() + 60
    while len(b.page.evaluate("tabmesh.inbox()")) < 2:
        assert time.monotonic() < deadline, "the two messages never both arrived"
        time.sleep(0.1)
    inbox = b.page.evaluate("tabmesh.inbox()")
    assert sorted(inbox, key=lambda m: m["size"]) == [
        {"from": a.peer_id, "size": ONE_MB, "sha256": digest},
        {"from": a.peer_id, "size": 2 * ONE_MB, "sha256": hashlib.sha256(big).hexdigest()}]

    # b → a → b as ECHO: both directions, bytes compared on the way back
    echoed = b.page.evaluate(
        "async ([id, b64]) => { const r = await tabmesh.echo(id, Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)));"
        " const h = await crypto.subtle.digest('SHA-256', r);"
        " return [r.length, Array.from(new Uint8Array(h)).map(x => x.toString(16).padStart(2, '0')).join('')]; }",
        [a.peer_id, b64])
    assert echoed == [ONE_MB, digest]

    rtt = a.page.evaluate("(id) => tabmesh.ping(id)", b.peer_id)
    assert 0 < rtt < 1000
    peers = a.wait_peers(lambda ps: ps and ps[0]["rttMs"] is not None, what="periodic rtt")
    assert peers[0]["rttMs"] > 0
    # the page shows the peer with its state and round-trip time
    row = a.page.locator(f"#peers tr[data-peer-id='{b.peer_id}']")
    assert row.locator("td.state-open").inner_text() == "open"
    assert row.locator("td.rtt").inner_text().endswith(" ms")


def test_a_tab_in_another_room_never_sees_them(open_node, new_browser, room):
    a, b = open_pair(open_node, new_browser, room)
    c = open_node(room + "-other")
    time.sleep(1.5)  # long enough for any join/offer to have crossed rooms, were it relayed
    assert c.peers() == []
    assert {p["peerId"] for p in a.peers()} == {b.peer_id}
    assert {p["peerId"] for p in b.peers()} == {a.peer_id}
    with pytest.raises(Exception, match="no open channel"):
        c.page.evaluate("(id) => tabmesh.ping(id)", a.peer_id)


def test_closing_a_tab_removes_it_within_the_heartbeat_timeout(open_node, new_browser, room):
    a = open_node(room)
    other = new_browser()
    b = open_node(room, on_browser=other)
    a.wait_peers(lambda ps: len(ps) == 1 and ps[0]["state"] == "open", what="a sees b")
    t0 = time.monotonic()
    other.close()  # the whole browser process goes away, as when a user kills it
    a.wait_peers(lambda ps: ps == [], timeout_s=config.HEARTBEAT_TIMEOUT_S + 2.0, what="b removed")
    assert time.monotonic() - t0 <= config.HEARTBEAT_TIMEOUT_S + 2.0
    assert a.page.locator("#peers tbody tr").count() == 0


def test_two_tabs_of_one_browser_connect(open_node, room):
    # What a user does: a second tab of the same browser. The second boot is served from the
    # HTTP cache (blob: URLs included, which the server's CSP must allow).
    a = open_node(room)
    b = open_node(room, tab_of=a)
    a.wait_peers(lambda ps: [p["peerId"] for p in ps if p["state"] == "open"] == [b.peer_id], what="a sees b")
    b.wait_peers(lambda ps: [p["peerId"] for p in ps if p["state"] == "open"] == [a.peer_id], what="b sees a")
    assert b.page.evaluate("tabmesh.errors") == []
    assert b.page.evaluate("(id) => tabmesh.ping(id)", a.peer_id) > 0
