"""LiteLLM Proxy config files, loaded unchanged, validated, and turned into routing-ready objects.

The YAML is first resolved (``os.environ/NAME`` values, ``environment_variables``), then validated with
pydantic. Keys LiteLLM knows but we do not use are accepted and reported once; invalid values fail at start
with the YAML path in the message (``model_list[1].litellm_params.rpm: must be a positive integer``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator

log = logging.getLogger("extproc.config")

ENV_PREFIX = "os.environ/"
# LiteLLM's Azure default when a deployment names no api_version; AZURE_API_VERSION overrides it.
DEFAULT_AZURE_API_VERSION = "2024-10-21"
# LiteLLM defaults to 6000 s; a bounded default protects Envoy and clients from hung deployments.
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_NUM_RETRIES = 2  # LiteLLM's Router falls back to openai's DEFAULT_MAX_RETRIES = 2
DEFAULT_MAX_REQUEST_MB = 16.0
STRATEGIES = ("simple-shuffle", "least-busy", "usage-based-routing", "latency-based-routing")
STRATEGY_ALIASES = {"usage-based-routing-v2": "usage-based-routing"}


class ConfigError(ValueError):
    """A config file that cannot be served; the message names every bad YAML path."""


# ---------------------------------------------------------------------------------------------------------
# Pydantic models of the LiteLLM file. ``extra="allow"`` keeps unknown keys so they can be reported.


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def _positive_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise ValueError("must be a positive integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError("must be a positive integer") from None
    if number != float(value) or number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _non_negative_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("must be a non-negative integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError("must be a non-negative integer") from None
    if number != float(value) or number < 0:
        raise ValueError("must be a non-negative integer")
    return number


def _positive_number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("must be a positive number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a positive number") from None
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _non_negative_number(value: Any) -> float | None:
    if value is None:
        return None
    number = _positive_number(value) if value not in (0, "0", 0.0) else 0.0
    return number


PositiveInt = Annotated[int | None, BeforeValidator(_positive_int)]
NonNegativeInt = Annotated[int | None, BeforeValidator(_non_negative_int)]
PositiveNumber = Annotated[float | None, BeforeValidator(_positive_number)]
NonNegativeNumber = Annotated[float | None, BeforeValidator(_non_negative_number)]


class LiteLLMParams(_Section):
    model: str
    api_base: str | None = None
    api_key: str | None = None
    api_version: str | None = None
    rpm: PositiveInt = None
    tpm: PositiveInt = None
    weight: PositiveNumber = None
    timeout: PositiveNumber = None
    stream_timeout: PositiveNumber = None
    cooldown_time: NonNegativeNumber = None


    @field_validator("model")
    @classmethod
    def _azure_only(cls, value: str) -> str:
        provider, _, deployment = value.partition("/")
        if provider != "azure" or not deployment:
            raise ValueError(f"must be 'azure/<deployment-name>' (got {value!r}); only Azure OpenAI is routed")
        return value


class ModelInfo(_Section):
    id: str | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> str | None:
        return None if value is None else str(value)


class ModelEntry(_Section):
    model_name: str
    litellm_params: LiteLLMParams
    model_info: ModelInfo = ModelInfo()


class AliasItem(_Section):
    model: str
    hidden: bool = False


class RoutingStrategyArgs(_Section):
    ttl: Annotated[float, BeforeValidator(_positive_number)] = 3600.0
    lowest_latency_buffer: Annotated[float, BeforeValidator(_non_negative_number)] = 0.0
    max_latency_list_size: Annotated[int, BeforeValidator(_positive_int)] = 10



class RouterSettings(_Section):
    routing_strategy: str = "simple-shuffle"
    model_group_alias: dict[str, str | AliasItem] = {}
    num_retries: Annotated[int, BeforeValidator(_non_negative_int)] = DEFAULT_NUM_RETRIES
    timeout: Annotated[float, BeforeValidator(_positive_number)] = DEFAULT_TIMEOUT_S
    stream_timeout: PositiveNumber = None
    redis_host: str | None = None
    redis_port: PositiveInt = None
    redis_password: str | None = None
    redis_url: str | None = None
    redis_key_prefix: str = "llm-extproc"  # ours: lets several installs share one Redis
    allowed_fails: NonNegativeInt = None
    cooldown_time: NonNegativeNumber = None
    disable_cooldowns: bool = False
    routing_strategy_args: RoutingStrategyArgs = RoutingStrategyArgs()


    @field_validator("routing_strategy", mode="before")
    @classmethod
    def _known_strategy(cls, value: Any) -> str:
        name = STRATEGY_ALIASES.get(str(value), str(value))
        if name not in STRATEGIES:
            raise ValueError(f"must be one of {', '.join(STRATEGIES)} (got {value!r})")
        return name


class GeneralSettings(_Section):
    master_key: str | None = None
    max_request_size_mb: Annotated[float, BeforeValidator(_positive_number)] = DEFAULT_MAX_REQUEST_MB



class ProxyConfigFile(_Section):
    model_list: list[ModelEntry]
    router_settings: RouterSettings = RouterSettings()
    general_settings: GeneralSettings = GeneralSettings()
    environment_variables: dict[str, str] = {}

    @field_validator("model_list")
    @classmethod
    def _not_empty(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        if not value:
            raise ValueError("must list at least one deployment")
        return value


# LiteLLM sections we accept without reading; their keys are not reported one by one.
_IGNORED_SECTIONS = ("litellm_settings", "callback_settings", "guardrails", "credential_list", "files_settings")


# ---------------------------------------------------------------------------------------------------------
# Routing-ready objects, derived once at load time so the hot path only does dictionary look-ups.


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    model_name: str
    deployment: str  # the Azure deployment name, from "azure/<deployment>"
    api_base: str
    api_key: str = field(repr=False)
    api_version: str
    rpm: int | None
    tpm: int | None
    weight: float | None
    timeout: float | None
    stream_timeout: float | None
    cooldown_time: float | None
    cluster: str  # the Envoy cluster whose first choice is this deployment (the others follow as fallbacks)
    index: int  # position among all deployments: names this deployment's key slot in request metadata
    scheme: str
    host: str
    port: int
    base_path: str  # api_base's path without the trailing slash ("" for a bare host)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Alias:
    target: str
    hidden: bool


@dataclass(frozen=True)
class RouterConfig:
    """Everything the processor and the Envoy renderer need, resolved from one file."""

    deployments: tuple[Deployment, ...]
    groups: Mapping[str, tuple[Deployment, ...]]
    aliases: Mapping[str, Alias]
    routing_strategy: str
    num_retries: int
    timeout: float
    stream_timeout: float | None
    allowed_fails: int | None
    cooldown_time: float | None
    disable_cooldowns: bool
    strategy_args: RoutingStrategyArgs
    redis_url: str | None = field(repr=False)
    redis_key_prefix: str
    master_key: str | None = field(repr=False)
    max_request_bytes: int
    source: str = ""
    unknown_keys: tuple[str, ...] = ()

    def resolve_group(self, model: str) -> str | None:
        """The model group a requested ``model`` routes to; an alias wins over a same-named group (LiteLLM)."""
        alias = self.aliases.get(model)
        if alias is not None:
            return alias.target
        return model if model in self.groups else None

    def secrets(self) -> set[str]:
        """Every credential the file holds: deployment api-keys, the master key, the Redis password."""
        found = {dep.api_key for dep in self.deployments}
        if self.master_key:
            found.add(self.master_key)
        if self.redis_url and urlsplit(self.redis_url).password:
            found.add(str(urlsplit(self.redis_url).password))
        return found

    def public_model_names(self) -> list[str]:
        names = list(self.groups)
        names += [name for name, alias in self.aliases.items() if not alias.hidden and name not in self.groups]
        return names


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> RouterConfig:
    text = Path(path).read_text(encoding="utf-8")
    return parse_config(text, source=str(path), environ=environ)


def parse_config(text: str, source: str = "<string>", environ: Mapping[str, str] | None = None) -> RouterConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping with a 'model_list'")
    env = dict(os.environ if environ is None else environ)
    declared = raw.get("environment_variables") or {}
    if isinstance(declared, dict):
        # LiteLLM exports these before reading the rest; values already in the environment win.
        for key, value in declared.items():
            env.setdefault(str(key), str(value))
    errors: list[str] = []
    resolved = _resolve_env(raw, "", env, errors)
    if errors:
        raise ConfigError(_error_text(source, errors))
    try:
        parsed = ProxyConfigFile.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(_error_text(source, [_format_pydantic(err) for err in exc.errors()])) from None
    unknown = tuple(_unknown_keys(parsed))
    if unknown:
        log.warning("%s: ignoring keys this router does not use: %s", source, ", ".join(unknown))
    return _build(parsed, env, source, unknown)


def _resolve_env(node: Any, path: str, env: Mapping[str, str], errors: list[str]) -> Any:
    if isinstance(node, str) and node.startswith(ENV_PREFIX):
        name = node[len(ENV_PREFIX) :]
        if name not in env:
            errors.append(f"{path}: environment variable {name} is not set")
            return None
        return env[name]
    if isinstance(node, dict):
        return {k: _resolve_env(v, f"{path}.{k}" if path else str(k), env, errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_env(v, f"{path}[{i}]", env, errors) for i, v in enumerate(node)]
    return node


def _format_pydantic(err: Mapping[str, Any]) -> str:
    path = ""
    for part in err["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("str", "AliasItem", "function-after[_known_strategy(), str]"):
            path += f".{part}" if path else str(part)
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "is required"
    return f"{path}: {message}"


def _error_text(source: str, errors: list[str]) -> str:
    unique = list(dict.fromkeys(errors))
    return f"{source}: invalid config:\n  " + "\n  ".join(unique)


def _unknown_keys(parsed: ProxyConfigFile) -> Iterator[str]:
    def walk(model: BaseModel, path: str) -> Iterator[str]:
        for key in model.model_extra or {}:
            if not path and key in _IGNORED_SECTIONS:
                continue
            yield f"{path}.{key}" if path else key
        for name in type(model).model_fields:
            value = getattr(model, name)
            child = f"{path}.{name}" if path else name
            if isinstance(value, BaseModel):
                yield from walk(value, child)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, BaseModel):
                        yield from walk(item, f"{child}[{i}]")

    # One entry per distinct key shape, so 40 deployments with the same extra key give one name.
    seen: dict[str, None] = {}
    for key in walk(parsed, ""):
        seen[re.sub(r"\[\d+\]", "[]", key)] = None
    yield from seen


def _build(parsed: ProxyConfigFile, env: Mapping[str, str], source: str, unknown: tuple[str, ...]) -> RouterConfig:
    errors: list[str] = []
    deployments: list[Deployment] = []
    used_ids: set[str] = set()
    used_clusters: set[str] = set()
    for index, entry in enumerate(parsed.model_list):
        where = f"model_list[{index}]"
        params = entry.litellm_params
        api_base = params.api_base or env.get("AZURE_API_BASE")
        api_key = params.api_key or env.get("AZURE_API_KEY")
        if not api_base:
            errors.append(f"{where}.litellm_params.api_base: is required (or set AZURE_API_BASE)")
            continue
        if not api_key:
            errors.append(f"{where}.litellm_params.api_key: is required (or set AZURE_API_KEY)")
            continue
        url = urlsplit(api_base.strip())
        if url.scheme not in ("http", "https") or not url.hostname:
            errors.append(f"{where}.litellm_params.api_base: must be an http(s) URL (got {api_base!r})")
            continue
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            errors.append(f"{where}.litellm_params.api_base: has an invalid port (got {api_base!r})")
            continue
        deployment_name = params.model.partition("/")[2]
        model_id = entry.model_info.id or _default_id(entry, index, used_ids)
        if model_id in used_ids:
            errors.append(f"{where}.model_info.id: duplicate id {model_id!r}")
            continue
        used_ids.add(model_id)
        cluster = _cluster_name(model_id, used_clusters)
        deployments.append(
            Deployment(
                id=model_id,
                model_name=entry.model_name,
                deployment=deployment_name,
                api_base=api_base,
                api_key=api_key,
                api_version=params.api_version or env.get("AZURE_API_VERSION") or DEFAULT_AZURE_API_VERSION,
                rpm=params.rpm,
                tpm=params.tpm,
                weight=params.weight,
                timeout=params.timeout,
                stream_timeout=params.stream_timeout,
                cooldown_time=params.cooldown_time,
                cluster=cluster,
                index=len(deployments),
                scheme=url.scheme,
                host=url.hostname,
                port=port,
                base_path=url.path.rstrip("/"),
            )
        )
    groups: dict[str, list[Deployment]] = {}
    for dep in deployments:
        groups.setdefault(dep.model_name, []).append(dep)
    aliases: dict[str, Alias] = {}
    for name, target in parsed.router_settings.model_group_alias.items():
        alias = Alias(target, False) if isinstance(target, str) else Alias(target.model, target.hidden)
        if alias.target not in groups:
            errors.append(
                f"router_settings.model_group_alias.{name}: names model group {alias.target!r}, "
                f"which no model_list entry has (known: {', '.join(groups) or 'none'})"
            )
        aliases[name] = alias
    if errors:
        raise ConfigError(_error_text(source, errors))
    settings = parsed.router_settings
    return RouterConfig(
        deployments=tuple(deployments),
        groups={name: tuple(deps) for name, deps in groups.items()},
        aliases=aliases,
        routing_strategy=settings.routing_strategy,
        num_retries=settings.num_retries,
        timeout=settings.timeout,
        stream_timeout=settings.stream_timeout,
        allowed_fails=settings.allowed_fails,
        cooldown_time=settings.cooldown_time,
        disable_cooldowns=settings.disable_cooldowns,
        strategy_args=settings.routing_strategy_args,
        redis_url=_redis_url(settings),
        redis_key_prefix=settings.redis_key_prefix,
        master_key=parsed.general_settings.master_key,
        max_request_bytes=int(parsed.general_settings.max_request_size_mb * 1024 * 1024),
        source=source,
        unknown_keys=unknown,
    )


def _default_id(entry: ModelEntry, index: int, used: set[str]) -> str:
    """Deterministic like LiteLLM's hash of the params, but never of the key: ids (and the cluster names
    derived from them) stay the same when keys rotate, and an Envoy config rendered with placeholder keys
    names the same clusters as processors holding the real ones. Entries that differ only in their key get
    their position mixed in."""
    params = entry.litellm_params.model_dump(exclude={"api_key"}, exclude_none=True)
    digest = hashlib.sha256(orjson.dumps([entry.model_name, params], option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    if digest in used:
        mixed = orjson.dumps([entry.model_name, params, index], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(mixed).hexdigest()[:16]
    return digest


def _cluster_name(model_id: str, used: set[str]) -> str:
    base = "llm_" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    return name


def _redis_url(settings: RouterSettings) -> str | None:
    if settings.redis_url:
        return settings.redis_url
    if not settings.redis_host:
        return None
    auth = f":{settings.redis_password}@" if settings.redis_password else ""
    return f"redis://{auth}{settings.redis_host}:{settings.redis_port or 6379}/0"


def redis_endpoint_for_display(url: str | None) -> str:
    """The Redis address without its password, for logs."""
    if not url:
        return "none (in-memory counters)"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"

