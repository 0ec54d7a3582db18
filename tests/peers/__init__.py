"""Real peers for the tests, each served on 127.0.0.1, port 0, from a thread with its own loop.

- ``base.LoopThread``: the thread and loop, written once.
- ``proxy.ForwardProxy``: an HTTP forward proxy (CONNECT tunnels and absolute-form requests,
  basic auth) that can also refuse the way real proxies do.
- ``socks.Socks5Proxy``: a SOCKS5 server (RFC 1928 CONNECT, RFC 1929 login), loopback only.
- ``origin.Origin``: the fault server of ``tests/app.py``, over http or https.
"""
