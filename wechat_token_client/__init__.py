"""wechat-token-client: the values of a wechat-token-server for business servers in Python.

    from wechat_token_client import TokenClient, TokenServerError

    tokens = TokenClient("http://127.0.0.1:12123", secret=os.environ["TOKEN_SERVER_SECRET"])
    token = tokens.get("access_token")                 # the server's default account
    ticket = tokens.get("ticket", account="shop")
    # WeChat answered 40001 / 42001 for `token`: ask for its replacement, retry once.
    token = tokens.refresh_after_rejection(token)

Standard library only (urllib); Redis mode (``TokenClient(redis="redis://...")``) needs the
``redis`` extra; ``wechat_token_client.wechatpy`` needs wechatpy.  See ``TokenClient``.
"""

from wechat_token_client.client import Token, TokenClient
from wechat_token_client.errors import TokenServerError

__version__ = "0.1.0"
__all__ = ["Token", "TokenClient", "TokenServerError", "__version__"]
