"""wechat-token-server: the central control server for WeChat credentials."""

#: The one place the version is written: ``--version``, the startup log, ``/status`` and the
#: ``wechat_token_build_info`` metric all read it from here.
__version__ = "0.10.0"
