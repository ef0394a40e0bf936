"""One coordinator per room: Raft-style election, and agreement on the distribution plan.

A deterministic state machine with no timers, sockets or asyncio: the caller feeds it the
clock and the messages, and sends what it returns.

    c = Coordinator(my_id, peer_ids, rng=random.Random(seed), now=t)
    out = c.tick(now)                  # every ~50 ms
    out = c.receive(now, sender, msg)  # msg: cluster_messages.RequestVote | Vote | DistributionPlan | PlanAck
    out = c.propose(now, plan)         # leader only; NotLeaderError otherwise
    out = c.add_peer(now, pid) / c.remove_peer(now, pid)   # data channel opened / closed
    out: [(peer_id, message), ...] to send (cluster_messages.encode), in any order, lossy or not

The log has one entry: the latest plan, ordered by (plan.term, plan.epoch) ("key"; (0, 0)
when there is none). The rules, Raft's with that log:
  - Every message carries the sender's term. A higher term makes the receiver a follower of
    that term (vote cleared); a message of a lower term is answered with the current term
    (so a stale leader or candidate steps down) and otherwise ignored.
  - A follower or candidate that hears no leader for a random election timeout
    (ELECTION_TIMEOUT_S) becomes a candidate of term + 1, votes for itself and sends
    request-vote with its key. A node grants one vote per term, only to a candidate whose
    key is at least its own (the log up-to-date check). Votes from a majority of the
    members (this node included) make the candidate leader.
  - A new leader re-stamps its entry (same stages, its term, epoch + 1), since Raft commits
    only entries of the current term. propose() stamps a plan the same way (epoch + 1).
  - The leader sends distribution-plan (its entry + the committed key) to every member every
    HEARTBEAT_S, and at once after a change. A follower adopts the entry when its key is
    larger than its own (a reordered older one is ignored) and acks the key it holds.
  - The leader commits the newest entry of its term that a majority holds (acked key >= it).
    A follower commits its entry when a leader's commit names exactly that key. on_commit
    fires once per committed plan, with increasing epochs.
  - A leader that has not heard from a majority for the longest election timeout steps down
    (check quorum), so a leader cut off in a minority stops acting as coordinator.
Safety, as in Raft: one leader per term (one vote per term, majorities overlap); a committed
plan is held by a majority, every later leader's key is at least it (a voter refuses an older
key), and every entry a later leader stamps has a higher epoch; so two different plans are
never committed for the same epoch, and a minority partition commits nothing.

Membership is the set of peers with an open data channel (add_peer / remove_peer as the
signaling server reports joins and leaves). Nodes may briefly disagree about it; one join or
leave at a time keeps every majority of the old and the new set overlapping (Raft's
single-server change), which is how rooms change. A reloaded tab comes back with a new peer
id and empty state, i.e. as a new member. The loss of the leader (remove_peer) starts an
election within HEARTBEAT_S; a leader silent without a leave is noticed within the election
timeout. silent_peers() lists members not heard from lately (the leader hears every follower
every HEARTBEAT_S), which is how a closed tab is found within 2 s to re-plan without it.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Iterable, Optional

from ..errors import TabmeshError
from .cluster_messages import DistributionPlan, Plan, PlanAck, RequestVote, Vote

ELECTION_TIMEOUT_S = (0.8, 1.6)
HEARTBEAT_S = 0.2
NO_ENTRY = (0, 0)


class NotLeaderError(TabmeshError):
    """Only the room's coordinator (the Raft leader) proposes plans; the message names it."""

    code = "not_leader"


def _key(plan: Optional[Plan]) -> tuple:
    return NO_ENTRY if plan is None else (plan.term, plan.epoch)


class Coordinator:
    def __init__(self, node_id: str, peers: Iterable[str] = (), *, rng: random.Random, now: float = 0.0,
                 election_timeout_s: tuple = ELECTION_TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S,
                 on_commit: Callable[[Plan], None] = lambda plan: None):
        self.id = node_id
        self.members = set(peers) - {node_id}
        self.rng, self.timeout, self.heartbeat_s, self.on_commit = rng, election_timeout_s, heartbeat_s, on_commit
        self.term = 0
        self.voted_for: Optional[str] = None
        self.role = "follower"  # follower | candidate | leader
        self.leader: Optional[str] = None
        self.plan: Optional[Plan] = None  # the one-entry log
        self.committed: Optional[Plan] = None  # the newest plan known committed (what to run)
        self.last_heard = {p: now for p in self.members}
        self._votes: set = set()
        self._match: dict = {}  # leader: peer -> key it acked this term
        self._stamped: dict = {}  # leader: epoch -> plan stamped this term, not yet committed
        self._deadline = self._new_deadline(now)
        self._next_heartbeat = now
        self._leader_since = now

    # ---- views ---------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.role == "leader"

    @property
    def key(self) -> tuple:
        return _key(self.plan)

    def majority(self) -> int:
        return (len(self.members) + 1) // 2 + 1

    def silent_peers(self, now: float, after_s: float = 2.0) -> list:
        """Members not heard from for `after_s` (a leader hears every follower each heartbeat)."""
        return sorted(p for p in self.members if now - self.last_heard.get(p, now) > after_s)

    # ---- inputs --------------------------------------------------------------------------
    def tick(self, now: float) -> list:
        if self.role == "leader":
            recent = sum(1 for p in self.members if now - self.last_heard.get(p, now) <= self.timeout[1])
            if 1 + recent < self.majority() and now - self._leader_since > self.timeout[1]:
                self._become_follower(now, self.term)  # check quorum: cut off in a minority
                return []
            if now >= self._next_heartbeat:
                return self._broadcast(now)
            return []
        if now >= self._deadline:
            return self._start_election(now)
        return []

    def receive(self, now: float, sender: str, msg) -> list:
        if sender not in self.members:
            return []  # no channel, no membership: a stale or foreign message
        self.last_heard[sender] = now
        if msg.term > self.term:
            self._become_follower(now, msg.term)
        if isinstance(msg, RequestVote):
            return self._on_request_vote(now, sender, msg)
        if isinstance(msg, Vote):
            if self.role == "candidate" and msg.term == self.term and msg.granted:
                self._votes.add(sender)
                if len(self._votes & (self.members | {self.id})) >= self.majority():
                    return self._become_leader(now)
            return []
        if isinstance(msg, DistributionPlan):
            return self._on_plan(now, sender, msg)
        if isinstance(msg, PlanAck):
            if self.role == "leader" and msg.term == self.term:
                key = (msg.plan_term, msg.epoch)
                if key > self._match.get(sender, NO_ENTRY):
                    self._match[sender] = key
                    if self._advance_commit():
                        return self._broadcast(now)
            return []
        raise TypeError(f"not a coordination message: {type(msg).__name__}")

    def propose(self, now: float, plan: Plan) -> list:
        """Replicate `plan` as the next epoch; it runs once on_commit reports it."""
        if self.role != "leader":
            where = f"node {self.leader} leads term {self.term}" if self.leader else "no leader is known yet"
            raise NotLeaderError(f"node {self.id} is not the coordinator ({where}); send the plan request there")
        self._stamp(plan)
        self._advance_commit()
        return self._broadcast(now)

    def add_peer(self, now: float, peer: str) -> list:
        if peer == self.id or peer in self.members:
            return []
        self.members.add(peer)
        self.last_heard[peer] = now
        return [(peer, self._append_message())] if self.role == "leader" else []

    def remove_peer(self, now: float, peer: str) -> list:
        self.members.discard(peer)
        self.last_heard.pop(peer, None)
        self._match.pop(peer, None)
        self._votes.discard(peer)
        if peer == self.leader:  # the coordinator left: elect another one soon
            self.leader = None
            self._deadline = now + self.rng.uniform(0, self.heartbeat_s)
        if self.role == "leader" and self._advance_commit():
            return self._broadcast(now)
        if self.role == "candidate" and len(self._votes | {self.id}) >= self.majority():
            return self._become_leader(now)
        return []

    # ---- roles ---------------------------------------------------------------------------
    def _new_deadline(self, now: float) -> float:
        return now + self.rng.uniform(*self.timeout)

    def _become_follower(self, now: float, term: int) -> None:
        if term > self.term:
            self.term, self.voted_for = term, None
        if self.role != "follower":
            self._deadline = self._new_deadline(now)
        self.role, self.leader = "follower", None
        self._votes, self._match, self._stamped = set(), {}, {}

    def _start_election(self, now: float) -> list:
        self.term += 1
        self.role, self.voted_for, self.leader = "candidate", self.id, None
        self._votes = {self.id}
        self._deadline = self._new_deadline(now)
        if 1 >= self.majority():
            return self._become_leader(now)
        msg = RequestVote(self.term, *self.key)
        return [(p, msg) for p in sorted(self.members)]

    def _become_leader(self, now: float) -> list:
        self.role, self.leader = "leader", self.id
        self._match, self._stamped, self._leader_since = {}, {}, now
        for p in self.members:
            self.last_heard[p] = now  # a grace period before check quorum counts silence
        if self.plan is not None:
            self._stamp(self.plan)  # Raft commits only entries of the current term
        self._advance_commit()
        return self._broadcast(now)

    def _stamp(self, plan: Plan) -> None:
        epoch = max(self.key[1], _key(self.committed)[1]) + 1
        self.plan = replace(plan, term=self.term, epoch=epoch)
        self._stamped[epoch] = self.plan

    # ---- messages ------------------------------------------------------------------------
    def _on_request_vote(self, now: float, sender: str, msg: RequestVote) -> list:
        grant = (msg.term == self.term and self.role != "leader" and self.voted_for in (None, sender)
                 and (msg.plan_term, msg.epoch) >= self.key)
        if grant:
            self.voted_for = sender
            self._deadline = self._new_deadline(now)
        return [(sender, Vote(self.term, grant))]

    def _on_plan(self, now: float, sender: str, msg: DistributionPlan) -> list:
        if msg.term < self.term:
            return [(sender, PlanAck(self.term, *self.key))]  # tells a stale leader the term
        if self.role == "leader":
            return []  # a second leader in one term cannot happen (one vote per term); ignore it
        self.role, self.leader = "follower", sender
        self._deadline = self._new_deadline(now)
        if msg.plan is not None and _key(msg.plan) > self.key:
            self.plan = msg.plan
        if msg.commit is not None and tuple(msg.commit) == self.key:
            self._commit(self.plan)
        return [(sender, PlanAck(self.term, *self.key))]

    def _append_message(self) -> DistributionPlan:
        commit = _key(self.committed) if self.committed is not None else None
        return DistributionPlan(self.term, self.plan, commit)

    def _broadcast(self, now: float) -> list:
        self._next_heartbeat = now + self.heartbeat_s
        msg = self._append_message()
        return [(p, msg) for p in sorted(self.members)]

    def _advance_commit(self) -> bool:
        """Commit the newest entry of this term that a majority holds; True if one was."""
        for epoch in sorted(self._stamped, reverse=True):
            key = (self.term, epoch)
            holders = 1 + sum(1 for p in self.members if self._match.get(p, NO_ENTRY) >= key)
            if holders >= self.majority():
                committed = self._commit(self._stamped[epoch])
                self._stamped = {e: p for e, p in self._stamped.items() if e > epoch}
                return committed
        return False

    def _commit(self, plan: Plan) -> bool:
        if self.committed is not None and _key(plan) <= _key(self.committed):
            return False
        self.committed = plan
        self.on_commit(plan)
        return True
