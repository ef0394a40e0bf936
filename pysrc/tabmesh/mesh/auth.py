"""Room secrets: peers prove to each other that they hold the room's secret.

Why: the signaling server relays every offer and answer, so it could sit in the middle: give
each tab an SDP that carries the server's own DTLS certificate fingerprint and terminate both
DTLS sessions itself. DTLS only guarantees that a channel ends at whoever holds the
certificate whose fingerprint was in the remote SDP; nothing says who wrote that SDP. A secret
shared by the room's tabs (and never by the server) closes that gap.

Key. K = HMAC-SHA256(key=secret, msg="tabmesh-room-v1|" + room), both UTF-8. The page takes
the secret from its URL fragment (`#secret=…`: browsers never send fragments to a server),
removes it from the address bar and keeps only K. The room is the one the tab asked for, not
the one the server reports, so one secret in two rooms gives two unrelated keys.

1. Signed SDP. An offer or answer signal carries "tag", 64 hex characters:
       HMAC(K, fields("tabmesh-sdp-v1", kind, sender id, receiver id, fingerprints))
   where `fingerprints` is every `a=fingerprint:` line of the SDP, normalized (algorithm
   lowercased, hex uppercased, sorted, duplicates dropped) and joined with "\\n". The receiver
   recomputes it over the SDP it actually received, with the sender id the server reports and
   its own id, and compares in constant time. On any mismatch it never sets the remote
   description: the link is closed, the peer is marked "rejected" (peers table, a counter,
   a message on the page) and a {"kind": "reject", "reason": CODE} signal tells the other
   side why. Since DTLS then ends the channel at the holder of the signed fingerprint, a
   server that swaps fingerprints cannot produce a valid tag.
2. HELLO proof (defense in depth, and the gate for every other frame). When the channel opens
   each side sends HELLO {"v": 1, "peerId": me, "nonce": 32 hex, "secret": bool}; on the
   peer's first HELLO it answers HELLO {"v": 1, "peerId": me, "proof": 64 hex} with
       proof = HMAC(K, fields("tabmesh-hello-v1", prover, verifier, verifier's nonce, prover's nonce)).
   Until a peer's proof verified (in a room without secret: until its first HELLO arrived)
   the node processes no other frame from it, and it sends nothing but HELLO to a peer until
   that peer verified and its own proof went out. Only then is the peer "open" and told to
   the subsystems (cluster, pipeline): a peer without K never sees or sends an activation.
3. Modes. A room without a secret works as before (no tags, HELLO without proof). A tab with
   a secret refuses a peer without one and the other way round, each with its own reason code.

`fields()` length-prefixes each part, so no choice of ids or SDP text can shift one field into
another. Every input from the network is size-checked before it is hashed; any failure is an
AuthError with a `code` from REASONS, never another exception.

Not covered: who is in the room stays visible to the server, and the server can still refuse
to relay (denial of service). ICE candidates are not signed (DTLS makes a forged one harmless).
The "reject" signal is not signed either, so it is honoured only before a peer is open.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

ROOM_CONTEXT = "tabmesh-room-v1|"
SDP_CONTEXT = "tabmesh-sdp-v1"
HELLO_CONTEXT = "tabmesh-hello-v1"
TAG_HEX = 64                 # HMAC-SHA256 in hex
NONCE_HEX = 32               # 16 random bytes
MAX_SECRET = 1024            # characters
MAX_SDP = 64 * 1024          # characters hashed at most (rtc.py takes 12 KiB; the server relays 16 KiB)
MAX_FINGERPRINTS = 8         # one per transport; bundled data channels need one
MAX_HELLO = 512              # bytes of a HELLO payload
MAX_ID = 64                  # characters of a peer id in a HELLO
_HEX = re.compile(r"[0-9a-f]+")
_FINGERPRINT = re.compile(r"a=fingerprint:([A-Za-z0-9-]{1,16}) ([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){15,63})")

# code -> (what the refusing tab shows, what the refused tab shows)
REASONS = {
    "secret-required": ("it has no room secret and this room requires one",
                        "it requires a room secret: open the page with #secret=… (the room's secret)"),
    "no-secret-here": ("it uses a room secret and this tab has none: open the page with #secret=…",
                       "it has no room secret and this tab has one"),
    "bad-tag": ("its connection offer is not signed with this room's secret "
                "(a different secret, or the signaling server altered it)",
                "room secrets differ, or the signaling server altered the connection offer"),
    "bad-sdp": ("its SDP's DTLS fingerprint lines are missing or malformed", "its SDP was malformed"),
    "bad-proof": ("its HELLO proof does not match this room's secret", "room secrets differ (HELLO proof)"),
    "bad-hello": ("its HELLO was missing, late or malformed", "HELLO failed"),
}


class AuthError(ValueError):
    """A peer failed authentication; `code` is a key of REASONS (sent to the peer)."""

    def __init__(self, code: str, detail: str = ""):
        assert code in REASONS, code
        self.code = code
        self.detail = detail or REASONS[code][0]
        super().__init__(f"{code}: {self.detail}")


def fields(*parts: str) -> bytes:
    """Unambiguous concatenation: each part as a 4-byte big-endian length, then its UTF-8."""
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def sdp_fingerprints(sdp: str) -> str:
    """The SDP's DTLS fingerprints, normalized; AuthError("bad-sdp") if none or any malformed.

    Conservative on purpose: a line that mentions "fingerprint" but is not exactly
    `a=fingerprint:ALG HEX` is refused, so the browser's parser cannot see a fingerprint
    that this one skipped.
    """
    if not isinstance(sdp, str) or len(sdp) > MAX_SDP:
        raise AuthError("bad-sdp", f"the SDP is not text of at most {MAX_SDP} characters")
    found = set()
    for line in sdp.split("\n"):
        line = line.removesuffix("\r")
        if "fingerprint" not in line.lower():
            continue
        m = _FINGERPRINT.fullmatch(line)
        if m is None:
            raise AuthError("bad-sdp", f"malformed fingerprint line {line[:80]!r}")
        found.add(f"{m.group(1).lower()} {m.group(2).upper()}")
    if not found:
        raise AuthError("bad-sdp", "the SDP has no DTLS fingerprint")
    if len(found) > MAX_FINGERPRINTS:
        raise AuthError("bad-sdp", f"more than {MAX_FINGERPRINTS} DTLS fingerprints")
    return "\n".join(sorted(found))


def _is_hex(value, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and _HEX.fullmatch(value) is not None


def new_nonce() -> str:
    return secrets.token_hex(NONCE_HEX // 2)


class RoomKey:
    """K for one (secret, room). Holds no copy of the secret; never printed."""

    __slots__ = ("_k",)

    def __init__(self, secret: str, room: str):
        if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET:
            raise ValueError(f"a room secret is 1..{MAX_SECRET} characters")
        self._k = hmac.new(secret.encode("utf-8", "surrogatepass"), (ROOM_CONTEXT + room).encode("utf-8"),
                           hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "RoomKey(<hidden>)"

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._k, fields(*parts), hashlib.sha256).hexdigest()

    def sdp_tag(self, kind: str, sender: str, receiver: str, sdp: str) -> str:
        return self._mac(SDP_CONTEXT, kind, sender, receiver, sdp_fingerprints(sdp))

    def check_sdp_tag(self, kind: str, sender: str, receiver: str, sdp: str, tag) -> None:
        if not _is_hex(tag, TAG_HEX):
            raise AuthError("bad-tag", "the tag is not 64 lowercase hex characters")
        if not hmac.compare_digest(self.sdp_tag(kind, sender, receiver, sdp), tag):
            raise AuthError("bad-tag")

    def hello_proof(self, prover: str, verifier: str, verifier_nonce: str, prover_nonce: str) -> str:
        return self._mac(HELLO_CONTEXT, prover, verifier, verifier_nonce, prover_nonce)

    def check_hello_proof(self, prover: str, verifier: str, verifier_nonce: str, prover_nonce: str, proof) -> None:
        if not _is_hex(proof, TAG_HEX) or not hmac.compare_digest(
                self.hello_proof(prover, verifier, verifier_nonce, prover_nonce), proof):
            raise AuthError("bad-proof")


# ---- signals (what the node sends to and takes from the signaling server) -------------------

def sign_signal(key: RoomKey | None, sender: str, receiver: str, data: dict) -> dict:
    """Add the tag to an offer or answer; other signals, and every signal without a key, pass."""
    if key is None or data.get("kind") not in ("offer", "answer"):
        return data
    return {**data, "tag": key.sdp_tag(data["kind"], sender, receiver, data["sdp"])}


def open_signal(key: RoomKey | None, sender: str, receiver: str, data: dict) -> dict:
    """Check an offer's or answer's tag against this tab's key and return it without the tag
    (the form mesh/rtc.py validates); other signals pass. Raises AuthError."""
    if not isinstance(data, dict) or data.get("kind") not in ("offer", "answer"):
        return data
    tag = data.get("tag")
    if key is None:
        if tag is not None:
            raise AuthError("no-secret-here")
        return data
    if tag is None:
        raise AuthError("secret-required")
    key.check_sdp_tag(data["kind"], sender, receiver, data.get("sdp"), tag)
    return {k: v for k, v in data.items() if k != "tag"}


def reject_signal(code: str) -> dict:
    return {"kind": "reject", "reason": code}


def rejected_message(peer_id: str, data: dict) -> str:
    """What a refused tab shows for a reject signal (whose reason comes from the network)."""
    reason = data.get("reason") if isinstance(data, dict) else None
    text = REASONS[reason][1] if isinstance(reason, str) and reason in REASONS else "no reason given"
    return f"peer {peer_id} refused this tab: {text}"


# ---- HELLO ---------------------------------------------------------------------------------

class Handshake:
    """The HELLO exchange with one peer over its new channel (one per channel).

        hs = Handshake(key, me, peer)
        send(hs.first())                     # when the channel opens
        reply = hs.receive(peer_hello)       # each HELLO from the peer; send reply if not None
        hs.peer_verified                     # the peer proved K (or both sides have no secret)
    """

    def __init__(self, key: RoomKey | None, me: str, peer: str, nonce: str | None = None):
        self.key, self.me, self.peer = key, me, peer
        self.nonce = nonce or new_nonce()
        self.peer_nonce: str | None = None
        self.peer_verified = False

    @property
    def final_sends(self) -> int:
        """How many HELLOs this side sends in all (the first, plus the proof with a key)."""
        return 1 if self.key is None else 2

    def first(self) -> dict:
        return {"v": 1, "peerId": self.me, "nonce": self.nonce, "secret": self.key is not None}

    def receive(self, hello) -> dict | None:
        if not isinstance(hello, dict) or hello.get("v") != 1:
            raise AuthError("bad-hello", "HELLO is not a v1 object")
        if hello.get("peerId") != self.peer:
            raise AuthError("bad-hello", f"HELLO claims id {str(hello.get('peerId'))[:MAX_ID]!r} on the link of {self.peer}")
        if self.peer_verified:
            raise AuthError("bad-hello", "a HELLO after the handshake finished")
        if self.peer_nonce is None:
            if not _is_hex(hello.get("nonce"), NONCE_HEX) or not isinstance(hello.get("secret"), bool):
                raise AuthError("bad-hello", "the first HELLO needs a 32-hex nonce and a secret flag")
            if hello["secret"] != (self.key is not None):
                raise AuthError("no-secret-here" if self.key is None else "secret-required")
            self.peer_nonce = hello["nonce"]
            if self.key is None:
                self.peer_verified = True
                return None
            return {"v": 1, "peerId": self.me,
                    "proof": self.key.hello_proof(self.me, self.peer, self.peer_nonce, self.nonce)}
        if self.key is None or "proof" not in hello:
            raise AuthError("bad-hello", "a second HELLO without a proof")
        self.key.check_hello_proof(self.peer, self.me, self.nonce, self.peer_nonce, hello["proof"])
        self.peer_verified = True
        return None
