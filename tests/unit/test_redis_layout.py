"""The Redis store's key layouts and cluster URLs, without a server: one Redis as before, a cluster spread out."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import SSLConnection
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from service.sessions.redis import INDEX_SHARDS, RedisStore, cluster_client, shard_tags


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_one_redis_keeps_its_layout() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", "ntm:")
    assert (store.key("abc"), store.index_keys, store.owner_key("k")) == ("ntm:s:abc", ["ntm:index"], "ntm:owner:k")
    assert store.shard("abc") == 0 and not store.cluster


def test_cluster_keys_spread_sessions_and_index_shards_over_the_slots() -> None:
    store = RedisStore("redis+cluster://127.0.0.1:7000", "ntm:")
    assert store.key("abc") == "ntm:s:{abc}" and slot(store.key("abc")) == slot("abc")
    assert len(store.index_keys) == INDEX_SHARDS
    ranges = [slot(key) * INDEX_SHARDS // REDIS_CLUSTER_HASH_SLOTS for key in store.index_keys]
    assert ranges == list(range(INDEX_SHARDS)), "shard k's slot lies in the k-th sixteenth of the slot space"
    for shard, index in enumerate(store.index_keys):  # a shard and its owners' parts: one slot, one script
        assert slot(store.owner_key("some-key-id", shard)) == slot(index)
    ids = [f"session-{n}" for n in range(2000)]
    assert {store.shard(session_id) for session_id in ids} == set(range(INDEX_SHARDS))
    for session_id in ids:  # a session and its shard in one sixteenth of the slots: mostly on one master
        same_range = {
            slot(key) * INDEX_SHARDS // REDIS_CLUSTER_HASH_SLOTS
            for key in (store.key(session_id), *store._index_entry("k", store.shard(session_id)))
        }
        assert len(same_range) == 1
    assert shard_tags(4) == shard_tags(4) and len(set(shard_tags(INDEX_SHARDS))) == INDEX_SHARDS


def test_a_cluster_prefix_may_not_hold_a_hash_tag() -> None:
    with pytest.raises(ValueError, match="hash tag"):
        RedisStore("redis+cluster://127.0.0.1:7000", "{ntm}:")


def test_cluster_urls_name_every_startup_node_with_auth_tls_and_options() -> None:
    client = cluster_client("rediss+cluster://user:secret@10.0.0.1:7000,10.0.0.2:7001,[::1]/?ssl_cert_reqs=none")
    assert sorted(client.nodes_manager.startup_nodes) == ["10.0.0.1:7000", "10.0.0.2:7001", "::1:6379"]
    options = client.connection_kwargs
    assert options["connection_class"] is SSLConnection and options["ssl_cert_reqs"] == "none"
    assert (options["username"], options["password"]) == ("user", "secret")
    plain = cluster_client("redis+cluster://10.0.0.1:7000")
    assert (
        plain.connection_kwargs["connection_class"] is not SSLConnection and plain.connection_kwargs["password"] is None
    )
    with pytest.raises(ValueError, match="names no node"):
        cluster_client("redis+cluster://")
