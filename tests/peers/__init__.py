"""Real peers for the tests, each served on 127.0.0.1, port 0, from a thread with its own loop.

- ``base.LoopThread``: the thread and loop, written once.
- ``proxy.ForwardProxy``: an HTTP forward proxy (CONNECT tunnels and absolute-form requests,
  basic auth) that can also refuse the way real proxies do.
- ``origin.Origin``: the fault server of ``tests/app.py``, over http or https.
"""
