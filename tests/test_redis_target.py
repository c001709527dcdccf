"""REDIS_URL: one server, a Sentinel-managed primary or a Cluster, read as redis-py will."""

from __future__ import annotations

import pytest

from service.config import ConfigError, load_settings
from service.store.redis_target import Topology, parse_target

STRONG = "x9" * 24
BASE = {
    "database_url": "postgresql://db/x",
    "secret_key": STRONG,
    "jwt_secret": STRONG,
    "jwt_issuer": "https://auth.example",
}


def test_a_sentinel_url_names_the_sentinels_the_primary_and_its_credentials() -> None:
    target = parse_target("redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380,s3/mymaster/2")
    assert target.topology is Topology.SENTINEL
    assert target.nodes == (("10.0.0.1", 26379), ("::1", 26380), ("s3", 26379))
    assert (target.service_name, target.db) == ("mymaster", 2)
    assert (target.username, target.password, target.ssl) == ("app", "p@ss", False)
    assert "p@ss" not in repr(target) and "p%40ss" not in repr(target)


def test_tls_to_the_primary_and_database_zero_by_default() -> None:
    target = parse_target("rediss+sentinel://h:26379/primary")
    assert (target.ssl, target.db, target.username, target.password) == (True, 0, None, None)


def test_a_plain_url_stays_one_server() -> None:
    assert parse_target("redis://127.0.0.1:6379/0").topology is Topology.SINGLE


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://h:26379/", "names no primary"),
        ("redis+sentinel:///mymaster", "names no sentinel"),
        ("redis+sentinel://h:70000/mymaster", "is not host:port"),
        ("redis+sentinel://h:port/mymaster", "is not host:port"),
        ("redis+sentinel://h:26379/mymaster/one", "must be a number"),
        ("redis://h:6379/one", "must be a number"),
        ("memcached://h", "scheme"),
    ],
)
def test_unusable_urls_are_refused_at_start_up_without_echoing_them(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as refused:
        load_settings(**BASE, redis_url=url.replace("h:", "user:secret@h:", 1))
    assert "secret" not in str(refused.value)


def test_a_cluster_url_names_its_nodes_and_credentials() -> None:
    target = parse_target("redis+cluster://app:p%40ss@10.0.0.1:7000,[::1]:7001,n3/")
    assert target.topology is Topology.CLUSTER
    assert target.nodes == (("10.0.0.1", 7000), ("::1", 7001), ("n3", 6379))
    assert (target.username, target.password, target.ssl) == ("app", "p@ss", False)
    assert "p@ss" not in repr(target)
    assert parse_target("rediss+cluster://h:7000").ssl


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster:///", "names no node"),
        ("redis+cluster://h:7000/2", "database 0 only"),
        ("redis+cluster://h:port/", "is not host:port"),
    ],
)
def test_unusable_cluster_urls_are_refused_without_echoing_them(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as refused:
        load_settings(**BASE, redis_url=url.replace("h:", "user:secret@h:", 1))
    assert "secret" not in str(refused.value)


def test_a_prefix_with_braces_is_refused_on_a_cluster_only() -> None:
    with pytest.raises(ConfigError, match="REDIS_PREFIX"):
        load_settings(**BASE, redis_url="redis+cluster://h:7000/", redis_prefix="a{b}:")
    load_settings(**BASE, redis_url="redis://h:6379/0", redis_prefix="a{b}:")
