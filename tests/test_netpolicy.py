"""The network policy: unit checks of the address rules, then real connects on loopback.

Addresses that cannot be routed here (link-local, metadata, RFC 1918) are checked on the policy
function only; every packet these tests send goes to 127.0.0.0/8 or ::1.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from fetcher.http import HttpHandler
from fetcher.netpolicy import BlockedAddress, NetworkPolicy, is_blocked_error

from .security_peers import Peer, job, recording_server, run_jobs, run_one, settings

ALWAYS = [
    "169.254.169.254",
    "169.254.0.1",
    "169.254.255.255",
    "fe80::1",
    "fe80::1%eth0",
    "febf:ffff::1",
    "fd00:ec2::254",
    "100.100.100.200",
    "::ffff:169.254.169.254",
    "::ffff:a9fe:a9fe",
    "::ffff:100.100.100.200",
    "64:ff9b::a9fe:a9fe",  # NAT64 form of 169.254.169.254
    "0:0:0:0:0:ffff:169.254.169.254",
]
PRIVATE = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",
    "100.127.255.255",
    "0.0.0.0",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "::ffff:127.0.0.1",
    "::ffff:10.1.2.3",
    "::ffff:192.168.0.1",
]
PUBLIC = [
    "93.184.216.34",
    "8.8.8.8",
    "2606:4700::1111",
    "172.32.0.1",
    "100.128.0.1",
    "::ffff:8.8.8.8",
]


@pytest.mark.parametrize("address", ALWAYS)
def test_always_refused_whatever_the_config(address: str) -> None:
    everything = ["0.0.0.0/0", "::/0", "169.254.0.0/16", "fe80::/10", "::ffff:0:0/96"]
    for policy in (
        NetworkPolicy(),
        NetworkPolicy(block_private=True),
        NetworkPolicy(allow=everything),
        NetworkPolicy(block_private=True, allow=everything),
    ):
        assert policy.refusal(address) is not None, (address, policy)


@pytest.mark.parametrize("address", PRIVATE)
def test_private_refused_only_with_block_private(address: str) -> None:
    assert NetworkPolicy().refusal(address) is None
    assert NetworkPolicy(block_private=True).refusal(address) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_allowed_even_with_block_private(address: str) -> None:
    assert NetworkPolicy(block_private=True).refusal(address) is None


def test_deny_and_allow_networks() -> None:
    policy = NetworkPolicy(deny=["203.0.113.0/24", "2001:db8::/32"], allow=["203.0.113.7/32"])
    assert policy.refusal("203.0.113.1") is not None
    assert policy.refusal("::ffff:203.0.113.1") is not None
    assert policy.refusal("2001:db8::5") is not None
    assert policy.refusal("203.0.113.7") is None
    assert policy.refusal("203.0.114.1") is None
    # allow re-allows within block_private too, and only there.
    loop = NetworkPolicy(block_private=True, allow=["127.0.0.0/8"])
    assert loop.refusal("127.0.0.1") is None
    assert loop.refusal("::ffff:127.0.0.1") is None
    assert loop.refusal("10.0.0.1") is not None
    assert loop.refusal("::1") is not None


def test_policy_rejects_bad_cidrs() -> None:
    with pytest.raises(ValueError):
        NetworkPolicy(deny=["not-a-network"])
    with pytest.raises(ValueError):
        NetworkPolicy(allow=["10.0.0.0/33"])


def test_non_ip_socket_address_is_refused() -> None:
    assert NetworkPolicy().refusal("example.com") is not None


def test_socket_factory_raises_before_any_socket() -> None:
    policy = NetworkPolicy(block_private=True)
    info: Any = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))
    with pytest.raises(BlockedAddress) as caught:
        policy.socket_factory(info)
    assert is_blocked_error(caught.value)
    open_ok: Any = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80))
    sock = policy.socket_factory(open_ok)  # only creates, never connects
    sock.close()


def test_settings_with_bad_cidr_is_a_config_error() -> None:
    from fetcher.config import load_settings
    from fetcher.errors import ConfigError

    with pytest.raises(ConfigError):
        load_settings(None, {"network": {"deny_networks": ["10.0.0.0/99"]}})


# --- real connects on loopback ---------------------------------------------------------------


def assert_blocked(result: dict[str, Any], peer: Peer | None = None) -> None:
    assert result["error"] is not None, result
    assert result["error"]["type"] == "blocked", result
    assert result["ok"] is False
    assert result["attempts"] == 1  # never retried
    if peer is not None:
        assert len(peer.seen) == 0


async def test_loopback_refused_with_block_private() -> None:
    async with recording_server() as peer:
        s = settings(network={"block_private": True}, retries=3)
        result = await run_one(s, {"id": "a", "url": peer.url + "/echo"})
        assert_blocked(result, peer)
        assert "127.0.0.1" in result["error"]["message"]


async def test_loopback_allowed_by_default() -> None:
    async with recording_server() as peer:
        result = await run_one(settings(), {"id": "a", "url": peer.url + "/echo"})
        assert result["ok"], result
        assert len(peer.seen) == 1


async def test_allow_networks_reallows_loopback() -> None:
    async with recording_server() as peer:
        s = settings(network={"block_private": True, "allow_networks": ["127.0.0.0/8"]})
        result = await run_one(s, {"id": "a", "url": peer.url + "/echo"})
        assert result["ok"], result


async def test_deny_networks_without_block_private() -> None:
    async with recording_server() as peer:
        s = settings(network={"deny_networks": ["127.0.0.0/24"]})
        assert_blocked(await run_one(s, {"id": "a", "url": peer.url + "/echo"}), peer)


async def test_ipv6_loopback_literal() -> None:
    async with recording_server(host="::1") as peer:
        s = settings(network={"block_private": True})
        assert_blocked(await run_one(s, {"id": "a", "url": peer.url + "/echo"}), peer)
        assert (await run_one(settings(), {"id": "b", "url": peer.url + "/echo"}))["ok"]


async def test_ipv4_mapped_ipv6_literal() -> None:
    async with recording_server() as peer:
        url = f"http://[::ffff:127.0.0.1]:{peer.port}/echo"
        assert_blocked(
            await run_one(settings(network={"block_private": True}), {"id": "a", "url": url}),
            peer,
        )
        # The same URL does reach the server when nothing forbids it: the refusal above is the
        # policy's doing, not an unroutable address.
        assert (await run_one(settings(), {"id": "b", "url": url}))["ok"]
        peer.seen.requests.clear()
        denied = settings(network={"deny_networks": ["127.0.0.1/32"]})
        assert_blocked(await run_one(denied, {"id": "c", "url": url}), peer)


async def test_pinned_name_to_denied_address() -> None:
    async with recording_server() as peer:
        s = settings(
            network={"block_private": True}, resolve={"metadata.example.test": "127.0.0.1"}
        )
        url = f"http://metadata.example.test:{peer.port}/echo"
        assert_blocked(await run_one(s, {"id": "a", "url": url}), peer)
        s2 = settings(network={"deny_networks": ["127.0.0.0/8"]}, resolve={"x.test": "127.0.0.1"})
        assert_blocked(await run_one(s2, {"id": "b", "url": f"http://x.test:{peer.port}/"}), peer)


async def test_localhost_name_with_block_private() -> None:
    async with recording_server() as peer:
        s = settings(network={"block_private": True})
        url = f"http://localhost:{peer.port}/echo"
        assert_blocked(await run_one(s, {"id": "a", "url": url}), peer)


async def test_redirect_hop_to_denied_address_is_blocked() -> None:
    async with recording_server() as allowed, recording_server(host="127.0.0.2") as denied:
        s = settings(network={"block_private": True, "allow_networks": ["127.0.0.1/32"]}, retries=2)
        target = denied.url + "/echo"
        result = await run_one(s, {"id": "a", "url": f"{allowed.url}/redirect?to={target}"})
        assert_blocked(result, denied)
        assert len(allowed.seen) == 1
        # Same via the IPv4-mapped form of the denied address.
        mapped = f"http://[::ffff:127.0.0.2]:{denied.port}/echo"
        result = await run_one(s, {"id": "b", "url": f"{allowed.url}/redirect?to={mapped}"})
        assert_blocked(result, denied)


async def test_redirect_to_pinned_name_of_denied_address() -> None:
    async with recording_server() as allowed, recording_server(host="127.0.0.2") as denied:
        s = settings(
            network={"block_private": True, "allow_networks": ["127.0.0.1/32"]},
            resolve={"inside.test": "127.0.0.2"},
        )
        target = f"http://inside.test:{denied.port}/echo"
        result = await run_one(s, {"id": "a", "url": f"{allowed.url}/redirect?to={target}"})
        assert_blocked(result, denied)


class FlippingResolver(AbstractResolver):
    """Answers an allowed address first, then a denied one: DNS rebinding."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.calls = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


async def test_dns_rebinding_is_checked_at_connect() -> None:
    async with recording_server() as good, recording_server(host="127.0.0.2") as bad:
        s = settings(network={"block_private": True, "allow_networks": ["127.0.0.1/32"]})
        handler = HttpHandler(s)
        flipping = FlippingResolver(["127.0.0.1", "127.0.0.2"])
        handler._resolver = flipping  # type: ignore[assignment]
        async with handler:
            first = await handler.attempt(
                job({"id": "a", "url": f"http://rebind.test:{good.port}/echo"})
            )
            assert first.error is None, first
            # A fresh lookup (cache cleared, new connection) now answers the denied address.
            handler.session.connector.clear_dns_cache()  # type: ignore[union-attr]
            second = await handler.attempt(
                job(
                    {
                        "id": "b",
                        "url": f"http://rebind.test:{bad.port}/echo",
                        "headers": {"Connection": "close"},
                    }
                )
            )
        assert flipping.calls == 2
        assert second.error is not None and second.error.type == "blocked"
        assert len(bad.seen) == 0


async def test_blocked_is_not_retried_and_others_unaffected() -> None:
    async with recording_server() as peer:
        s = settings(network={"block_private": True, "allow_networks": ["127.0.0.1/32"]}, retries=5)
        results = await run_jobs(
            s,
            job({"id": "ok", "url": peer.url + "/echo"}),
            job({"id": "no", "url": f"http://127.0.0.3:{peer.port}/echo"}),
        )
        assert results[0]["ok"]
        assert_blocked(results[1])
