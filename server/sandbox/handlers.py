"""The simulator over HTTP: one handler per WeChat endpoint, plus the /sandbox/* control API.

Every call of a WeChat path (known or not) is counted in ``Sandbox.calls`` and recorded in
``Sandbox.requests``; the control API is neither, so reading stats does not change them.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
from typing import Any, Callable

import tornado.log
import tornado.web

from server.sandbox.common import (
    AGENT_TICKET_PATH,
    CALLBACK_IP_PATH,
    CLEAR_QUOTA_PATH,
    CORP_JSAPI_TICKET_PATH,
    CORP_TOKEN_PATH,
    MEDIA_UPLOAD_PATH,
    MESSAGE_SEND_PATH,
    QUOTA_GET_PATH,
    SNS_OAUTH_PATH,
    STABLE_TOKEN_PATH,
    TICKET_PATH,
    TOKEN_PATH,
    ApiError,
    JSONDict,
)
from server.sandbox.control import CREDENTIAL_ARGS
from server.sandbox.core import Sandbox

logger = logging.getLogger(__name__)

# Bytes a request body may have: WeChat takes media up to 10 MB (WeCom files up to 20 MB), so
# this leaves room for multipart framing and lets an oversized file get WeChat's 40006 answer
# instead of a dropped connection. Pass it to the HTTPServer that serves make_app().
MAX_BODY_BYTES = 32 * 1024 * 1024


class BaseHandler(tornado.web.RequestHandler):
    """Counts and records the call, answers in JSON, and turns every error into a JSON body."""

    counted = True  # the control API is not counted, so reading stats does not change them

    def initialize(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.errcode = 0  # what the answer says, for the record
        # Counted here, before Tornado's 405 check, so that calls a client gets wrong show too.
        if self.counted:
            sandbox.calls[self.request.path] += 1

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Only the standard reason phrase goes out: never a traceback or an internal message.
        self.errcode = status_code
        self.finish({"errcode": status_code, "errmsg": self._reason.lower()})

    def on_finish(self) -> None:
        if not self.counted:
            return
        request = self.request
        query = request.query_arguments
        token = query.get("access_token", [b""])[0].decode("utf-8", "replace") or None
        self.sandbox.record(
            method=request.method or "", path=request.path, query_keys=tuple(sorted(query)),
            params={k: v[0].decode("utf-8", "replace") for k, v in query.items()
                    if k not in CREDENTIAL_ARGS},
            body_size=len(request.body), body_sha256=hashlib.sha256(request.body).hexdigest(),
            content_type=request.headers.get("Content-Type", ""), access_token=token,
            status=self.get_status(), errcode=self.errcode)

    def json_body(self) -> JSONDict:
        try:
            body = json.loads(self.request.body)
        except ValueError:
            raise tornado.web.HTTPError(400, reason="body is not JSON") from None
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, reason="body is not a JSON object")
        return body


class NotFoundHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


class ApiHandler(BaseHandler):
    """A WeChat endpoint: suffers queued faults, then answers through ``reply``."""

    issues = False  # whether a success hands out a credential (counted in Sandbox.issued)

    async def prepare(self) -> None:
        path = self.request.path
        fault = self.sandbox.take_fault(path)
        if fault is None:
            return
        logger.info("sandbox %s: injected fault %s", path, fault.kind)
        self.errcode = {"busy": -1, "errcode": fault.errcode,
                        "http_error": fault.status}.get(fault.kind, 0)
        if fault.kind == "hang":
            await asyncio.sleep(fault.delay)  # then answer normally, late
        elif fault.kind == "busy":
            self.finish({"errcode": -1, "errmsg": "system busy"})
        elif fault.kind == "errcode":
            self.finish({"errcode": fault.errcode, "errmsg": fault.errmsg})
        elif fault.kind == "http_error":
            self.set_status(fault.status)
            self.set_header("Content-Type", "text/html")
            reason = http.client.responses.get(fault.status, "Error")
            self.finish(f"<html><body><h1>{fault.status} {reason}</h1></body></html>")
        elif fault.kind == "garbage":
            # Labelled JSON on purpose: a client must not trust the Content-Type.
            self.set_header("Content-Type", "application/json; encoding=utf-8")
            self.finish('{"access_token": "trunc')
        elif fault.kind == "missing_field":
            self.finish({"expires_in": self.sandbox.expires_in})

    def reply(self, produce: Callable[[], JSONDict]) -> None:
        """Write ``produce()``'s body, or the ApiError it raised, and log the errcode."""
        try:
            body = produce()
        except ApiError as error:
            body = error.body()
        errcode = body.get("errcode", 0)
        self.errcode = errcode
        if errcode == 0 and self.issues:
            self.sandbox.issued[self.request.path] += 1
        level = logging.DEBUG if errcode == 0 else logging.INFO
        logger.log(level, "sandbox %s -> errcode %s", self.request.path, errcode)
        self.finish(body)

    def client_ip(self) -> str:
        return self.request.remote_ip or ""

    def arg(self, name: str) -> str | None:
        # WeChat does not strip whitespace; neither do we, so a padded secret fails as there.
        return self.get_query_argument(name, None, strip=False)


class TokenHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /cgi-bin/token?grant_type=client_credential&appid=wx123&secret=S``
        -> ``{"access_token": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.api_token(
            self.arg("grant_type"), self.arg("appid"), self.arg("secret"), self.client_ip()))


class StableTokenHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)
    issues = True

    def post(self) -> None:
        """``POST /cgi-bin/stable_token {"grant_type": "client_credential", "appid": "wx123",
        "secret": "S", "force_refresh": false}`` -> ``{"access_token": "...", "expires_in": 5400}``"""
        self.reply(lambda: self.sandbox.api_stable_token(self.request.body, self.client_ip()))


class TicketHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /cgi-bin/ticket/getticket?access_token=T&type=jsapi``
        -> ``{"errcode": 0, "errmsg": "ok", "ticket": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.api_ticket(self.arg("access_token"), self.arg("type")))


class CallbackIpHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)

    def get(self) -> None:
        """``GET /cgi-bin/getcallbackip?access_token=T`` -> ``{"ip_list": ["101.226.103.0/25"]}``"""
        self.reply(lambda: self.sandbox.business.callback_ip(self.arg("access_token")))


class CorpTokenHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /cgi-bin/gettoken?corpid=ww123&corpsecret=S``
        -> ``{"errcode": 0, "errmsg": "ok", "access_token": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.wecom.gettoken(
            self.arg("corpid"), self.arg("corpsecret"), self.client_ip()))


class QuotaGetHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)

    def post(self) -> None:
        """``POST /cgi-bin/openapi/quota/get?access_token=T {"cgi_path": "/cgi-bin/token"}`` ->
        ``{"errcode": 0, "errmsg": "ok", "quota": {"daily_limit": 2000, "used": 3, "remain": 1997}}``"""
        self.reply(lambda: self.sandbox.api_quota_get(self.arg("access_token"),
                                                      self.request.body))


class ClearQuotaHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)

    def post(self) -> None:
        """``POST /cgi-bin/clear_quota?access_token=T {"appid": "wx123"}``
        -> ``{"errcode": 0, "errmsg": "ok"}``"""
        self.reply(lambda: self.sandbox.api_clear_quota(self.arg("access_token"),
                                                        self.request.body))


class CorpJsapiTicketHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /cgi-bin/get_jsapi_ticket?access_token=T`` (WeCom, corp ticket)
        -> ``{"errcode": 0, "errmsg": "ok", "ticket": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.wecom.corp_jsapi_ticket(self.arg("access_token")))


class AgentTicketHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /cgi-bin/ticket/get?access_token=T&type=agent_config`` (WeCom, app ticket)
        -> ``{"errcode": 0, "errmsg": "ok", "ticket": "...", "expires_in": 7200}``"""
        self.reply(lambda: self.sandbox.wecom.agent_ticket(self.arg("access_token"),
                                                           self.arg("type")))


class MessageSendHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)

    def post(self) -> None:
        """``POST /cgi-bin/message/custom/send?access_token=T {"touser": "o1", "msgtype": "text",
        "text": {"content": "hi"}}`` -> ``{"errcode": 0, "errmsg": "ok"}``"""
        self.reply(lambda: self.sandbox.business.message_send(self.arg("access_token"),
                                                              self.request.body))


class MediaUploadHandler(ApiHandler):
    SUPPORTED_METHODS = ("POST",)

    def post(self) -> None:
        """``POST /cgi-bin/media/upload?access_token=T&type=image`` multipart, file part "media"
        -> ``{"type": "image", "media_id": "...", "created_at": 1710043200, "size": 5242880}``"""
        # Tornado parsed the multipart body already (a malformed one leaves no files).
        parts = self.request.files.get("media")
        media = parts[0].body if parts else None
        self.reply(lambda: self.sandbox.business.media_upload(self.arg("access_token"),
                                                              self.arg("type"), media))


class SnsOAuthHandler(ApiHandler):
    SUPPORTED_METHODS = ("GET",)
    issues = True

    def get(self) -> None:
        """``GET /sns/oauth2/access_token?appid=wx123&secret=S&code=C&grant_type=authorization_code``
        -> ``{"access_token": "...", "expires_in": 7200, "refresh_token": "...",
        "openid": "o...", "scope": "snsapi_base"}``"""
        self.reply(lambda: self.sandbox.business.sns_oauth(
            self.arg("appid"), self.arg("secret"), self.arg("code"), self.arg("grant_type")))


class StatsHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET",)
    counted = False

    def get(self) -> None:
        """``GET /sandbox/stats`` -> ``{"calls": {"/cgi-bin/token": 3}, "issued": {...}}``"""
        self.finish(self.sandbox.stats())


class FaultsHandler(BaseHandler):
    SUPPORTED_METHODS = ("POST", "DELETE")
    counted = False

    def post(self) -> None:
        """``POST /sandbox/faults {"path": "/cgi-bin/token", "kind": "busy", "times": 3}``
        -> ``{"errcode": 0, "errmsg": "ok"}``; a bad fault -> HTTP 400 saying why."""
        body = self.json_body()
        try:
            path, kind = body.pop("path"), body.pop("kind")
            self.sandbox.inject(path, kind, **body)
        except (KeyError, TypeError, ValueError) as error:
            raise tornado.web.HTTPError(400, reason=f"bad fault: {error}"[:200]) from None
        self.finish({"errcode": 0, "errmsg": "ok"})

    def delete(self) -> None:
        """``DELETE /sandbox/faults`` -> ``{"errcode": 0, "errmsg": "ok"}``"""
        self.sandbox.clear_faults()
        self.finish({"errcode": 0, "errmsg": "ok"})


class ResetHandler(BaseHandler):
    SUPPORTED_METHODS = ("POST",)
    counted = False

    def post(self) -> None:
        """``POST /sandbox/reset`` -> ``{"errcode": 0, "errmsg": "ok"}``"""
        self.sandbox.reset()
        self.finish({"errcode": 0, "errmsg": "ok"})


class TokenStatusHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET",)
    counted = False

    def get(self) -> None:
        """``GET /sandbox/token_status?token=T`` -> ``{"status": 0}`` (or 40001, 42001)"""
        token = self.get_query_argument("token", "", strip=False)
        self.finish({"status": self.sandbox.token_status(token)})


class RequestsHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET",)
    counted = False

    def get(self) -> None:
        """``GET /sandbox/requests?path=/cgi-bin/media/upload`` (path optional) ->
        ``{"requests": [{"method": "POST", "path": "/cgi-bin/media/upload", "query_keys":
        ["access_token", "type"], "params": {"type": "image"}, "body_size": 5243100, ...,
        "access_token_prefix": "AbC12-xy", "token_owner": "wx123", "token_status": 0}]}``"""
        path = self.get_query_argument("path", None)
        self.finish({"requests": [r.as_json() for r in self.sandbox.requests_to(path)]})


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log without the query string, which carries the appsecret."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    tornado.log.access_log.log(level, "%d %s %s (%s) %.1fms", status, handler.request.method,
                               handler.request.path, handler.request.remote_ip,
                               1000.0 * handler.request.request_time())


def make_app(sandbox: Sandbox) -> tornado.web.Application:
    """The simulator's Tornado application, serving ``sandbox``."""
    routes: list[tuple[str, type[BaseHandler]]] = [
        (TOKEN_PATH, TokenHandler),
        (STABLE_TOKEN_PATH, StableTokenHandler),
        (TICKET_PATH, TicketHandler),
        (CALLBACK_IP_PATH, CallbackIpHandler),
        (CORP_TOKEN_PATH, CorpTokenHandler),
        (QUOTA_GET_PATH, QuotaGetHandler),
        (CLEAR_QUOTA_PATH, ClearQuotaHandler),
        (CORP_JSAPI_TICKET_PATH, CorpJsapiTicketHandler),
        (AGENT_TICKET_PATH, AgentTicketHandler),
        (MESSAGE_SEND_PATH, MessageSendHandler),
        (MEDIA_UPLOAD_PATH, MediaUploadHandler),
        (SNS_OAUTH_PATH, SnsOAuthHandler),
        ("/sandbox/stats", StatsHandler),
        ("/sandbox/faults", FaultsHandler),
        ("/sandbox/reset", ResetHandler),
        ("/sandbox/token_status", TokenStatusHandler),
        ("/sandbox/requests", RequestsHandler),
    ]
    # Third-party platforms: their own room (imported here: it builds on this module's handlers).
    from server.sandbox.component_handlers import component_routes

    routes += component_routes()
    args = {"sandbox": sandbox}
    return tornado.web.Application(
        [(path, handler, args) for path, handler in routes],
        default_handler_class=NotFoundHandler, default_handler_args=args,
        log_function=_log_request)
