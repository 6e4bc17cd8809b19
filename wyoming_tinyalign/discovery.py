"""Zeroconf: advertising the Wyoming service, and the address a wildcard bind is reached at."""

from __future__ import annotations

import asyncio
import logging
import socket

from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

_LOGGER = logging.getLogger(__name__)


class Advert:
    """Zeroconf registration of `_wyoming._tcp.local.` with a real address (never 0.0.0.0)."""

    SERVICE_TYPE = "_wyoming._tcp.local."

    def __init__(self, zeroconf: AsyncZeroconf, info: AsyncServiceInfo) -> None:
        self._zeroconf, self._info = zeroconf, info

    @classmethod
    async def start(cls, name: str, host: str, listener: asyncio.Server) -> Advert | None:
        address = await asyncio.to_thread(advertised_address, host)
        if address is None:
            _LOGGER.warning("zeroconf: no usable IPv4 address for %s; not advertising", host)
            return None
        port = listener.sockets[0].getsockname()[1]
        info = AsyncServiceInfo(
            cls.SERVICE_TYPE,
            f"{name}.{cls.SERVICE_TYPE}",
            addresses=[socket.inet_aton(address)],
            port=port,
            server=f"{socket.gethostname()}.local.",
        )
        zeroconf = AsyncZeroconf(interfaces=[address])
        try:
            await zeroconf.async_register_service(info)
        except (OSError, ZeroconfError) as err:  # discovery is a convenience: keep serving without it
            _LOGGER.warning("zeroconf: cannot register %s: %s", info.name, err)
            await zeroconf.async_close()
            return None
        _LOGGER.info("zeroconf: registered %s at %s:%d", info.name, address, port)
        return cls(zeroconf, info)

    async def stop(self) -> None:
        await self._zeroconf.async_unregister_service(self._info)
        await self._zeroconf.async_close()
        _LOGGER.info("zeroconf: unregistered %s", self._info.name)


def advertised_address(host: str) -> str | None:
    """The IPv4 address to advertise for a bind host: itself if specific, else the default route's."""
    if host not in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(host)
        except OSError:
            return None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("224.0.0.251", 5353))  # no packet is sent; picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("0.") else address
