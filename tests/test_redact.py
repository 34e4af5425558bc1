"""The filter between Envoy's output and its log file (pure; milliseconds)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from extproc.config import parse_config
from extproc.redact import Redactor

KEY = "0123456789abcdef0123456789abcdef"


def test_known_secrets_are_masked_anywhere() -> None:
    redactor = Redactor([KEY, "sk-master-key-1"])
    line = f'dynamic_metadata {{ fields {{ key: "key_0" value {{ string_value: "{KEY}" }} }} }} sk-master-key-1\n'
    assert redactor.line(line.encode()) == (
        b'dynamic_metadata { fields { key: "key_0" value { string_value: "[redacted]" } } } [redacted]\n'
    )


def test_credential_headers_are_masked_whatever_their_value() -> None:
    redactor = Redactor()
    assert redactor.line(b"'authorization', 'Bearer guess-1'\n") == b"'authorization', '[redacted]'\n"
    assert redactor.line(b"'API-Key', 'abc'\n") == b"'API-Key', '[redacted]'\n"
    assert redactor.line(b"'content-type', 'application/json'\n") == b"'content-type', 'application/json'\n"
    codec = b"[trace][http] completed header: key=Authorization value=Bearer guess-2\n"
    assert redactor.line(codec) == b"[trace][http] completed header: key=Authorization value=[redacted]\n"
    proto = b'headers { key: "api-key" raw_value: "abc\\"def" }'
    assert redactor.line(proto) == b'headers { key: "api-key" raw_value: "[redacted]" }'
    raw = b"POST /x HTTP/1.1\\r\\nhost: a\\r\\napi-key: abc\\r\\ncookie: s=1\\r\\n"
    assert redactor.line(raw) == b"POST /x HTTP/1.1\\r\\nhost: a\\r\\napi-key: [redacted]\\r\\ncookie: [redacted]\\r\\n"


def test_short_values_are_left_to_the_header_rules() -> None:
    # masking every "ka" would mangle the log; a short key is still caught where it sits in a header
    redactor = Redactor(["ka"])
    assert redactor.line(b"[info][main] starting\n") == b"[info][main] starting\n"


def test_config_secrets_cover_keys_master_key_and_redis_password() -> None:
    config = parse_config(
        f"""
model_list:
  - model_name: m
    litellm_params: {{model: azure/d, api_base: "https://r.openai.azure.com", api_key: {KEY}}}
router_settings: {{redis_host: 127.0.0.1, redis_port: 6379, redis_password: redis-password-9}}
general_settings: {{master_key: sk-master-key-1}}
""",
        environ={},
    )
    assert config.secrets() == {KEY, "sk-master-key-1", "redis-password-9"}


def test_pump_copies_every_line_redacted() -> None:
    source = io.BytesIO(f"one {KEY}\ntwo\nthree without newline".encode())
    sink = io.BytesIO()
    Redactor([KEY]).pump(source, sink).join(5)
    assert sink.getvalue() == b"one [redacted]\ntwo\nthree without newline"


def test_cli_redacts_a_pipe(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model_list: [{model_name: m, litellm_params: "
        f'{{model: azure/d, api_base: "https://r.openai.azure.com", api_key: {KEY}}}}}]'
    )
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "redact", "--config", str(config)],
        input=f"[debug] key {KEY}\n'authorization', 'Bearer x'\n".encode(), capture_output=True, timeout=30,
        check=True,
    )
    assert result.stdout == b"[debug] key [redacted]\n'authorization', '[redacted]'\n"
