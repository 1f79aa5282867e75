"""Activation: what leaves cdpflow for the tools that act on it.

- `policy`: what each destination may receive of a profile (field policy, hashed identifiers).
- `destinations`: the `Destination` interface and one module per destination (`webhook`, ...).
- `sidecar`: `cdpflow serve sidecar`, which delivers `cdp.segments.changes` to the destinations.
- `profile_store`: the current profiles and memberships in Redis, kept from the change topics.
"""
