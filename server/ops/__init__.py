"""The operator's view: readiness (``/readyz``) and the daily quota accounting.

- ``readiness``: may this instance take traffic (Redis answers, every source has a value);
- ``quota``: upstream calls per source per China day, counted in Redis across instances.

These sit above the core (server.refresher, server.fetcher, server.store): they read its
state and are handed to it, never imported by it.
"""
