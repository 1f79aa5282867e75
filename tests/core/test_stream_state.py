"""The stream's state machines and their state encoding, without any engine."""
import subprocess
import sys
from decimal import Decimal

import pytest

from cdpflow.core.features import FeatureSettings, ProfileState, features
from cdpflow.core.stream_state import (PUT, RETRACT, IdentifierMachine, ProfileMachine, StateVersionError,
                                       decode_state, encode_state)
from cdpflow.core.timeutil import US_PER_DAY
from tests.core.test_features import AS_OF, ev


def a_state():
    state = ProfileState()
    for e in (ev("o1", 40, name="Order Completed", revenue=Decimal("19.99"), products=[{"category": "running"}]),
              ev("i1", 30, type_="identify", traits={"email": "a@x.com", "interests": ["running"], "age": 31}),
              ev("p1", 2, type_="page", channel="web"), ev("u1", 1, name="Unsubscribed")):
        state.add(e)
    return state


def test_state_round_trips_with_its_types():
    state = a_state()
    for value in (state, ("p_1", 3, 7), {"k1": (2, state), "k2": (1, None)},
                  (AS_OF, True, frozenset({(AS_OF, None, "new"), (AS_OF + 1, "new", "active")}))):
        back = decode_state(encode_state(value))
        assert back == value and type(back) is type(value)
    back = decode_state(encode_state(state))
    assert features(back, AS_OF) == features(state, AS_OF)
    assert isinstance(next(iter(back.days.values()))[1], Decimal) and isinstance(back.last_event, tuple)


def test_state_written_by_this_encoding_version_still_reads_and_an_unknown_one_is_refused():
    # Frozen bytes of encoding version 1: what a savepoint taken today holds.
    frozen = b'{"v":1,"state":{"$m":[["k1",{"$t":[2,null]}]]}}'
    assert decode_state(frozen) == {"k1": (2, None)}
    assert decode_state(b'{"v":1,"state":{"$t":["p_1",3,7]}}') == ("p_1", 3, 7)
    with pytest.raises(StateVersionError, match="encoding version 2"):
        decode_state(b'{"v":2,"state":null}')
    with pytest.raises(StateVersionError):
        decode_state(b'[1, 2]')


def test_an_identifier_hands_its_state_over_only_for_a_newer_epoch():
    machine = IdentifierMachine(FeatureSettings().session_timeout_us)
    first = ev("e1", 3).replace(profile_id="p_a")
    owner, held, out, moved = machine.on_event("k", None, None, first, epoch=1)
    assert owner == ("p_a", 1, 1) and [(p, m[0]) for p, m in out] == [("p_a", PUT)] and not moved
    owner, out, moved = machine.on_move("k", owner, held, "p_b", epoch=2)
    assert owner == ("p_b", 2, 2) and moved
    assert [(p, m[0], m[2]) for p, m in out] == [("p_a", RETRACT, 2), ("p_b", PUT, 2)]
    # an older move than one applied changes nothing
    assert machine.on_move("k", owner, held, "p_a", epoch=1) == (owner, [], False)


def test_a_profile_retracts_a_superseded_transition_and_a_deleted_profile_its_whole_history():
    settings = FeatureSettings()
    machine = ProfileMachine(settings, until=AS_OF + 400 * US_PER_DAY)
    view = ProfileState()
    view.add(ev("v1", 1, name="Product Viewed"))
    members = machine.receive(None, PUT, "k", 1, view)
    row, sent, emitted, following = machine.on_timer("p_a", AS_OF, members, None, AS_OF)
    assert row["profile_id"] == "p_a" and [(t["to_stage"], t.get("retracted")) for t in sent] == [("prospect", None)]
    assert following is not None
    # a stale message is refused
    assert machine.receive(members, PUT, "k", 1, view) is None
    # a late order: the prospect stage is superseded by new
    late = ProfileState()
    late.add(ev("v1", 1, name="Product Viewed"))
    late.add(ev("o1", 2, name="Order Completed", revenue=Decimal(5)))
    members = machine.receive(members, PUT, "k", 2, late)
    row, sent, emitted, _ = machine.on_timer("p_a", AS_OF, members, emitted, AS_OF)
    assert [(t["to_stage"], bool(t.get("retracted"))) for t in sent] == [("prospect", True), ("new", False)]
    # absorbed: the row is a deletion and what was sent is retracted
    members = machine.receive(members, RETRACT, "k", 3, None)
    row, sent, emitted, following = machine.on_timer("p_a", AS_OF + 1, members, emitted, AS_OF)
    assert row == {"profile_id": "p_a", "deleted": True, "as_of": AS_OF + 1}
    assert [(t["to_stage"], t.get("retracted")) for t in sent] == [("new", True)] and following is None
    assert emitted == (AS_OF, False, frozenset())


def test_the_core_imports_no_engine():
    # What the Flink job's environment (an older Beam, or none) needs: the core without Beam.
    code = ("import sys; import cdpflow.core.stream_state, cdpflow.core.identity, cdpflow.core.governance, "
            "cdpflow.core.identity.redis; assert not [m for m in sys.modules if m.startswith('apache_beam')], "
            "sorted(m for m in sys.modules if m.startswith('apache_beam'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)
