"""Joining a Ray cluster: one definition for `extract --engine ray` and `serve --ray`.

``ray.init(address=...)`` retries an address that does not answer for minutes; a user who mistyped
``--ray-address`` should hear so in seconds. So a HOST:PORT address is probed with a plain TCP connect
first, and a failure is DeviceUnavailable (exit 7) naming the address. ``ray.init(address=None)`` reads
``RAY_ADDRESS`` from the environment, so that address is probed the same way.
"""

from __future__ import annotations

import logging
import os
import socket

from mae_deploy.errors import DeviceUnavailable, InputError


def probe_address(address: str | None, what: str = "--ray-address") -> None:
    """Fail in seconds, not minutes, when a HOST:PORT address does not answer (exit 7 naming it).

    ``what`` names where the address came from (the option, or the environment variable).
    """
    if address in (None, "", "auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"{what} {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise DeviceUnavailable(
            f"cannot reach the Ray cluster at {address}, given by {what} ({e.strerror or e}); start it with "
            f"`ray start --head` on that machine, or check {what}"
        ) from e


def connect(ray, address: str | None, **init_kwargs) -> bool:
    """Join (or start) Ray unless this process already is connected; True when this call connected."""
    if ray.is_initialized():
        return False  # e.g. a notebook or a test that started Ray itself: use it, leave it running
    env = os.environ.get("RAY_ADDRESS") if address is None else None
    # ray.init(address=None) would retry RAY_ADDRESS for minutes, ignoring SIGTERM: probe it as the option's.
    probe_address(env or address, "the RAY_ADDRESS environment variable" if env else "--ray-address")
    init_kwargs.setdefault("logging_level", logging.WARNING)
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, TimeoutError) as e:
        where = address or env or "a new local Ray instance"
        raise DeviceUnavailable(f"cannot connect to the Ray cluster at {where}: {e}") from e
    return True
