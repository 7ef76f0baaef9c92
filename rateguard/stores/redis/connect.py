"""Where a RedisStore's Redis is: one server, a Sentinel set, a Cluster, or a client you made.

`Deployment` turns the constructor's options into two things: where decisions go (addresses
for rateguard's own connection, `wire`; or, for ``client=``, that client's public pipeline API)
and a redis-py client for everything else (admin, counters, pub/sub, Sentinel discovery), made
anew for each event loop since redis-py's connections belong to the loop that opened them.
"""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from rateguard.errors import ConfigurationError, StoreError
from rateguard.stores.redis.wire import Address, Settings

Kind = Literal["single", "sentinel", "cluster", "client"]
_TRUE = ("1", "true", "yes", "on")


ADMIN_TIMEOUT = 1.0  # seconds: the least timeout of the admin client (connect and each reply)


@dataclass(frozen=True, slots=True)
class Deployment:
    """The Redis a store talks to, as configured (no connection is made here)."""

    kind: Kind
    settings: Settings
    address: Address | None = None  # single server
    url: str | None = None  # as given, for redis-py's own client
    use_ssl: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    client: Any = None  # the user's redis-py client (never closed by rateguard)
    cluster_wire: Settings | None = None  # a user's RedisCluster: rateguard's own connections to its nodes

    @property
    def where(self) -> str:
        """For logs and errors: where Redis is, never a password."""
        if self.kind == "sentinel":
            return f"sentinel service {self.service_name!r}"
        if self.kind == "client":
            return describe_client(self.client)
        assert self.address is not None
        where = str(self.address)
        if self.kind == "cluster":
            return f"cluster {where}"
        return where if self.address.path else f"{where}/{self.settings.db}"

    def admin_client(self, socket_timeout: float, sentinel: Sentinel | None = None) -> Any:
        """A redis-py client for this deployment (the user's own, for ``client=``)."""
        if self.kind == "client":
            return self.client
        # Admin, shared totals and resets are off the hot path: a busy host (or a TLS handshake)
        # must not fail them at the decisions' 50 ms. A server that is down refuses at once anyway.
        timeouts: dict[str, Any] = {
            "socket_timeout": max(socket_timeout, ADMIN_TIMEOUT),
            "socket_connect_timeout": max(self.settings.connect_timeout, ADMIN_TIMEOUT),
        }
        s = self.settings
        if self.kind == "sentinel":
            assert self.service_name is not None
            return (sentinel or self.sentinel(socket_timeout)).master_for(self.service_name, **timeouts)
        if self.kind == "cluster":
            if self.url is not None:
                return RedisCluster.from_url(self.url, **timeouts)
            assert self.address is not None
            return RedisCluster(  # type: ignore[abstract, unused-ignore]
                host=self.address.host, port=self.address.port, username=s.username, password=s.password,
                ssl=self.use_ssl, **timeouts,
            )  # fmt: skip
        if self.url is not None:
            return aioredis.Redis.from_url(self.url, **timeouts)
        assert self.address is not None
        return aioredis.Redis(
            host=self.address.host, port=self.address.port, db=s.db, username=s.username, password=s.password,
            ssl=self.use_ssl, **timeouts,
        )  # fmt: skip

    def sentinel(self, socket_timeout: float) -> Sentinel:
        timeouts = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": max(self.settings.connect_timeout, 0.05),
        }
        s = self.settings
        return Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=timeouts,
            username=s.username,
            password=s.password,
            db=s.db,
            **timeouts,
        )


def cluster_wire_settings(client: Any, connect_timeout: float) -> Settings | None:
    """How to reach a user's RedisCluster's nodes with rateguard's own connections, read from its
    public ``get_connection_kwargs()``; None when it is set up in a way they can't follow (a
    credential provider): decisions then go through the client itself."""
    try:
        kwargs = client.get_connection_kwargs()
    except Exception:  # an unusual client: it decides itself
        return None
    if kwargs.get("credential_provider") is not None:
        return None
    context = None
    connection_class = kwargs.get("connection_class")
    if connection_class is not None and "SSL" in getattr(connection_class, "__name__", ""):
        context = ssl_context(
            {k: [str(v)] for k, v in kwargs.items() if k.startswith("ssl_") and v is not None}
        )
    return Settings(kwargs.get("username"), kwargs.get("password"), 0, context, connect_timeout)


async def cluster_nodes(client: Any) -> list[Address]:
    """The primaries a user's RedisCluster knows (it reads the cluster's map on first use)."""
    await client.initialize()
    return [Address(str(node.host), int(node.port)) for node in client.get_primaries()]


def describe_client(client: Any) -> str:
    """Where a user's client points, from its public attributes (never a password)."""
    if hasattr(client, "get_node_from_key"):  # a RedisCluster: its first node as given
        nodes = getattr(client, "startup_nodes", None) or [client.get_default_node()]
        node = next(iter(nodes.values())) if isinstance(nodes, dict) else nodes[0]
        return f"cluster {node.host}:{node.port}" if node is not None else "cluster"
    service = getattr(getattr(client, "connection_pool", None), "service_name", None)
    if isinstance(service, str):  # Sentinel.master_for(...): the primary is found per connection
        return f"sentinel service {service!r}"
    try:
        kwargs = client.get_connection_kwargs()
    except Exception:  # something unusual: say what it is
        return type(client).__name__
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def _seconds(name: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 60:
        raise ConfigurationError(f"{name} must be a number of seconds in (0, 60], got {value!r}")
    return float(value)


def ssl_context(query: dict[str, list[str]] | None = None) -> ssl_module.SSLContext:
    """A client TLS context from rediss:// query options, as redis-py reads them."""
    q = {k: v[-1] for k, v in (query or {}).items()}
    try:
        return _ssl_context(q)
    except (OSError, ssl_module.SSLError) as exc:
        files = ", ".join(
            f"{k}={q[k]!r}" for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if q.get(k)
        )
        raise ConfigurationError(
            f"can't set up TLS from {files or 'the defaults'}: {exc}; check that the files exist and are PEM"
        ) from None


def _ssl_context(q: dict[str, str]) -> ssl_module.SSLContext:
    context = ssl_module.create_default_context(cafile=q.get("ssl_ca_certs"))
    if q.get("ssl_cert_reqs", "required").lower() in ("none", "optional"):
        context.check_hostname = False
        context.verify_mode = (
            ssl_module.CERT_NONE if q.get("ssl_cert_reqs", "").lower() == "none" else ssl_module.CERT_OPTIONAL
        )
    elif q.get("ssl_check_hostname", "true").lower() not in _TRUE:
        context.check_hostname = False
    if q.get("ssl_certfile"):
        context.load_cert_chain(q["ssl_certfile"], q.get("ssl_keyfile"))
    return context


def redact(url: str) -> str:
    """The url without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':' if user else ''}***@{host}"


def from_url(url: object, *, cluster: bool, connect_timeout: float) -> Deployment:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"url must look like 'redis://host:6379/0', got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"bad Redis url {redact(url)!r}: the scheme must be redis://, rediss:// (TLS) or unix://"
        )
    query = parse_qs(parts.query)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is None and username is not None and scheme != "unix":
        username, password = None, username  # redis://password@host, as redis-py reads it
    try:
        if scheme == "unix":
            address = Address(path=unquote(parts.path))
            db = int(query.get("db", ["0"])[-1])
        else:
            address = Address(parts.hostname or "localhost", parts.port or 6379)
            db = int((parts.path or "/").strip("/") or query.get("db", ["0"])[-1])
    except ValueError:
        raise ConfigurationError(
            f"bad Redis url {redact(url)!r}: the port and the database must be numbers"
        ) from None
    if db < 0:
        raise ConfigurationError(f"bad Redis url {redact(url)!r}: the database must be >= 0")
    if cluster and (scheme == "unix" or db):
        raise ConfigurationError(
            "a Redis Cluster has one database (0) and no unix sockets: use redis://node:7000"
        )
    context = ssl_context(query) if scheme == "rediss" else None
    settings = Settings(username, password, db, context, connect_timeout)
    return Deployment("cluster" if cluster else "single", settings, address, url, scheme == "rediss")


def from_options(
    *,
    url: str | None,
    host: str | None,
    port: int,
    db: int,
    username: str | None,
    password: str | None,
    ssl: bool,
    client: Any,
    cluster: bool,
    sentinels: Sequence[tuple[str, int]] | None,
    service_name: str | None,
    connect_timeout: float,
) -> Deployment:
    """Check the options of `RedisStore` and say where its Redis is."""
    given = [
        n
        for n, v in (("url", url), ("host", host), ("client", client), ("sentinels", sentinels))
        if v is not None
    ]
    if len(given) > 1:
        raise ConfigurationError(
            f"RedisStore takes one of url=, host=/port=, sentinels= or client=, got {' and '.join(given)}"
        )
    if service_name is not None and sentinels is None:
        raise ConfigurationError("service_name= goes with sentinels=")
    if url is not None or client is not None:
        ignored = [
            n
            for n, v, default in (("db", db, 0), ("username", username, None), ("password", password, None))
            if v != default
        ] + (["ssl"] if ssl else [])
        if ignored:
            names = " and ".join(n + "=" for n in ignored)
            if url is not None:
                raise ConfigurationError(
                    f"{names} can't go with url=: put them in the url, "
                    "redis://username:password@host:6379/0 (rediss:// for TLS)"
                )
            raise ConfigurationError(f"{names} can't go with client=: the client you made carries them")
    connect_timeout = _seconds("connect_timeout", connect_timeout)
    if client is not None:
        if not hasattr(client, "evalsha") or not hasattr(client, "pipeline"):
            raise ConfigurationError(
                f"client must be a redis.asyncio client (Redis, RedisCluster or "
                f"Sentinel.master_for(...)), got {type(client).__name__}"
            )
        if not hasattr(client, "get_node_from_key") and not hasattr(client, "connection_pool"):
            raise ConfigurationError(
                f"client must be an asyncio client from redis.asyncio, got {type(client).__name__}"
            )
        settings = Settings(connect_timeout=connect_timeout)
        wire = (
            cluster_wire_settings(client, connect_timeout) if hasattr(client, "get_node_from_key") else None
        )
        return Deployment("client", wire or settings, client=client, cluster_wire=wire)
    if url is not None:
        return from_url(url, cluster=cluster, connect_timeout=connect_timeout)
    if not isinstance(db, int) or isinstance(db, bool) or db < 0:
        raise ConfigurationError(f"db must be an int >= 0, got {db!r}")
    context = ssl_context() if ssl else None
    settings = Settings(username, password, db, context, connect_timeout)
    if sentinels is not None:
        if not service_name or not isinstance(service_name, str):
            raise ConfigurationError(
                "sentinels= needs service_name=, the name the sentinels monitor (e.g. 'mymaster')"
            )
        try:
            hosts = tuple((str(h), int(p)) for h, p in sentinels)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"sentinels must be a list of (host, port) pairs, got {sentinels!r}"
            ) from None
        if not hosts:
            raise ConfigurationError("sentinels must name at least one (host, port)")
        return Deployment("sentinel", settings, use_ssl=bool(ssl), sentinels=hosts, service_name=service_name)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigurationError(f"port must be an int from 1 to 65535, got {port!r}")
    if cluster and db:
        raise ConfigurationError("a Redis Cluster has one database (0): leave db= out")
    return Deployment(
        "cluster" if cluster else "single", settings, Address(host or "localhost", port), use_ssl=bool(ssl)
    )


async def discover(sentinel: Sentinel, service_name: str) -> Address:
    """The current primary of a Sentinel-monitored service."""
    try:
        host, port = await sentinel.discover_master(service_name)
    except Exception as exc:  # MasterNotFoundError, or no sentinel reachable
        raise StoreError(f"no primary for sentinel service {service_name!r}: {exc}") from None
    return Address(str(host), int(port))


__all__ = ["Deployment", "discover", "from_options", "redact"]
