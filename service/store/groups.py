"""Groups of users for a Redis Cluster: every blocklist key of one group shares a hash slot.

A check reads five keys in one script, so they must live in one slot; the one thing every
revocation and every token knows is the user (the token's sub). Users fall into GROUPS
groups by a hash of their id, and the keys of group i carry a hash tag chosen so that it
hashes to slot i * 16384 / GROUPS: the groups spread evenly over the slot ranges, and so
over the primaries, however the slots are assigned.
"""

from __future__ import annotations

import functools
import zlib

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

# Fixed: revocations are recorded with their group, so changing it needs a reload of
# every revocation's group from its user (see revocations.user_group).
GROUPS = 256


def group_of(user: str) -> int:
    """The group a user's keys (and revocations) belong to."""
    return zlib.crc32(user.encode()) % GROUPS


@functools.cache
def group_tags() -> tuple[str, ...]:
    """For each group, the shortest tag of the form "g<hex>" that hashes to its slot."""
    wanted = {group * REDIS_CLUSTER_HASH_SLOTS // GROUPS: group for group in range(GROUPS)}
    tags = [""] * GROUPS
    candidate = 0
    while wanted:
        tag = f"g{candidate:x}"
        group = wanted.pop(key_slot(tag.encode()), None)
        if group is not None:
            tags[group] = tag
        candidate += 1
    return tuple(tags)
