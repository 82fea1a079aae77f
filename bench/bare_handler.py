#!/usr/bin/env python3
"""The floor: a bare Tornado handler returning a token's JSON, encoded per request.

    python bench/bare_handler.py PORT VALUE EXPIRES_IN
"""

from __future__ import annotations

import asyncio
import sys

import tornado.web


class TokenHandler(tornado.web.RequestHandler):
    def initialize(self, value: str, expires_in: int) -> None:
        self.value = value
        self.expires_in = expires_in

    def get(self) -> None:
        self.finish({"access_token": self.value, "expires_in": self.expires_in})


async def main(port: int, value: str, expires_in: int) -> None:
    app = tornado.web.Application([(r"/", TokenHandler, {"value": value, "expires_in": expires_in})], log_function=lambda handler: None)
    app.listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
