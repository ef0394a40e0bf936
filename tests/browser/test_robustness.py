"""Hostile or degraded conditions: a tab without a GPU, a fuzzing client on the signaling socket."""
import json
import time

from settings import config


def test_tab_without_webgpu_adapter_still_joins_as_peer(open_node, new_browser, room):
    # Without --enable-unsafe-webgpu, headless Chromium on Linux exposes navigator.gpu but
    # requestAdapter() resolves to null: the real "no adapter" case.
    no_gpu = new_browser(without_args=("--enable-unsafe-webgpu",))
    b = open_node(room, on_browser=no_gpu)
    assert b.info["gpu"] is None
    errors = b.page.evaluate("tabmesh.errors")
    assert any("No WebGPU adapter" in e for e in errors), errors
    assert "No WebGPU adapter" in b.page.inner_text("#errors")
    assert b.page.inner_text("#gpu") == "none"
    a = open_node(room)
    a.wait_peers(lambda ps: [p["state"] for p in ps] == ["open"], what="GPU tab sees the GPU-less tab")
    assert a.page.evaluate("async (id) => Array.from(await tabmesh.echo(id, new Uint8Array([1, 2, 3])))", b.peer_id) == [1, 2, 3]


FUZZ_JS = """
async ([room, victim, count, deadlineMs]) => {
  const url = `ws://${location.host}/ws`;
  const replies = {};
  const open = () => new Promise((res, rej) => { const ws = new WebSocket(url); ws.onopen = () => res(ws); ws.onerror = rej; });
  const next = (ws) => new Promise((res) => { ws.onmessage = (e) => res(JSON.parse(e.data)); ws.onclose = (e) => res({type: 'closed', code: e.code}); });
  const t0 = performance.now();
  // 1. the named cases, each on its own socket, with the reply recorded
  const cases = {
    notJson: '{"type": "join",',
    notObject: '[1, 2, 3]',
    wrongType: JSON.stringify({type: 'teleport'}),
    extraKey: JSON.stringify({type: 'join', v: 1, room, evil: true}),
    badRoom: JSON.stringify({type: 'join', v: 1, room: '../../etc'}),
    signalBeforeJoin: JSON.stringify({type: 'signal', to: victim, data: {}}),
    version: JSON.stringify({type: 'join', v: 99, room}),
    oversized: JSON.stringify({type: 'join', v: 1, room, pad: 'x'.repeat(40000)}),
  };
  for (const [name, text] of Object.entries(cases)) {
    const ws = await open();
    const reply = next(ws);
    ws.send(text);
    replies[name] = await reply;
    ws.close();
  }
  // 2. cross-room: join another room, then try to signal the victim
  const ws = await open();
  let r = next(ws); ws.send(JSON.stringify({type: 'join', v: 1, room: room + '-evil'})); replies.evilWelcome = await r;
  r = next(ws); ws.send(JSON.stringify({type: 'signal', to: victim, data: {kind: 'offer', sdp: 'v=0'}})); replies.crossRoom = await r;
  // 3. random garbage, bounded in count and time
  let sent = 0;
  const rnd = (() => { let x = 12345; return () => (x = (x * 1103515245 + 12345) % 2147483648) / 2147483648; })();
  const atoms = ['{', '}', '"type"', ':', '"signal"', '"join"', ',', '"to"', '"data"', '1', 'null', '[', ']', '"v"', '"room"', '"' + victim + '"'];
  while (sent < count && performance.now() - t0 < deadlineMs && ws.readyState === 1) {
    let s = ''; const n = 1 + Math.floor(rnd() * 12);
    for (let i = 0; i < n; i++) s += atoms[Math.floor(rnd() * atoms.length)];
    ws.send(s); sent++;
    if (sent % 20 === 0) await new Promise((res) => setTimeout(res, 60));  // stay near the rate limit
  }
  ws.close();
  return {replies, sent};
}
"""


def test_server_rejects_hostile_signaling_and_keeps_serving_peers(open_node, new_browser, room):
    a = open_node(room)
    b = open_node(room, on_browser=new_browser())
    a.wait_peers(lambda ps: [p["state"] for p in ps] == ["open"], what="a sees b")
    attacker = open_node(room + "-attacker")
    t0 = time.monotonic()
    out = attacker.page.evaluate(FUZZ_JS, [room, a.peer_id, 400, 15000])
    assert time.monotonic() - t0 < 60
    r = out["replies"]
    codes = {name: reply.get("code") for name, reply in r.items()}
    assert codes["notJson"] == "bad-json", r["notJson"]
    assert codes["notObject"] == "bad-message"
    assert codes["wrongType"] == "bad-message"
    assert codes["extraKey"] == "bad-message"
    assert codes["badRoom"] == "bad-message"
    assert codes["signalBeforeJoin"] == "not-joined"
    assert codes["version"] == "version"
    assert codes["oversized"] == "too-large"
    assert r["evilWelcome"]["type"] == "welcome" and r["evilWelcome"]["peers"] == []
    assert codes["crossRoom"] == "unknown-peer"
    assert out["sent"] > 50
    # the honest peers never noticed: still connected, still talking, nobody new in their room
    assert [p["peerId"] for p in a.peers()] == [b.peer_id]
    assert [p["peerId"] for p in b.peers()] == [a.peer_id]
    assert a.page.evaluate("(id) => tabmesh.ping(id)", b.peer_id) > 0
    # and the server still lets a newcomer in
    c = open_node(room)
    a.wait_peers(lambda ps: {p["peerId"] for p in ps if p["state"] == "open"} == {b.peer_id, c.peer_id},
                 what="newcomer after fuzz")
    assert a.page.evaluate("tabmesh.errors") == []


MALFORMED_JS = """async ([peer, n]) => {
  let x = 99991; const rnd = () => (x = (x * 48271) % 2147483647) / 2147483647;
  const header = (fields) => { const b = new ArrayBuffer(24), v = new DataView(b);
    v.setUint8(0, 84); v.setUint8(1, 77); fields.forEach(([off, size, val]) => size === 1 ? v.setUint8(off, val) : v.setUint32(off, val, true));
    return new Uint8Array(b); };
  const crafted = [
    header([[2, 1, 1], [3, 1, 4], [4, 4, 1], [8, 4, 5], [12, 4, 2], [16, 4, 10], [20, 4, 0]]),        // chunk index past count
    header([[2, 1, 1], [3, 1, 4], [4, 4, 2], [8, 4, 0], [12, 4, 1], [16, 4, 0xffffffff], [20, 4, 0]]), // absurd total
    header([[2, 1, 7], [3, 1, 4]]),                                                                    // wrong version
    header([[2, 1, 1], [3, 1, 250]]),                                                                  // unknown kind
    new Uint8Array([1, 2, 3]),                                                                         // short
  ];
  for (const f of crafted) await tabmesh.debug.sendRawFrame(peer, f);
  for (let i = 0; i < n; i++) {
    const len = Math.floor(rnd() * 200), f = new Uint8Array(len);
    for (let j = 0; j < len; j++) f[j] = Math.floor(rnd() * 256);
    if (len > 2 && rnd() < 0.5) { f[0] = 84; f[1] = 77; f[2] = 1; }
    await tabmesh.debug.sendRawFrame(peer, f);
  }
  return crafted.length + n;
}"""


def test_malformed_peer_frames_are_dropped_and_the_node_keeps_working(open_node, new_browser, room):
    a = open_node(room)
    b = open_node(room, on_browser=new_browser())
    a.wait_peers(lambda ps: [p["state"] for p in ps] == ["open"], what="a sees b")
    sent = a.page.evaluate(MALFORMED_JS, [b.peer_id, 300])
    deadline = time.monotonic() + 20
    while b.page.evaluate("tabmesh.stats()")["droppedFrames"] < sent:
        assert time.monotonic() < deadline, b.page.evaluate("tabmesh.stats()")
        time.sleep(0.2)
    # still connected both ways and still correct
    assert a.page.evaluate("async (id) => Array.from(await tabmesh.echo(id, new Uint8Array([9, 8, 7])))", b.peer_id) == [9, 8, 7]
    assert b.page.evaluate("(id) => tabmesh.ping(id)", a.peer_id) > 0
    assert [p["state"] for p in b.peers()] == ["open"]
    assert b.page.evaluate("tabmesh.errors") == []
