"""Redis topologies: store URLs to redis-py clients, for one server, a Cluster or Sentinel.

The URL forms follow the ``limits`` library's convention::

    redis://[user:password@]host[:port][/db][?options]           one server (rediss:// for TLS)
    redis+cluster://[user:password@]host[:port][,host[:port]...][?options]
    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?options]

``rediss+cluster://`` and ``rediss+sentinel://`` use TLS. Cluster nodes default to port 6379,
Sentinels to 26379. The credentials in the URL are the data nodes'; Sentinels that require
their own take ``sentinel_username`` / ``sentinel_password``.

Options may be given in the query string or as keyword arguments of ``store_from_url``; the
same option given both ways with different values is refused. Query strings are typed with
redis-py's own parsers (``socket_timeout=0.5``, ``retry_on_timeout=true``, ...). Three groups:

- the store's own (``prefix``, ``wait_replicas``, ``wait_timeout``), see
  :class:`~safe_openai.stores._redis.RedisStore`;
- the topology's: for a cluster ``require_full_coverage``, ``reinitialize_steps``,
  ``dynamic_startup_nodes``, ``cluster_error_retry_attempts``, ``read_from_replicas``; for
  Sentinel ``sentinel_username``, ``sentinel_password``, ``min_other_sentinels``;
- every other option goes to each data-node connection (``socket_timeout``, ``ssl_ca_certs``,
  ``max_connections``, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.connection
import redis.sentinel

from ..errors import ConfigurationError

__all__ = [
    "STORE_OPTIONS",
    "RedisUrl",
    "is_cluster",
    "is_sentinel",
    "open_async_client",
    "open_client",
    "parse_redis_url",
]

Topology = Literal["server", "cluster", "sentinel"]

# redis-py leaves these untyped; typed as Any once here
_rp: Any = redis

#: The store's own options, with the parser of their query-string form.
STORE_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prefix": str,
    "wait_replicas": int,
    "wait_timeout": float,
}


def _to_bool(value: str) -> bool:
    parsed = _rp.connection.to_bool(value)
    if parsed is None:
        raise ValueError(value)
    return bool(parsed)


_CLUSTER_OPTIONS: dict[str, Callable[[str], Any]] = {
    "require_full_coverage": _to_bool,
    "reinitialize_steps": int,
    "dynamic_startup_nodes": _to_bool,
    "cluster_error_retry_attempts": int,
    "read_from_replicas": _to_bool,
}
_SENTINEL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "sentinel_username": str,
    "sentinel_password": str,
    "min_other_sentinels": int,
}
_DEFAULT_PORTS: dict[Topology, int] = {"server": 6379, "cluster": 6379, "sentinel": 26379}
_SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("server", False),
    "rediss": ("server", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}


@dataclass(frozen=True)
class RedisUrl:
    """A parsed Redis store URL merged with the keyword options it was opened with.

    Attributes:
        url: The URL as given (for a plain server, without the store's own query options).
        topology: ``"server"``, ``"cluster"`` or ``"sentinel"``.
        tls: Whether the data nodes (and Sentinels) are reached over TLS.
        nodes: Cluster startup nodes or Sentinels, as ``(host, port)``.
        service: The Sentinel service (master) name.
        connection: Options of every data-node connection.
        topology_options: Options of the cluster client or of the Sentinel set.
        store: The store's own options.
    """

    url: str
    topology: Topology
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    connection: dict[str, Any] = field(default_factory=dict)
    topology_options: dict[str, Any] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def _bad(url: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"The Redis store URL {_redact(url)!r} cannot be parsed: {problem}")


def _merge(
    url: str, name: str, from_url: Any, given: Mapping[str, Any], into: dict[str, Any]
) -> None:
    if name in given and given[name] != from_url:
        raise _bad(url, f"{name} is given both in the URL and as a keyword, differently")
    into[name] = from_url


def _parse_query(
    url: str, query: str, options: Mapping[str, Any], topology: Topology
) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str]]]:
    """Split the query into store, topology and connection options (typed), merged with
    ``options``. Returns them and the query pairs left for redis-py to parse."""
    store: dict[str, Any] = {}
    topo: dict[str, Any] = {}
    parsers = {"cluster": _CLUSTER_OPTIONS, "sentinel": _SENTINEL_OPTIONS}.get(topology, {})
    rest: list[tuple[str, str]] = []
    for name, raw in parse_qsl(query, keep_blank_values=True):
        target, parser = (
            (store, STORE_OPTIONS[name])
            if name in STORE_OPTIONS
            else (topo, parsers[name])
            if name in parsers
            else (None, None)
        )
        if target is None or parser is None:
            rest.append((name, raw))
            continue
        try:
            value = parser(raw)
        except ValueError:
            raise _bad(url, f"{name}={raw!r} is not a valid value") from None
        _merge(url, name, value, options, target)
    for name, value in options.items():
        if name in STORE_OPTIONS:
            store.setdefault(name, value)
        elif name in parsers:
            topo.setdefault(name, value)
    return store, topo, rest


def _connection_options(
    url: str, credentials: str, host: str, path: str, rest: list[tuple[str, str]], tls: bool
) -> dict[str, Any]:
    """The data-node options in the URL, typed by redis-py's own URL parser."""
    single = f"{'rediss' if tls else 'redis'}://{credentials}{host}{path}"
    if rest:
        single += "?" + urlencode(rest, quote_via=quote)
    try:
        parsed: dict[str, Any] = _rp.connection.parse_url(single)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    for name in ("host", "port", "connection_class"):
        parsed.pop(name, None)
    return parsed


def _nodes(url: str, netloc: str, default_port: int) -> tuple[str, tuple[tuple[str, int], ...]]:
    credentials, at, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        part = part.strip()
        if part.startswith("["):  # an IPv6 address: [::1] or [::1]:7000
            host, _, after = part[1:].partition("]")
            port = after.removeprefix(":")
        else:
            host, colon, port = part.rpartition(":")
            if not colon:
                host, port = port, ""
        if not host:
            raise _bad(url, f"a node without a host ({part!r})")
        try:
            number = int(port) if port else default_port
        except ValueError:
            raise _bad(url, f"{port!r} is not a port") from None
        if not 0 < number < 65536:
            raise _bad(url, f"{number} is not a port")
        nodes.append((host, number))
    return (credentials + at), tuple(nodes)


def parse_redis_url(url: str, options: Mapping[str, Any]) -> RedisUrl:
    """Parse a Redis store URL and merge ``options`` (keyword arguments) into it.

    Raises:
        ConfigurationError: The scheme is not a Redis one, the URL is malformed, or an option
            is given twice with different values.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise _bad(url, f"the scheme must be one of {known}")
    topology, tls = _SCHEMES[scheme.lower()]
    netloc, _, after = rest.partition("/")
    path, _, query = ("/" + after).partition("?")
    if "?" in netloc:  # no path: redis+cluster://h:1,h:2?opt=1
        netloc, _, query = netloc.partition("?")
        path = ""
    store, topo, left = _parse_query(url, query, options, topology)
    connection = {k: v for k, v in options.items() if k not in store and k not in topo}
    if topology == "server":
        # redis-py parses the rest itself, once the store's own options left the query
        for name, raw in left:
            parser: Any = _rp.connection.URL_QUERY_ARGUMENT_PARSERS.get(name, str)
            if name in connection and connection[name] != parser(raw):
                raise _bad(url, f"{name} is given both in the URL and as a keyword, differently")
        base = f"{scheme}://{netloc}{path}" + (
            f"?{urlencode(left, quote_via=quote)}" if left else ""
        )
        return RedisUrl(base, topology, tls, connection=connection, store=store)
    credentials, nodes = _nodes(url, netloc, _DEFAULT_PORTS[topology])
    service = ""
    db_path = ""
    if topology == "sentinel":
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts or len(parts) > 2:
            raise _bad(url, "a Sentinel URL needs the service name as its path: /service[/db]")
        service = parts[0]
        if len(parts) == 2:
            db_path = "/" + parts[1]
    elif path.strip("/") not in ("", "0"):
        raise _bad(url, "a cluster has one database; the path must be empty or /0")
    from_url = _connection_options(url, credentials, "localhost", db_path, left, tls)
    if topology == "cluster":
        from_url.pop("db", None)
    for name, value in from_url.items():
        _merge(url, name, value, connection, connection)
    return RedisUrl(url, topology, tls, nodes, service, connection, topo, store)


def _cluster_kwargs(parsed: RedisUrl, cls: type[Any]) -> dict[str, Any]:
    kwargs = {**parsed.connection, **parsed.topology_options}
    if parsed.tls:
        kwargs["ssl"] = True
    if kwargs.pop("db", 0):
        raise _bad(parsed.url, "a cluster has one database (db 0)")
    known = set(inspect.signature(cls.__init__).parameters) | set(redis.cluster.REDIS_ALLOWED_KEYS)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise _bad(parsed.url, f"unknown option(s) for a cluster: {', '.join(unknown)}")
    return kwargs


def _sentinel_parts(parsed: RedisUrl) -> tuple[dict[str, Any], dict[str, Any], int]:
    connection = dict(parsed.connection)
    if parsed.tls:
        connection["ssl"] = True
    sentinel_kwargs = {k: v for k, v in connection.items() if k.startswith(("socket_", "ssl"))}
    topo = dict(parsed.topology_options)
    if "sentinel_username" in topo:
        sentinel_kwargs["username"] = topo.pop("sentinel_username")
    if "sentinel_password" in topo:
        sentinel_kwargs["password"] = topo.pop("sentinel_password")
    return connection, sentinel_kwargs, int(topo.pop("min_other_sentinels", 0))


@dataclass
class OpenedClient:
    """A client the store opened, and what else to close with it (a Sentinel set)."""

    client: Any
    also_close: list[Any] = field(default_factory=list)


def open_client(parsed: RedisUrl) -> OpenedClient:
    """A synchronous redis-py client for ``parsed``.

    Raises:
        ConfigurationError: redis-py refused an option.
    """
    try:
        if parsed.topology == "server":
            return OpenedClient(redis.Redis.from_url(parsed.url, **parsed.connection))
        if parsed.topology == "cluster":
            kwargs = _cluster_kwargs(parsed, redis.cluster.RedisCluster)
            nodes = [_rp.cluster.ClusterNode(h, p) for h, p in parsed.nodes]
            return OpenedClient(redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs))
        connection, sentinel_kwargs, min_other = _sentinel_parts(parsed)
        sentinel = _rp.sentinel.Sentinel(
            list(parsed.nodes),
            min_other_sentinels=min_other,
            sentinel_kwargs=sentinel_kwargs,
            **connection,
        )
        return OpenedClient(sentinel.master_for(parsed.service), [sentinel])
    except (TypeError, ValueError, redis.exceptions.RedisClusterException) as exc:
        raise _bad(parsed.url, str(exc)) from exc


def open_async_client(parsed: RedisUrl) -> OpenedClient:
    """An asyncio redis-py client for ``parsed`` (connects on first use).

    Raises:
        ConfigurationError: redis-py refused an option.
    """
    try:
        if parsed.topology == "server":
            return OpenedClient(redis.asyncio.Redis.from_url(parsed.url, **parsed.connection))
        if parsed.topology == "cluster":
            kwargs = _cluster_kwargs(parsed, redis.asyncio.cluster.RedisCluster)
            nodes = [_rp.asyncio.cluster.ClusterNode(h, p) for h, p in parsed.nodes]
            return OpenedClient(redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, **kwargs))
        connection, sentinel_kwargs, min_other = _sentinel_parts(parsed)
        sentinel = _rp.asyncio.sentinel.Sentinel(
            list(parsed.nodes),
            min_other_sentinels=min_other,
            sentinel_kwargs=sentinel_kwargs,
            **connection,
        )
        return OpenedClient(sentinel.master_for(parsed.service), [sentinel])
    except (TypeError, ValueError, redis.exceptions.RedisClusterException) as exc:
        raise _bad(parsed.url, str(exc)) from exc


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client (sync or asyncio)."""
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def is_sentinel(client: Any) -> bool:
    """Whether ``client`` talks to a Sentinel-managed primary (``Sentinel.master_for``)."""
    pool = getattr(client, "connection_pool", None)
    return isinstance(
        pool,
        (redis.sentinel.SentinelConnectionPool, redis.asyncio.sentinel.SentinelConnectionPool),
    )
