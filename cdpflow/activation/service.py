"""Running the activation services from the command line: the sidecar and dead-letter replays.

    cdpflow serve sidecar --bootstrap HOST:PORT --profile-store redis://HOST:PORT/DB \\
        [--identity-store redis://...] [--warehouse FILE] [--destination NAME ...] [--config FILE]
    cdpflow destinations list [--config FILE]
    cdpflow destinations replay NAME --bootstrap HOST:PORT --profile-store URI [...]

The governance the sidecar honours starts from the warehouse's (`--warehouse`: its forgotten
identifiers, hashed with the deployment's suppression key) and follows the identity store's
(`--identity-store`: forgets made while the sidecar runs), as every other path does.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Dict, Mapping, Optional, Sequence

from cdpflow.activation.destinations import destinations_from_config
from cdpflow.activation.profile_store import ProfileStoreUpdater, open_profile_store
from cdpflow.activation.sidecar import DestinationWorker, GovernanceView, replay_dead_letters
from cdpflow.errors import BadInput


def governance_view(config: Mapping[str, Any], warehouse: Optional[str], identity_store: Optional[str]) -> GovernanceView:
    """The sidecar's governance: the warehouse's forgotten identifiers, then the identity store's."""
    from cdpflow.core import governance
    if warehouse:
        from cdpflow.warehouse import open_warehouse
        with open_warehouse(warehouse) as wh:
            key = governance.suppression_key(config, wh.demo_key_file())
            rules = governance.identity_rules(config, wh.governance(), key)
    else:
        key = governance.suppression_key(config)
        rules = governance.identity_rules(config, governance.GovernanceState(), key)
    return GovernanceView(identity_store, rules)


class SidecarFailed(RuntimeError):
    """A destination's worker stopped on an error; its batch in flight was not committed."""


@contextlib.contextmanager
def _services_said_in_words(bootstrap: str, profile_store: str):
    """Kafka or Redis not answering is a clear error (exit 2), not a traceback."""
    from kafka.errors import KafkaError
    from redis.exceptions import ConnectionError as RedisConnectionError
    try:
        yield
    except KafkaError as err:
        raise BadInput(f"no Kafka broker answers at {bootstrap} ({type(err).__name__}): start one with "
                       "`cdpflow stack up kafka` or give --bootstrap") from None
    except RedisConnectionError as err:
        raise BadInput(f"the profile store {profile_store} does not answer ({err}): start Redis with "
                       "`cdpflow stack up redis` or give --profile-store") from None


def serve_sidecar(config: Mapping[str, Any], bootstrap: str, profile_store: str, identity_store: Optional[str],
                  warehouse: Optional[str], names: Sequence[str] = (), until_idle_s: Optional[float] = None,
                  on_start=None) -> Dict[str, Dict[str, int]]:
    """Runs one worker per destination until SIGTERM/SIGINT (or until idle); returns each one's counts."""
    destinations = destinations_from_config(config, names)
    if not destinations:
        raise BadInput("no destinations configured (activation.destinations): nothing to deliver to")
    store = open_profile_store(profile_store)
    gov = governance_view(config, warehouse, identity_store)
    with _services_said_in_words(bootstrap, profile_store):
        store.client.ping()
        updater = ProfileStoreUpdater(bootstrap, store)
    workers = [DestinationWorker(bootstrap, d, store, gov, before_batch=updater.catch_up) for d in destinations.values()]
    results: Dict[str, Dict[str, int]] = {}

    def stop(*_):
        for worker in workers:
            worker.stop()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, stop)
    try:
        threads, failures = [], {}

        def work(worker):
            try:
                results[worker.destination.name] = worker.run(until_idle_s)
            except Exception as err:  # noqa: BLE001 - said below, and the other workers stop
                failures[worker.destination.name] = err
                stop()

        for worker in workers:
            thread = threading.Thread(target=work, args=(worker,), name=f"sidecar-{worker.destination.name}",
                                      daemon=True)
            thread.start()
            threads.append(thread)
        if on_start is not None:
            on_start(destinations)
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(timeout=0.5)
        if failures:
            # nothing of the failed batch was committed: a restart delivers it again
            raise SidecarFailed("; ".join(f"{name}: {type(err).__name__}: {err}" for name, err in failures.items()))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for worker in workers:
            worker.close()
        updater.close()
        gov.close()
        store.close()
    return results


def replay(config: Mapping[str, Any], name: str, bootstrap: str, profile_store: str, identity_store: Optional[str],
           warehouse: Optional[str]) -> Dict[str, int]:
    destination = destinations_from_config(config, [name])[name]
    store = open_profile_store(profile_store)
    gov = governance_view(config, warehouse, identity_store)
    try:
        with _services_said_in_words(bootstrap, profile_store):
            store.client.ping()
            return replay_dead_letters(bootstrap, destination, store, gov)
    finally:
        gov.close()
        store.close()
