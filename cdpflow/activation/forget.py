"""Forgetting a person in activation: the destinations, the profile stores and Kafka's topics.

Run by `cdpflow forget` (after the warehouse has forgotten them) and by the profile API's
`DELETE /v1/profiles/{id}`:

- every configured destination is asked to delete the member (`delete_member`, from what the
  profile store held of them; a destination that does not confirm is named, the rest goes on);
- each profile store named removes the person for good (nothing about them is stored or
  delivered again);
- with Kafka: the profile's tombstone on the compacted `cdp.profiles.changes`, and a tombstone
  over each of their dead letters on `cdp.destinations.deadletter` (compacted too).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, List, Mapping, Optional, Sequence


@dataclasses.dataclass
class ActivationForget:
    asked: List[str] = dataclasses.field(default_factory=list)        # destinations that confirmed
    unconfirmed: List[str] = dataclasses.field(default_factory=list)  # "name: error"
    stores: List[str] = dataclasses.field(default_factory=list)       # profile stores it was removed from
    tombstone: bool = False
    dead_letters_purged: int = 0


def delete_at_destinations(config: Mapping[str, Any], profile: Optional[Mapping[str, Any]],
                           segments: Sequence[str], done: ActivationForget) -> None:
    """Asks every configured destination to delete the member (nothing to ask without a profile row)."""
    from cdpflow.activation.destinations import destinations_from_config
    if profile is None:
        return
    for name, destination in destinations_from_config(config).items():
        try:
            outcome = destination.delete_member(profile, list(segments))
        finally:
            destination.close()
        if outcome.delivered:
            done.asked.append(name)
        else:
            done.unconfirmed.append(f"{name}: {outcome.error}")


def forget_in_activation(profile_id: str, config: Mapping[str, Any], profile_stores: Sequence[str] = (),
                         bootstrap: Optional[str] = None, profile: Optional[Mapping[str, Any]] = None,
                         segments: Sequence[str] = ()) -> ActivationForget:
    """Forgets `profile_id` in activation (see the module docstring).

    `profile` and `segments`: what is known of them when no profile store holds them (the
    warehouse's row, in the embedded demo); a profile store's own row wins.
    """
    from cdpflow.activation.profile_store import open_profile_store
    done = ActivationForget()
    asked = False
    for uri in profile_stores:
        store = open_profile_store(uri)
        try:
            held = store.profile(profile_id)
            if held is not None and not asked:
                delete_at_destinations(config, held, store.segments_of(profile_id), done)
                asked = True
            store.forget(profile_id)
        finally:
            store.close()
        done.stores.append(uri)
    if not asked:
        delete_at_destinations(config, profile, segments, done)
    if bootstrap:
        from cdpflow.activation.sidecar import purge_dead_letters
        from cdpflow.core.rows import profile_record
        from cdpflow.io.kafka_producer import producer, send_all
        now = int(time.time() * 1_000_000)
        client = producer(bootstrap)
        try:
            send_all(client, [profile_record({"profile_id": profile_id, "deleted": True, "as_of": now, "updated_at": now})])
        finally:
            client.close()
        done.tombstone = True
        done.dead_letters_purged = purge_dead_letters(bootstrap, profile_id)
    return done
