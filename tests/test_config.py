"""Config: the schema, ${ENV} expansion, and the one-line refusals of --check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from server.config import ConfigError
from server.config_file import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD_SECRET = "a-long-random-request-secret-42"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "token_server.py"), *args],
        capture_output=True, text=True, timeout=30, env=full_env, cwd=ROOT,
    )


def config_text(**overrides: object) -> str:
    raw: dict[str, object] = {
        "server": {"secret": GOOD_SECRET},
        "sources": {
            "access_token": {"url": "https://api.weixin.qq.com/cgi-bin/token", "args": {"appid": "wx1", "secret": "s"}},
            "ticket": {"url": "https://api.weixin.qq.com/cgi-bin/ticket/getticket", "args": {"access_token": "<<access_token>>"}},
        },
    }
    raw.update(overrides)
    return yaml.safe_dump(raw)


#: An appid shaped like WeChat's (wx and 16 hex digits), standing for the user's own.
REAL_LOOKING_APPID = "wx0a1b2c3d4e5f6a7b"


def edited_example(tmp_path, text: str | None = None) -> str:
    """config.example.yaml after the README's edit: the example appids replaced by the user's."""
    text = text if text is not None else open(os.path.join(ROOT, "config.example.yaml"), encoding="utf-8").read()
    for example in ("wx123", "wx456", "wx789", "ww789"):
        text = text.replace(f": {example}", f": {example[:2]}{example[2:]}0a1b2c3d4e5f6")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_example_config_passes_check_once_its_appid_is_edited(tmp_path) -> None:
    result = run_cli("--check", "-c", edited_example(tmp_path), env={"TOKEN_SERVER_SECRET": GOOD_SECRET, "WECHAT_APPSECRET": "x" * 32})
    assert result.returncode == 0, result.stderr
    assert "access_token" in result.stdout and "ticket" in result.stdout


def test_the_readme_placeholders_are_refused_by_check(tmp_path) -> None:
    """The README's steps taken literally: the example's appid wx123, WECHAT_APPSECRET=..."""
    env = {"TOKEN_SERVER_SECRET": GOOD_SECRET, "WECHAT_APPSECRET": "x" * 32}
    unedited = run_cli("--check", "-c", "config.example.yaml", env=env)
    assert unedited.returncode == 2
    assert unedited.stderr.strip() == (
        "config error: sources.access_token.json.appid: wx123 is the documentation's example; put your account's own id "
        "(an appid is wx and 16 characters, at mp.weixin.qq.com > Settings and Development > Basic Configuration; "
        "a corpid is at work.weixin.qq.com > My Company)"
    )
    dots = run_cli("--check", "-c", edited_example(tmp_path), env={**env, "WECHAT_APPSECRET": "..."})
    assert dots.returncode == 2
    assert dots.stderr.strip().splitlines() == [
        "config error: sources.access_token.json.secret: a placeholder, not the secret WeChat issued; export the real AppSecret "
        "(e.g. WECHAT_APPSECRET) from mp.weixin.qq.com > Settings and Development > Basic Configuration"
    ]


@pytest.mark.parametrize("api", ["https://api.weixin.qq.com", "https://sh.api.weixin.qq.com", "https://qyapi.weixin.qq.com"])
def test_example_appids_are_refused_only_against_wechats_own_host(api) -> None:
    def text(base: str) -> str:
        return f"server: {{secret: {GOOD_SECRET}}}\naccounts:\n  main: {{appid: wx123, secret: {'s' * 32}, api_base: '{base}'}}\n"

    with pytest.raises(ConfigError, match=r"^accounts\.main\.appid: wx123 is the documentation's example; "):
        parse_config(text(api), {})
    # The tests' and the demo's sandbox has an app wx123: pointing there is not a mistake.
    assert parse_config(text("http://127.0.0.1:9"), {}).sources["access_token"].json["appid"] == "wx123"


def test_issue_shape_with_flow_mappings_and_env(tmp_path) -> None:
    # The exact shape from the docs: ${VAR} inside a YAML flow mapping.
    path = tmp_path / "config.yaml"
    path.write_text(
        "server:\n  secret: ${TOKEN_SERVER_SECRET}\n"
        "sources:\n"
        "  access_token:\n    url: https://api.weixin.qq.com/cgi-bin/token\n    method: GET\n"
        "    args: {grant_type: client_credential, appid: wx0a1b2c3d4e5f6a7b, secret: ${WECHAT_APPSECRET}}\n"
        "  ticket:\n    url: https://api.weixin.qq.com/cgi-bin/ticket/getticket\n    method: GET\n"
        "    args: {type: jsapi, access_token: <<access_token>>}\n"
    )
    cfg = parse_config(path.read_text(), {"TOKEN_SERVER_SECRET": GOOD_SECRET, "WECHAT_APPSECRET": "x}: {evil: 1"})
    # The secret's YAML syntax stays data: it does not add keys.
    assert cfg.sources["access_token"].args == {"grant_type": "client_credential", "appid": "wx0a1b2c3d4e5f6a7b", "secret": "x}: {evil: 1"}
    assert cfg.sources["ticket"].args["access_token"] == "<<access_token>>"


def test_env_default_syntax() -> None:
    cfg = parse_config(config_text(redis={"prefix": "${PREFIX:-wx:}"}), {})
    assert cfg.redis.prefix == "wx:"


def test_sources_are_put_in_dependency_order() -> None:
    text = yaml.safe_dump({
        "server": {"secret": GOOD_SECRET},
        "sources": {
            "ticket": {"url": "http://x/t", "args": {"access_token": "<<access_token>>"}},
            "card": {"url": "http://x/c", "json": {"t": "<<ticket>>", "a": "<<access_token>>"}, "method": "POST"},
            "access_token": {"url": "http://x/a"},
        },
    })
    assert list(parse_config(text, {}).sources) == ["access_token", "ticket", "card"]


def test_defaults() -> None:
    cfg = parse_config(config_text(), {})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 12123)
    assert (cfg.refresh.interval, cfg.refresh.ahead, cfg.refresh.max_ttl, cfg.refresh.timeout) == (60, 600, 7000, 10)
    assert cfg.redis.url is None and cfg.redis.prefix == ""


BAD = [
    # (yaml text, the start of the one-line message)
    (config_text(server={"secret": "change-me"}), "server.secret: is a placeholder"),
    (config_text(server={"secret": ""}), "server.secret: empty"),
    (config_text(server={"secret": "short-secret"}), "server.secret: shorter than 16"),
    (config_text(server={"secret": GOOD_SECRET, "prot": 1}), "server.prot: unknown key"),
    (config_text(server={"secret": GOOD_SECRET, "port": "x"}), "server.port: must be an integer"),
    (config_text(refresh={"interval": 60, "ahead": 30}), "refresh.ahead: 30 must be greater than refresh.interval"),
    (config_text(refresh={"ahead": 8000}), "refresh.ahead: 8000 must be less than refresh.max_ttl"),
    (config_text(refresh={"timeout": 0}), "refresh.timeout: must be a positive"),
    (config_text(refresh={"backoff_max": 0}), "refresh.backoff_max: must be a positive"),
    (config_text(refresh={"force_min_interval": -1}), "refresh.force_min_interval: must be 0 or more"),
    (config_text(redis={"socket_timeout": 0}), "redis.socket_timeout: must be a positive"),
    (config_text(sources={}), "sources: declare at least one account or source"),
    (config_text(sources={"access_token": {"args": {}}}), "sources.access_token.url: missing"),
    (config_text(sources={"a": {"url": "ftp://x"}}), "sources.a.url: must be an http"),
    (config_text(sources={"a": {"url": "http://x", "method": "PUT"}}), "sources.a.method: must be GET or POST"),
    (config_text(sources={"a": {"url": "http://x", "colour": 1}}), "sources.a.colour: unknown key"),
    (config_text(sources={"a": {"url": "http://x", "args": {"t": "<<acess_token>>"}}}), "sources.a.args: <<acess_token>> names no source"),
    (
        config_text(sources={"a": {"url": "http://x", "args": {"t": "<<b>>"}}, "b": {"url": "http://x", "args": {"t": "<<a>>"}}}),
        "sources.a: dependency cycle a -> b -> a",
    ),
    (config_text(sources={"a b": {"url": "http://x"}}), "sources.a b: a name is letters"),
    (config_text(redis={"url": "http://localhost"}), "redis.url: must start with redis://"),
    (config_text(redis={"url": "redis://x", "sentinel": {"hosts": ["h:1"]}}), "redis.sentinel: give either"),
    (config_text(server={"secret": "${UNSET_VAR_FOR_TEST}"}), "server.secret: environment variable UNSET_VAR_FOR_TEST is not set"),
    ("server: [", "test: line"),
    ("- a\n- b\n", "test: the config must be a YAML mapping"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0] + ":" + m.split(":")[1][:20] for _, m in BAD])
def test_refusals_are_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, {}, source="test")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_check_exits_2_with_one_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(config_text(sources={"ticket": {"url": "http://x", "args": {"access_token": "<<acess_token>>"}}}))
    result = run_cli("--check", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sources.ticket.args: <<acess_token>> names no source" in lines[0]
    assert "Traceback" not in result.stderr


def test_check_on_a_missing_file_exits_2(tmp_path) -> None:
    result = run_cli("--check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read the config file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_never_echoes_a_secret(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config_text(server={"secret": "${S}", "port": "nope"}))
    result = run_cli("--check", "-c", str(path), env={"S": GOOD_SECRET})
    assert result.returncode == 2 and GOOD_SECRET not in result.stderr + result.stdout


def test_world_readable_config_warns(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config_text())
    os.chmod(path, 0o644)
    warned = run_cli("--check", "-c", str(path))
    os.chmod(path, 0o600)
    quiet = run_cli("--check", "-c", str(path))
    assert warned.returncode == quiet.returncode == 0
    assert "chmod 600" in warned.stderr and "chmod 600" not in quiet.stderr


def test_unknown_key_error_lists_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"known keys: interval, ahead, max_ttl, timeout"):
        parse_config(config_text(refresh={"intervall": 5}), {})


def test_config_error_is_no_config_for_a_non_mapping_section() -> None:
    with pytest.raises(ConfigError, match=r"^refresh: must be a mapping"):
        parse_config(config_text(refresh=[1, 2]), {})


def test_readme_documents_every_config_key() -> None:
    import dataclasses

    from server.config import (
        AccountConfig,
        Config,
        JssdkConfig,
        LoggingConfig,
        RedisConfig,
        RefreshConfig,
        ServerConfig,
        SourceConfig,
    )

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    sections = (("server", ServerConfig), ("redis", RedisConfig), ("refresh", RefreshConfig), ("logging", LoggingConfig))
    keys = [f"`{section}.{f.name}`" for section, cls in sections for f in dataclasses.fields(cls)]
    keys += [f"`sources.NAME.{f.name}`" for f in dataclasses.fields(SourceConfig) if f.name != "name"]
    keys += [f"`accounts.NAME.{f.name}`" for f in dataclasses.fields(AccountConfig) if f.name not in ("name", "jssdk")]
    keys += [f"`accounts.NAME.jssdk.{f.name}`" for f in dataclasses.fields(JssdkConfig)]
    keys += [f"`{f.name}`" for f in dataclasses.fields(Config) if f.name not in ("server", "redis", "refresh", "logging", "sources", "accounts")]
    missing = [k for k in keys if k not in readme]
    assert not missing, f"README's configuration table lacks {missing}"


def test_the_examples_commented_accounts_pass_check(tmp_path) -> None:
    """The accounts block of config.example.yaml, uncommented, is a valid config."""
    lines = open(os.path.join(ROOT, "config.example.yaml"), encoding="utf-8").read().splitlines()
    start = lines.index("# accounts:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    text = "server: {secret: ${TOKEN_SERVER_SECRET}}\n" + "\n".join(block) + "\n"
    path = edited_example(tmp_path, text)
    env = {"TOKEN_SERVER_SECRET": GOOD_SECRET, **{k: "x" * 32 for k in ("MAIN_APPSECRET", "SHOP_APPSECRET", "MINI_APPSECRET", "CORP_SECRET")}}
    result = run_cli("--check", "-c", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK: 4 accounts (main, shop, mini, corp), 9 sources (access_token, ")


@pytest.mark.parametrize("text, expected", [
    ("refresh: {ahead: .nan}", "refresh.ahead: must be a finite number, got nan"),
    ("refresh: {timeout: .inf}", "refresh.timeout: must be a finite number, got inf"),
    ("server: {shutdown_timeout: .nan}", "server.shutdown_timeout: must be a finite number, got nan"),
    ("x: &a [*a]", "config: line 4 is not valid YAML (aliases (*name) are not allowed in the config; write the value out)"),
    ("x: " + "[" * 5000 + "]" * 5000, "config: nested too deeply to be a config"),
    ("redis: {sentinel: {hosts: ['h:99999999']}}", "redis.sentinel.hosts[0]: 'h:99999999' must be \"host:port\" (port 1-65535)"),
])
def test_hostile_values_and_yaml_are_refused_in_one_line(text, expected) -> None:
    base = "server: {secret: test-request-secret-0123456789abcdef}\nsources: {t: {url: 'https://api.weixin.qq.com/cgi-bin/token'}}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(base + "\n" + text + "\n", env={}, source="config")
    assert str(err.value) == expected


@pytest.mark.timeout(20)  # walking the alias graph would take far longer
def test_a_billion_laughs_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    with pytest.raises(ConfigError, match="aliases"):
        parse_config("\n".join(lines) + "\n", env={}, source="config")


# --- the YAML mistakes a new user makes: what happened and the fix, one line ----------------

SLIP_BASE = "server: {secret: test-request-secret-0123456789abcdef}\n"


@pytest.mark.parametrize("text, expected", [
    (  # args: two spaces short: it became a source named args
        "sources:\n  access_token:\n    url: http://x/a\n  args: {type: jsapi}\n",
        "sources.args: args is a source's key, not a source's name: it is indented too little; "
        "indent args: as far as the other keys of the source above it",
    ),
    (
        "accounts:\n  main:\n    appid: wx0a1b2c3d4e5f6a7b\n  secret: ${S}\n",
        "accounts.secret: secret is an account's key, not an account's name: it is indented too little; "
        "indent secret: as far as the other keys of the account above it",
    ),
    (
        "port: 8080\nsources: {t: {url: 'http://x/a'}}\n",
        "port: unknown top-level key; if it is server.port, indent it under server:",
    ),
    (  # method: two spaces too far right
        "sources:\n  t:\n    url: http://x/a\n      method: GET\n",
        "config.yaml: line 5 is not valid YAML: a key indented further than the key above it, or a value with ': ' in it; "
        "line the key up with the one above, or quote the value (mapping values are not allowed here)",
    ),
    (  # url: one space too far right of nothing
        "sources:\n  t:\n    url: http://x/a\n   method: GET\n",
        "config.yaml: line 5 is not valid YAML: this line's indentation matches no key above it; indent it exactly as far "
        "as its siblings (spaces) (expected <block end>, but found '<block mapping start>')",
    ),
    (
        "sources:\n  t:\n\turl: http://x/a\n",
        "config.yaml: line 4 is not valid YAML: YAML does not allow tabs for indentation; indent with spaces "
        "(found character '\\t' that cannot start any token)",
    ),
])
def test_indentation_slips_say_what_happened_and_the_fix(text, expected) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(SLIP_BASE + text, env={"S": "s" * 32}, source="config.yaml")
    assert str(err.value) == expected


def test_a_tab_through_check_is_one_line(tmp_path) -> None:
    path = tmp_path / "tab.yaml"
    path.write_text(SLIP_BASE + "sources:\n  t:\n\turl: http://x/a\n")
    path.chmod(0o600)
    result = run_cli("--check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config error: {path}: line 4 is not valid YAML: YAML does not allow tabs for indentation; indent with spaces "
        "(found character '\\t' that cannot start any token)"
    ]


@pytest.mark.parametrize("text, expected", [
    ("logging: {format: xml}", "logging.format: 'xml'; use text or json"),
    ("logging: {file: ''}", "logging.file: empty; give a path such as /var/log/wechat-token-server/server.log, or leave it out for stderr"),
    ("logging: {level: DEBUG}", "logging.level: unknown key (known keys: format, file)"),
])
def test_logging_section_refusals(text, expected) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(SLIP_BASE + "sources: {t: {url: 'http://x/a'}}\n" + text + "\n", env={})
    assert str(err.value) == expected
