"""Room secrets over real WebRTC: tabs with the secret connect, tabs without it are refused,
and a signaling server that alters a fingerprint is caught (mesh/auth.py)."""
import time

import pytest

SECRET = "correct horse battery staple"

# Plays a hostile signaling server inside the receiving tab: every offer/answer relayed to this
# tab has the first hex digit of its DTLS fingerprint changed, as when the server substitutes
# its own certificate to sit in the middle. Only signaling messages are touched.
MITM_SHIM = r"""(() => {
  const Orig = window.WebSocket;
  window.__mitmRewrites = 0;
  window.WebSocket = class extends Orig {
    set onmessage(fn) {
      super.onmessage = fn && ((ev) => {
        let data = ev.data;
        try {
          const m = JSON.parse(data);
          if (m.type === "signal" && m.data && (m.data.kind === "offer" || m.data.kind === "answer")) {
            m.data.sdp = m.data.sdp.replace(/(a=fingerprint:\S+ )([0-9A-F])/g,
                                            (_, head, c) => head + (c === "A" ? "B" : "A"));
            window.__mitmRewrites++;
            data = JSON.stringify(m);
          }
        } catch (e) {}
        fn({data});
      });
    }
    get onmessage() { return super.onmessage; }
  };
})();"""


def state_of(node, peer_id):
    return {p["peerId"]: p["state"] for p in node.peers()}.get(peer_id)


def test_same_secret_connects_and_tabs_without_it_are_refused(open_node, new_browser, room):
    a = open_node(room, fragment=f"key=k1&secret={SECRET}")
    b = open_node(room, on_browser=new_browser(), fragment=f"secret={SECRET}")
    a.wait_peers(lambda ps: [(p["peerId"], p["state"]) for p in ps] == [(b.peer_id, "open")], what="a sees b open")
    b.wait_peers(lambda ps: [(p["peerId"], p["state"]) for p in ps] == [(a.peer_id, "open")], what="b sees a open")
    assert a.page.evaluate("(id) => tabmesh.ping(id)", b.peer_id) > 0
    assert "secret" not in a.page.evaluate("location.href")          # gone from the address bar,
    assert a.page.evaluate("location.hash") == "#key=k1"              # the API key left for later
    assert a.page.evaluate("tabmesh.stats()")["roomSecret"] is True

    none = open_node(room)                                            # no secret at all
    wrong = open_node(room, fragment="secret=not%20the%20secret")      # a different one
    honest = {a.peer_id, b.peer_id}
    for intruder in (none, wrong):
        intruder.wait_peers(lambda ps: {p["peerId"]: p["state"] for p in ps if p["peerId"] in honest}
                            == {a.peer_id: "rejected", b.peer_id: "rejected"}, what="the honest pair refused it")
    for node in (a, b):
        node.wait_peers(lambda ps: {p["state"] for p in ps if p["peerId"] in (none.peer_id, wrong.peer_id)}
                        == {"rejected"} and len(ps) == 3, what="both intruders rejected")
    rows = {p["peerId"]: p for p in none.peers()}
    assert "requires a room secret" in rows[a.peer_id]["reason"]
    rows = {p["peerId"]: p for p in wrong.peers()}
    assert "room secrets differ" in rows[a.peer_id]["reason"]
    assert any("refused this tab" in e for e in none.page.evaluate("tabmesh.errors"))
    assert a.page.evaluate("tabmesh.stats()")["rejectedPeers"] == 2
    assert a.page.locator(f"#peers tr[data-peer-id='{none.peer_id}'] td.state-rejected").inner_text() == "rejected"

    # nothing reaches the intruders: no channel, no frame, and the honest pair refuses to send
    for intruder in (none, wrong):
        with pytest.raises(Exception, match="no open channel"):
            a.page.evaluate("(id) => tabmesh.send(id, new Uint8Array([1, 2, 3]))", intruder.peer_id)
        assert intruder.page.evaluate("tabmesh.inbox()") == []
        assert intruder.page.evaluate("tabmesh.stats()")["droppedFrames"] == 0
        assert not [p for p in intruder.peers() if p["state"] == "open"]
    # and the honest pair keeps working
    assert b.page.evaluate("async (id) => Array.from(await tabmesh.echo(id, new Uint8Array([4, 2])))",
                           a.peer_id) == [4, 2]
    assert state_of(a, b.peer_id) == "open" and state_of(b, a.peer_id) == "open"


def test_a_server_that_swaps_the_dtls_fingerprint_is_caught(open_node, new_browser, room):
    # b receives every SDP through the tampering shim; a, the newcomer, offers to b
    b = open_node(room, fragment=f"secret={SECRET}", init_script=MITM_SHIM)
    a = open_node(room, on_browser=new_browser(), fragment=f"secret={SECRET}")
    b.wait_peers(lambda ps: [(p["peerId"], p["state"]) for p in ps] == [(a.peer_id, "rejected")],
                 what="b refuses the altered offer")
    a.wait_peers(lambda ps: [(p["peerId"], p["state"]) for p in ps] == [(b.peer_id, "rejected")],
                 what="a learns b refused it")
    assert b.page.evaluate("window.__mitmRewrites") >= 1
    assert "altered" in b.peers()[0]["reason"]
    time.sleep(1.0)   # nothing reconnects behind the rejection
    assert [p["state"] for p in a.peers()] == ["rejected"] and [p["state"] for p in b.peers()] == ["rejected"]
