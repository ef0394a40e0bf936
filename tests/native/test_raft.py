"""Coordinator election and plan agreement on a simulated network with seeded randomness:
loss, duplication, reordering, partitions and crashes. Every message crosses the wire form
(cluster_messages.encode/decode), and the safety invariants are checked at every step."""
import heapq
import itertools
import random
from collections import defaultdict

import pytest

from tabmesh.mesh import cluster_messages as cm
from tabmesh.mesh.raft import ELECTION_TIMEOUT_S, Coordinator, NotLeaderError

DT = 0.01  # simulation step, s


def nid(i):
    return f"{i:012x}"


def make_plan(tag: int, nodes) -> cm.Plan:
    """A distinct, valid plan for `tag` (the layer split encodes it)."""
    nodes = list(nodes)
    cut = 1 + tag % 29
    stages = (cm.Stage(nodes[0], (0, cut), float(tag)),) + (
        (cm.Stage(nodes[1], (cut, 30), 1.0),) if len(nodes) > 1 else ())
    if len(nodes) == 1:
        stages = (cm.Stage(nodes[0], (0, 30), float(tag)),)
    return cm.Plan(0, 0, "m", 30, stages, float(tag), None)


class SimNet:
    """Nodes, a clock, and a network that loses, duplicates, delays (so reorders) and cuts."""

    def __init__(self, n, seed, loss=0.0, dup=0.0, delay=(0.001, 0.01)):
        self.rng = random.Random(seed)
        self.ids = [nid(i) for i in range(1, n + 1)]
        self.now = 0.0
        self.loss, self.dup, self.delay = loss, dup, delay
        self.group = {i: 0 for i in self.ids}  # partition: nodes talk only within a group
        self.down: set = set()
        self.queue: list = []
        self.seq = itertools.count()
        self.commits = defaultdict(list)  # node -> [plan, ...] in commit order
        self.committed_by_epoch: dict = {}  # epoch -> plan: must never hold two plans
        self.leaders_by_term = defaultdict(set)
        self.nodes = {i: self._new(i, seed) for i in self.ids}
        self.delivered = 0

    def _new(self, i, seed):
        def on_commit(plan, i=i):
            self.commits[i].append(plan)
            assert self.committed_by_epoch.setdefault(plan.epoch, plan) == plan, (
                f"two plans committed for epoch {plan.epoch}")
        return Coordinator(i, [j for j in self.ids if j != i], rng=random.Random(f"{seed}-{i}"),
                           now=self.now, on_commit=on_commit)

    def send(self, sender, out):
        for to, msg in out:
            data = cm.encode(msg)
            if self.rng.random() < self.loss:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                at = self.now + self.rng.uniform(*self.delay)
                heapq.heappush(self.queue, (at, next(self.seq), sender, to, data))

    def connected(self, a, b):
        return a not in self.down and b not in self.down and self.group[a] == self.group[b]

    def step(self):
        self.now += DT
        while self.queue and self.queue[0][0] <= self.now:
            _, _, sender, to, data = heapq.heappop(self.queue)
            if self.connected(sender, to):
                self.delivered += 1
                self.send(to, self.nodes[to].receive(self.now, sender, cm.decode(data)))
        for i, node in self.nodes.items():
            if i not in self.down:
                self.send(i, node.tick(self.now))
        self.check_invariants()

    def check_invariants(self):
        for i, node in self.nodes.items():
            if node.is_leader:
                self.leaders_by_term[node.term].add(i)
                assert len(self.leaders_by_term[node.term]) == 1, f"two leaders in term {node.term}"
            epochs = [p.epoch for p in self.commits[i]]
            assert epochs == sorted(set(epochs)), f"{i} committed epochs out of order: {epochs}"
            if node.committed is not None:
                assert node.key >= (node.committed.term, node.committed.epoch)

    def run(self, seconds):
        for _ in range(round(seconds / DT)):
            self.step()

    def run_until(self, cond, seconds):
        for _ in range(round(seconds / DT)):
            if cond():
                return True
            self.step()
        return cond()

    # views
    def up(self):
        return [i for i in self.ids if i not in self.down]

    def leaders(self, among=None):
        return [i for i in (among or self.up()) if self.nodes[i].is_leader]

    def the_leader(self, among=None):
        ls = self.leaders(among)
        return ls[0] if len(ls) == 1 else None

    def propose(self, tag, leader=None):
        leader = leader or self.the_leader()
        node = self.nodes[leader]
        self.send(leader, node.propose(self.now, make_plan(tag, sorted(node.members | {leader}))))
        return node.plan

    def agreed(self, plan, among=None):
        return all(self.nodes[i].committed == plan for i in (among or self.up()))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_one_leader_is_elected_and_a_plan_is_agreed(n):
    net = SimNet(n, seed=n)
    assert net.run_until(lambda: net.the_leader() is not None, 3.0)
    net.run(1.0)
    leader = net.the_leader()
    assert leader is not None and all(net.nodes[i].leader == leader for i in net.ids)
    assert len({net.nodes[i].term for i in net.ids}) == 1
    plan = net.propose(1)
    assert (plan.term, plan.epoch) == (net.nodes[leader].term, 1)
    assert net.run_until(lambda: net.agreed(plan), 1.0)
    plan2 = net.propose(2)
    assert plan2.epoch == 2 and net.run_until(lambda: net.agreed(plan2), 1.0)


def test_followers_refuse_to_propose_and_name_the_leader():
    net = SimNet(3, seed=11)
    assert net.run_until(lambda: net.the_leader() is not None, 3.0)
    net.run(0.5)
    follower = next(i for i in net.ids if not net.nodes[i].is_leader)
    with pytest.raises(NotLeaderError, match=f"node {net.the_leader()} leads term"):
        net.nodes[follower].propose(net.now, make_plan(1, net.ids))


@pytest.mark.parametrize("clean_leave", [True, False])
def test_a_lost_leader_is_replaced_and_its_plan_survives(clean_leave):
    for seed in range(8):
        net = SimNet(5, seed=100 + seed)
        assert net.run_until(lambda: net.the_leader() is not None, 3.0)
        plan = net.propose(1)
        assert net.run_until(lambda: net.agreed(plan), 1.0)
        old, lost_at = net.the_leader(), net.now
        net.down.add(old)  # the tab closed
        if clean_leave:  # the signaling server reports the leave at once
            for i in net.up():
                net.send(i, net.nodes[i].remove_peer(net.now, old))
        new_leader = lambda: (lambda l: l if l and l != old else None)(net.the_leader())  # noqa: E731
        assert net.run_until(lambda: new_leader() is not None, 2.0 if clean_leave else 2.0 + ELECTION_TIMEOUT_S[1])
        elapsed = net.now - lost_at
        assert elapsed < (1.0 if clean_leave else 2.0 + ELECTION_TIMEOUT_S[1]), elapsed
        # the new leader re-stamped the committed plan in its own term and got it committed
        leader = net.nodes[new_leader()]
        assert net.run_until(lambda: leader.committed is not None and leader.committed.term == leader.term, 1.0)
        assert leader.committed.stages == plan.stages and leader.committed.epoch == plan.epoch + 1
        if clean_leave:
            survivors = sorted(leader.members | {leader.id})
            assert old not in survivors
            plan3 = net.propose(3)
            assert set(s.node for s in plan3.stages) <= set(survivors)
            assert net.run_until(lambda: net.agreed(plan3), 1.0)


def test_the_leader_notices_a_silent_follower_within_two_seconds():
    net = SimNet(3, seed=5)
    assert net.run_until(lambda: net.the_leader() is not None, 3.0)
    net.run(0.5)
    leader = net.nodes[net.the_leader()]
    victim = next(i for i in net.ids if i != leader.id)
    assert leader.silent_peers(net.now) == []
    net.down.add(victim)
    lost_at = net.now
    assert net.run_until(lambda: leader.silent_peers(net.now, after_s=1.0) == [victim], 2.0)
    assert net.now - lost_at <= 1.0 + 2 * leader.heartbeat_s + DT
    assert leader.is_leader  # a majority still answers


@pytest.mark.parametrize("seed", range(12))
def test_agreement_under_loss_duplication_and_reordering(seed):
    net = SimNet(5, seed=seed, loss=0.2, dup=0.1, delay=(0.001, 0.12))
    proposed = []
    for tag in range(1, 9):
        if net.run_until(lambda: net.the_leader() is not None, 4.0):
            proposed.append(net.propose(tag))
        net.run(0.4)
    net.loss, net.dup = 0.0, 0.0
    net.run(2.0)
    leader = net.the_leader()
    assert leader is not None
    final = net.nodes[leader].committed
    assert final is not None and net.agreed(final)
    committed = set(net.committed_by_epoch.values())
    assert len(committed) >= 3  # progress despite 20 % loss
    assert all(p in proposed or any(p.stages == q.stages for q in proposed) for p in committed)


@pytest.mark.parametrize("seed", range(6))
def test_a_minority_partition_commits_nothing_and_heals_to_the_majority(seed):
    net = SimNet(5, seed=200 + seed)
    assert net.run_until(lambda: net.the_leader() is not None, 3.0)
    p1 = net.propose(1)
    assert net.run_until(lambda: net.agreed(p1), 1.0)
    old = net.the_leader()
    buddy = next(i for i in net.ids if i != old)
    minority = {old, buddy}
    majority = [i for i in net.ids if i not in minority]
    for i in net.ids:
        net.group[i] = 1 if i in minority else 0
    stranded = net.propose(2, leader=old)  # the cut-off leader tries to move on alone
    assert net.run_until(lambda: net.the_leader(majority) is not None, 3.0)
    p3 = net.propose(3, leader=net.the_leader(majority))
    assert net.run_until(lambda: net.agreed(p3, majority), 1.5)
    net.run(2.0)
    assert stranded not in net.committed_by_epoch.values()
    assert all(net.nodes[i].committed == p1 for i in minority)  # nothing newer committed there
    assert not net.nodes[old].is_leader  # check quorum: it stopped acting as coordinator
    for i in net.ids:  # heal
        net.group[i] = 0
    assert net.run_until(lambda: net.the_leader() is not None and net.agreed(
        net.nodes[net.the_leader()].committed), 4.0)
    term = {net.nodes[i].term for i in net.ids}
    assert len(term) == 1
    final = net.nodes[net.the_leader()].committed
    assert final.stages == p3.stages and final.epoch >= p3.epoch
    assert all(net.nodes[i].plan == final or net.nodes[i].key >= (final.term, final.epoch) for i in net.ids)


@pytest.mark.parametrize("seed", range(6))
def test_a_rejoining_node_adopts_the_newer_term_and_plan(seed):
    net = SimNet(3, seed=300 + seed)
    assert net.run_until(lambda: net.the_leader() is not None, 3.0)
    p1 = net.propose(1)
    assert net.run_until(lambda: net.agreed(p1), 1.0)
    loner = next(i for i in net.ids if not net.nodes[i].is_leader)
    net.group[loner] = 1
    net.run(6.0)  # it campaigns alone, term after term, and never wins
    assert not net.nodes[loner].is_leader and net.nodes[loner].committed == p1
    rest = [i for i in net.ids if i != loner]
    p2 = net.propose(2, leader=net.the_leader(rest))
    assert net.run_until(lambda: net.agreed(p2, rest), 1.0)
    assert net.nodes[loner].term > net.nodes[rest[0]].term
    net.group[loner] = 0
    assert net.run_until(lambda: net.the_leader() is not None and len({net.nodes[i].term for i in net.ids}) == 1
                         and net.agreed(net.nodes[net.the_leader()].committed), 4.0)
    assert net.the_leader() != loner  # its plan was older: no vote from the others
    final = net.nodes[loner].committed
    assert final.stages == p2.stages and final.term >= net.nodes[loner].term - 1


def test_membership_changes_one_at_a_time():
    net = SimNet(3, seed=9)
    assert net.run_until(lambda: net.the_leader() is not None, 3.0)
    leader = net.nodes[net.the_leader()]
    # a fourth tab joins: everyone learns of it, and it catches up with the plan
    new = nid(4)
    net.ids.append(new)
    net.group[new] = 0
    net.nodes[new] = net._new(new, 9)
    for i in net.ids[:-1]:
        net.send(i, net.nodes[i].add_peer(net.now, new))
    p = net.propose(4)
    assert net.run_until(lambda: net.agreed(p), 1.0)
    assert leader.majority() == 3
    # two tabs leave; with 2 left the leader still commits (majority of 2 is 2)
    for gone in [i for i in net.ids if i != leader.id][:2]:
        net.down.add(gone)
        for i in net.up():
            net.send(i, net.nodes[i].remove_peer(net.now, gone))
    p2 = net.propose(5)
    assert net.run_until(lambda: net.agreed(p2), 1.0) and leader.is_leader


def test_stale_messages_are_answered_with_the_current_term():
    a, b = nid(1), nid(2)
    c = Coordinator(a, [b, nid(3)], rng=random.Random(1))
    c.receive(0.0, b, cm.DistributionPlan(5, make_plan(1, [b]).__class__(5, 3, "m", 30, make_plan(1, [b]).stages,
                                                                          1.0, None), None))
    assert (c.term, c.leader, c.key) == (5, b, (5, 3))
    # an older leader's plan (term 3) is not adopted; its sender learns term 5
    old = cm.Plan(3, 9, "m", 30, make_plan(2, [b]).stages, 1.0, None)
    assert c.receive(0.1, b, cm.DistributionPlan(3, old, (3, 9))) == [(b, cm.PlanAck(5, 5, 3))]
    assert c.key == (5, 3) and c.committed is None
    # a reordered older entry of the same leader does not replace a newer one
    newer = cm.Plan(5, 4, "m", 30, make_plan(3, [b]).stages, 1.0, None)
    c.receive(0.2, b, cm.DistributionPlan(5, newer, None))
    c.receive(0.3, b, cm.DistributionPlan(5, cm.Plan(5, 3, "m", 30, make_plan(4, [b]).stages, 1.0, None), (5, 3)))
    assert c.plan == newer and c.committed is None  # commit named an entry it no longer holds
    c.receive(0.4, b, cm.DistributionPlan(5, newer, (5, 4)))
    assert c.committed == newer
    # a commit names (term, epoch): the same epoch of another term is another plan
    d = Coordinator(a, [b, nid(3)], rng=random.Random(3))
    d.receive(0.0, b, cm.DistributionPlan(1, cm.Plan(1, 5, "m", 30, make_plan(5, [b]).stages, 1.0, None), None))
    d.receive(0.1, nid(3), cm.DistributionPlan(2, None, (2, 5)))
    assert d.committed is None and d.key == (1, 5) and d.leader == nid(3)
    # messages from a peer without a channel are ignored
    assert c.receive(0.5, nid(9), cm.RequestVote(99, 99, 99)) == [] and c.term == 5


def test_votes_go_only_to_candidates_with_a_plan_at_least_as_new():
    a, b, d = nid(1), nid(2), nid(3)
    c = Coordinator(a, [b, d], rng=random.Random(2))
    c.receive(0.0, b, cm.DistributionPlan(4, cm.Plan(4, 7, "m", 30, make_plan(1, [b]).stages, 1.0, None), None))
    assert c.receive(0.1, d, cm.RequestVote(5, 4, 6)) == [(d, cm.Vote(5, False))]  # older plan
    assert c.receive(0.1, d, cm.RequestVote(5, 3, 9)) == [(d, cm.Vote(5, False))]  # older term wins nothing
    assert c.receive(0.2, d, cm.RequestVote(6, 4, 7)) == [(d, cm.Vote(6, True))]
    assert c.receive(0.3, b, cm.RequestVote(6, 5, 1)) == [(b, cm.Vote(6, False))]  # one vote per term
    assert c.receive(0.3, d, cm.RequestVote(6, 4, 7)) == [(d, cm.Vote(6, True))]  # a retry is answered again


def test_random_faults_never_break_safety():
    """Many seeded runs of random partitions, heals, crashes, loss and proposals: the
    invariants (one leader per term, one plan per epoch, ordered commits) hold at every
    step, and once the network is whole again everyone agrees."""
    for seed in range(20):
        rng = random.Random(seed)
        n = rng.choice([3, 4, 5])
        net = SimNet(n, seed=1000 + seed, loss=rng.choice([0.0, 0.1, 0.3]), dup=0.1, delay=(0.001, 0.08))
        for _ in range(12):
            event = rng.random()
            if event < 0.3:
                for i in net.ids:
                    net.group[i] = rng.randrange(2)
            elif event < 0.5:
                for i in net.ids:
                    net.group[i] = 0
            elif event < 0.6 and len(net.down) < (n - 1) // 2:
                net.down.add(rng.choice(net.ids))
            elif event < 0.7:
                net.down.clear()
            else:
                for leader in net.leaders():
                    net.propose(rng.randrange(1000), leader=leader)
            net.run(rng.uniform(0.2, 1.5))
        net.loss, net.dup, net.down = 0.0, 0.0, set()
        for i in net.ids:
            net.group[i] = 0
        assert net.run_until(lambda: net.the_leader() is not None, 5.0), seed
        net.propose(4242)  # a node that was cut off may still force one more election
        assert net.run_until(settled(net), 6.0), seed


def settled(net):
    """A leader whose term's plan every node has committed."""
    def cond():
        leader = net.the_leader()
        done = leader is not None and net.nodes[leader].committed is not None
        return done and net.nodes[leader].committed.term == net.nodes[leader].term and net.agreed(
            net.nodes[leader].committed)
    return cond
