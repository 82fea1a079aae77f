"""Third-party platforms (开放平台第三方平台): event decryption, verify tickets, the component
token, and the authorizers' tokens for thousands of accounts, spread over instances.

Rooms (each depends only on those listed before it, and on the core):

- ``crypto``: WeChat's message signature and AES (no I/O);
- ``config``: the ``kind: component`` account's checks and its one source;
- ``keys``: every Redis key this package writes, named in one place;
- ``tickets``: the verify ticket in Redis (newest wins) and the component token's source;
- ``authorizers``: one authorizer's token, refresh token, state and ticket in Redis (fenced);
- ``schedule``: the sorted set of due authorizers, claimed in bounded batches by any instance;
- ``api``: the component calls to WeChat (api_query_auth, api_authorizer_token, getticket);
- ``worker``: refreshes what this instance claimed (component token from the refresher);
- ``events``: the event URL's checks (signature, replay, decryption) and what each event does;
- ``handlers``: the HTTP endpoints; ``service``: :class:`~server.platform.service.Platforms`,
  built and stopped by ``server.app``.

This ``__init__`` imports nothing, so ``server.accounts`` can use ``server.platform.config``.
"""
