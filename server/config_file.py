"""Reading the config file: YAML, ``${ENV}`` expansion, conversion against the schema in
:mod:`server.config`, accounts expanded into sources (:mod:`server.accounts`), then the
rules that span keys (:func:`server.config.validate`).

Any problem raises :class:`~server.config.ConfigError` whose message is one line:
``the.key.path: what is wrong; what to do``.  YAML only, loaded with ``yaml.safe_load``: the
config never executes code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import stat
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Union

import yaml

from server.accounts import expand
from server.config import AccountConfig, Config, ConfigError, RedisConfig, RefreshConfig, ServerConfig, SourceConfig, validate

logger = logging.getLogger(__name__)

class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing aliases (``*name``): no config needs them, and
    an alias graph (a "billion laughs") or a self-reference would make the expansion below
    walk without end."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in the config; write the value out", event.start_mark)
        return super().compose_node(parent, index)


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# --- conversion against the dataclasses ---------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a mapping")
        return _build(tp, value, path)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: must be a list, e.g. [a, b]")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a mapping, e.g. {{key: value}}")
        _, item = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{path}: key {k!r} must be a string")
            out[k] = _convert(item, v, f"{path}.{k}")
        return out
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # .nan passes every "<= 0" check, .inf overflows every conversion
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    shown = "a string" if isinstance(value, str) else repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    raise ConfigError(f"{path}: must be {_type_name(tp)}, got {shown}")


def _build(cls: type, raw: Mapping[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields or key == "name" and cls in _NAMED:
            known = ", ".join(n for n in fields if not (n == "name" and cls in _NAMED))
            raise ConfigError(f"{_join(path, str(key))}: unknown key (known keys: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: missing; {f.metadata.get('help', '')}")
    return cls(**kwargs)


#: sections whose ``name`` comes from their mapping key, never from the file
_NAMED = (SourceConfig, AccountConfig)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- the mistakes people make in YAML -----------------------------------------------------

#: PyYAML's problem texts that an indentation slip produces, with what to say instead.  Its own
#: words stay in parentheses: they are what a search engine knows.
_YAML_HINTS = (
    ("found character '\\t'", "YAML does not allow tabs for indentation; indent with spaces"),
    ("mapping values are not allowed here",
     "a key indented further than the key above it, or a value with ': ' in it; line the key up with the one above, or quote the value"),
    ("expected <block end>",
     "this line's indentation matches no key above it; indent it exactly as far as its siblings (spaces)"),
)


def _yaml_hint(problem: str) -> str:
    """`` (PyYAML's problem)`` with, for the usual slips, what happened and the fix."""
    for text, hint in _YAML_HINTS:
        if text in problem:
            return f": {hint} ({problem})"
    return f" ({problem})"


def _check_indentation_slips(raw: Mapping[str, Any]) -> None:
    """A key written one level too far left becomes a sibling of its parent: ``args:`` under
    ``sources:`` instead of under ``access_token:`` is a *source* named args, and the
    conversion would then report ``sources.args.type: unknown key``.  Name the slip instead.
    Nobody names a source ``url`` or an account ``appid`` on purpose."""
    for section, cls, what in (("sources", SourceConfig, "a source"), ("accounts", AccountConfig, "an account")):
        entries = raw.get(section)
        if not isinstance(entries, Mapping):
            continue
        keys = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        for key in entries:
            if key in keys:
                raise ConfigError(
                    f"{section}.{key}: {key} is {what}'s key, not {what}'s name: it is indented too little; "
                    f"indent {key}: as far as the other keys of the {what.split()[1]} above it"
                )
    sections = {f.name for f in dataclasses.fields(Config)}
    for key in raw:
        if key in sections:
            continue
        for name, section_cls in (("server", ServerConfig), ("redis", RedisConfig), ("refresh", RefreshConfig)):
            if key in {f.name for f in dataclasses.fields(section_cls)}:
                raise ConfigError(f"{key}: unknown top-level key; if it is {name}.{key}, indent it under {name}:")


# --- ${ENV} expansion ----------------------------------------------------------------------

_MARK_RE = re.compile(r"__tsenv(\d+)__")


def _mark_env(text: str) -> tuple[str, list[tuple[str, str | None]]]:
    """Swap every ``${NAME}`` / ``${NAME:-default}`` for an inert ``__tsenvN__`` marker.

    Done before parsing so ``{secret: ${WECHAT_APPSECRET}}`` is valid YAML in a flow
    mapping; the values go in after parsing (:func:`_expand`), so a secret containing
    YAML syntax can never change the structure of the file.
    """
    refs: list[tuple[str, str | None]] = []

    def mark(m: re.Match[str]) -> str:
        refs.append((m.group(1), m.group(2)))
        return f"__tsenv{len(refs) - 1}__"

    return _ENV_RE.sub(mark, text), refs


def _expand(value: Any, refs: list[tuple[str, str | None]], env: Mapping[str, str], path: str = "") -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = refs[int(m.group(1))]
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set; export it or write ${{{name}:-default}}")

        return _MARK_RE.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: _expand(v, refs, env, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, refs, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def parse_config(text: str, env: Mapping[str, str], source: str = "config") -> Config:
    """Build a validated Config from YAML text, expanding ``${ENV}`` from ``env``."""
    marked, refs = _mark_env(text)
    try:
        raw = yaml.load(marked, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever the text holds
        raise ConfigError(f"{source}:{where} is not valid YAML{_yaml_hint(problem)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    if raw is None:
        raw = {}
    return _from_raw(raw, source, lambda r: _expand(r, refs, env))


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Build a validated Config from a mapping shaped like the YAML file (an application
    embedding the service, see server.embed).  Values are taken as they are: no ``${ENV}``."""
    return _from_raw(raw, source, lambda r: r)


def _from_raw(raw: Any, source: str, expand_env: Callable[[Any], Any]) -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the config must be a YAML mapping of sections (server, redis, refresh, sources)")
    _check_indentation_slips(raw)
    try:
        cfg = _build(Config, expand_env(raw), "")
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    # Accounts are a shorthand: they become ordinary sources (and client scopes) first.
    return validate(expand(typing.cast(Config, cfg)))


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the YAML file at ``path``.

    Raises ConfigError (one line) for a missing file, bad YAML or a bad key.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the config file ({why}); pass --config PATH") from None
    cfg = parse_config(text, os.environ if env is None else env, path)
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        logger.warning("config %s is readable by other users and names secrets; run: chmod 600 %s", path, path)
    return cfg
