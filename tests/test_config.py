"""Config loading: LiteLLM files unchanged, env references, unknown keys, errors naming the YAML path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from extproc.config import DEFAULT_AZURE_API_VERSION, ConfigError, load_config, parse_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SEED_ENV = {
    "AZURE_MODEL_A": "azure/gpt-35-eastus",
    "AZURE_API_BASE_A": "https://eastus-res.openai.azure.com/",
    "AZURE_API_BASE_B": "https://my-endpoint-canada-berri992.openai.azure.com/",
    "AZURE_API_KEY_A": "key-a",
    "AZURE_API_KEY_B": "key-b",
    "REDIS_HOST": "redis.internal",
    "REDIS_PASSWORD": "s3cret",
    "REDIS_PORT": "1992",
}

MINIMAL = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: azure/dep-a, api_base: "https://a.openai.azure.com", api_key: ka}
"""


def test_seed_multiple_instances_example_loads() -> None:
    config = load_config(CONFIG_DIR / "seed-multiple-instances.yaml", environ=SEED_ENV)
    assert [d.deployment for d in config.groups["gpt-3.5-turbo"]] == ["gpt-35-eastus", "gpt-turbo-small-ca"]
    assert [d.rpm for d in config.deployments] == [6, 6]
    assert config.redis_url == "redis://:s3cret@redis.internal:1992/0"
    assert config.routing_strategy == "simple-shuffle"


def test_seed_router_settings_example_loads() -> None:
    config = load_config(CONFIG_DIR / "seed-router-settings.yaml", environ=SEED_ENV)
    assert config.routing_strategy == "least-busy"
    assert config.num_retries == 2
    assert config.timeout == 30
    assert config.resolve_group("gpt-4") == "gpt-3.5-turbo"
    second = config.deployments[1]
    assert (second.host, second.port, second.tls) == ("my-endpoint-canada-berri992.openai.azure.com", 443, True)


def test_demo_config_loads() -> None:
    config = load_config(CONFIG_DIR / "demo.yaml", environ={})
    assert set(config.groups) == {"gpt-4o", "text-embedding-3-small"}
    assert config.deployments[0].api_key == "demo-key-eastus"  # from environment_variables


def test_environment_reference_missing_names_the_path() -> None:
    text = MINIMAL.replace("api_key: ka", "api_key: os.environ/NOT_SET_ANYWHERE")
    with pytest.raises(ConfigError, match=r"model_list\[0\]\.litellm_params\.api_key: environment variable "
                                          r"NOT_SET_ANYWHERE is not set"):
        parse_config(text, environ={})


def test_invalid_values_name_each_yaml_path() -> None:
    text = MINIMAL + """
  - model_name: gpt-4o
    litellm_params: {model: azure/dep-b, api_base: "https://b.openai.azure.com", api_key: kb, rpm: -1, tpm: x}
router_settings: {routing_strategy: cheapest, num_retries: -2, timeout: 0}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    message = str(info.value)
    assert "model_list[1].litellm_params.rpm: must be a positive integer" in message
    assert "model_list[1].litellm_params.tpm: must be a positive integer" in message
    assert "router_settings.routing_strategy: must be one of" in message
    assert "router_settings.num_retries: must be a non-negative integer" in message
    assert "router_settings.timeout: must be a positive number" in message


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("model: openai/gpt-4o", "model_list[0].litellm_params.model: must be 'azure/<deployment-name>'"),
        ("api_base: ftp://x", "model_list[0].litellm_params.api_base: must be an http(s) URL"),
    ],
)
def test_unsupported_values(snippet: str, expected: str) -> None:
    key = snippet.split(":")[0]
    text = MINIMAL.replace({"model": "model: azure/dep-a", "api_base": 'api_base: "https://a.openai.azure.com"'}[key],
                           snippet)
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    assert expected in str(info.value)


def test_missing_model_list_and_empty_list() -> None:
    with pytest.raises(ConfigError, match="model_list: is required"):
        parse_config("router_settings: {}", environ={})
    with pytest.raises(ConfigError, match="model_list: must list at least one deployment"):
        parse_config("model_list: []", environ={})


def test_alias_to_unknown_group_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"router_settings\.model_group_alias\.gpt-4: names model group 'nope'"):
        parse_config(MINIMAL + "router_settings: {model_group_alias: {gpt-4: nope}}", environ={})


def test_unknown_keys_accepted_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    text = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: azure/a, api_base: "https://a.openai.azure.com", api_key: k, max_parallel_requests: 3}
    model_info: {id: a, base_model: azure/gpt-4o}
  - model_name: gpt-4o
    litellm_params: {model: azure/b, api_base: "https://b.openai.azure.com", api_key: k, max_parallel_requests: 3}
router_settings: {enable_pre_call_checks: true}
litellm_settings: {drop_params: true, success_callback: [langfuse]}
general_settings: {master_key: sk-1234, database_url: postgres://x}
"""
    with caplog.at_level(logging.WARNING, logger="extproc.config"):
        config = parse_config(text, environ={})
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert config.unknown_keys == (
        "model_list[].litellm_params.max_parallel_requests",
        "model_list[].model_info.base_model",
        "router_settings.enable_pre_call_checks",
        "general_settings.database_url",
    )
    assert "sk-1234" not in warnings[0]
    assert config.master_key == "sk-1234"


def test_alias_forms_and_resolution() -> None:
    text = MINIMAL + """
  - model_name: gpt-4
    litellm_params: {model: azure/dep-4, api_base: "https://a.openai.azure.com", api_key: ka}
router_settings:
  model_group_alias: {gpt-4: gpt-4o, internal: {model: gpt-4o, hidden: true}}
"""
    config = parse_config(text, environ={})
    assert config.resolve_group("gpt-4") == "gpt-4o"  # an alias wins over the same-named group (LiteLLM)
    assert config.resolve_group("internal") == "gpt-4o"
    assert config.resolve_group("nope") is None
    assert config.public_model_names() == ["gpt-4o", "gpt-4"]


def test_defaults_and_azure_fallback_env() -> None:
    text = """
model_list:
  - model_name: m
    litellm_params: {model: azure/d}
"""
    config = parse_config(text, environ={"AZURE_API_BASE": "https://r.openai.azure.com/prefix/", "AZURE_API_KEY": "k"})
    dep = config.deployments[0]
    assert (dep.api_key, dep.base_path, dep.api_version) == ("k", "/prefix", DEFAULT_AZURE_API_VERSION)
    assert config.num_retries == 2 and config.timeout == 600
    assert dep.id == parse_config(text, environ={"AZURE_API_BASE": "https://r.openai.azure.com/prefix/",
                                                  "AZURE_API_KEY": "other"}).deployments[0].id


def test_duplicate_ids_rejected() -> None:
    text = MINIMAL + MINIMAL.split("model_list:")[1]
    text = text.replace("api_key: ka}", "api_key: ka}\n    model_info: {id: same}")
    with pytest.raises(ConfigError, match=r"model_list\[1\]\.model_info\.id: duplicate id 'same'"):
        parse_config(text, environ={})


def test_numbers_from_environment_strings() -> None:
    text = MINIMAL.replace("api_key: ka}", "api_key: ka, rpm: os.environ/RPM, timeout: os.environ/T}")
    dep = parse_config(text, environ={"RPM": "60", "T": "2.5"}).deployments[0]
    assert (dep.rpm, dep.timeout) == (60, 2.5)


def test_repr_hides_keys() -> None:
    config = parse_config(MINIMAL + "general_settings: {master_key: sk-top}", environ={})
    assert "ka" not in repr(config.deployments[0]).split("api_base")[0]
    assert "sk-top" not in repr(config)


def test_entries_differing_only_in_key_get_distinct_ids() -> None:
    text = MINIMAL + MINIMAL.split("model_list:")[1].replace("api_key: ka", "api_key: kb")
    first, second = parse_config(text, environ={}).deployments
    assert first.id != second.id
    assert "ka" not in first.id and "kb" not in second.id
