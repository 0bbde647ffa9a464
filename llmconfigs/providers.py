"""The provider registry: one table of every LLM provider OpsAgent can reach through its OpenAI-compatible API."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db import models


class Provider(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    DEEPSEEK = "deepseek", "DeepSeek"
    TONGYI = "tongyi", "Tongyi Qianwen (DashScope)"
    OLLAMA = "ollama", "Ollama"
    VLLM = "vllm", "vLLM"
    DOUBAO = "doubao", "Doubao (Volcengine Ark)"
    ZHIPU = "zhipu", "Zhipu GLM"
    MOONSHOT = "moonshot", "Moonshot (Kimi)"
    BAIDU = "baidu", "Baidu Qianfan"
    OPENAI_COMPATIBLE = "openai_compatible", "Other OpenAI-compatible"


@dataclass(frozen=True)
class Range:
    """A closed or half-open numeric interval; `low_open`/`high_open` exclude the bound itself."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# The widest ranges any provider accepts; the database check constraints use these.
TEMPERATURE_RANGE = Range(0.0, 2.0)
TOP_P_RANGE = Range(0.0, 1.0)
PENALTY_RANGE = Range(-2.0, 2.0)
MAX_TOKENS_LIMIT = 1_000_000


@dataclass(frozen=True)
class ProviderSpec:
    key: str
    label: str
    default_base_url: str
    default_model: str
    default_embedding_model: str = ""
    temperature: Range = TEMPERATURE_RANGE
    top_p: Range = TOP_P_RANGE
    # Capabilities
    requires_api_key: bool = True
    stream_usage: bool = True
    tools: bool = True
    embeddings: bool = True
    penalties: bool = True
    vision_models: tuple[str, ...] = ()
    embedding_batch_size: int = 512
    # OpenAI renamed max_tokens to max_completion_tokens; most compatible servers only know the old name.
    max_tokens_param: str = "max_tokens"
    # Per-model extra request body (matched by model-name prefix), e.g. qwen3 needs enable_thinking=false when not
    # streaming.
    non_stream_extra_body: dict[str, dict[str, Any]] = field(default_factory=dict)
    docs: str = ""

    @property
    def default_top_p(self) -> float:
        """1.0 where the provider accepts it, else just under its upper bound (e.g. Zhipu's open interval)."""
        return 1.0 if self.top_p.contains(1.0) else 0.95

    def supports_vision(self, model_name: str) -> bool:
        name = model_name.lower()
        return any(marker in name for marker in self.vision_models)

    def extra_body_for(self, model_name: str, *, streaming: bool) -> dict[str, Any]:
        if streaming:
            return {}
        body: dict[str, Any] = {}
        for prefix, extra in self.non_stream_extra_body.items():
            if model_name.lower().startswith(prefix):
                body.update(extra)
        return body

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "default_base_url": self.default_base_url,
            "default_model": self.default_model,
            "default_embedding_model": self.default_embedding_model,
            "temperature_range": self.temperature.describe(),
            "top_p_range": self.top_p.describe(),
            "requires_api_key": self.requires_api_key,
            "supports_stream_usage": self.stream_usage,
            "supports_tools": self.tools,
            "supports_embeddings": self.embeddings,
            "supports_penalties": self.penalties,
            "embedding_batch_size": self.embedding_batch_size,
        }


PROVIDERS: dict[str, ProviderSpec] = {
    spec.key: spec
    for spec in [
        ProviderSpec(
            key=Provider.OPENAI,
            label=Provider.OPENAI.label,
            default_base_url="https://api.openai.com/v1",
            default_model="gpt-4o-mini",
            default_embedding_model="text-embedding-3-small",
            vision_models=("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4"),
            embedding_batch_size=1000,
            max_tokens_param="max_completion_tokens",
        ),
        ProviderSpec(
            key=Provider.DEEPSEEK,
            label=Provider.DEEPSEEK.label,
            default_base_url="https://api.deepseek.com/v1",
            default_model="deepseek-chat",
            embeddings=False,
        ),
        ProviderSpec(
            key=Provider.TONGYI,
            label=Provider.TONGYI.label,
            default_base_url="https://dashscope.aliyuncs.com/compatible-mode/v1",
            default_model="qwen-plus",
            default_embedding_model="text-embedding-v3",
            temperature=Range(0.0, 2.0, high_open=True),
            top_p=Range(0.0, 1.0, low_open=True),
            vision_models=("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qvq", "qwen-omni"),
            embedding_batch_size=10,
            non_stream_extra_body={"qwen3": {"enable_thinking": False}},
        ),
        ProviderSpec(
            key=Provider.OLLAMA,
            label=Provider.OLLAMA.label,
            default_base_url="http://127.0.0.1:11434/v1",
            default_model="qwen2.5:7b",
            default_embedding_model="nomic-embed-text",
            requires_api_key=False,
            vision_models=("llava", "vision", "minicpm-v", "qwen2.5vl", "gemma3"),
            embedding_batch_size=64,
        ),
        ProviderSpec(
            key=Provider.VLLM,
            label=Provider.VLLM.label,
            default_base_url="http://127.0.0.1:8001/v1",
            default_model="Qwen/Qwen2.5-7B-Instruct",
            requires_api_key=False,
            vision_models=("vl", "vision", "llava"),
            embedding_batch_size=256,
        ),
        ProviderSpec(
            key=Provider.DOUBAO,
            label=Provider.DOUBAO.label,
            default_base_url="https://ark.cn-beijing.volces.com/api/v3",
            default_model="doubao-1-5-pro-32k-250115",
            default_embedding_model="doubao-embedding-text-240715",
            vision_models=("vision", "doubao-1-5-vision", "doubao-seed"),
            embedding_batch_size=256,
        ),
        ProviderSpec(
            key=Provider.ZHIPU,
            label=Provider.ZHIPU.label,
            default_base_url="https://open.bigmodel.cn/api/paas/v4",
            default_model="glm-4-flash",
            default_embedding_model="embedding-3",
            # Zhipu rejects temperature=0 and top_p=1 (open intervals).
            temperature=Range(0.0, 1.0, low_open=True),
            top_p=Range(0.0, 1.0, low_open=True, high_open=True),
            stream_usage=False,
            penalties=False,
            vision_models=("glm-4v", "glm-4.1v", "glm-4.5v"),
            embedding_batch_size=64,
        ),
        ProviderSpec(
            key=Provider.MOONSHOT,
            label=Provider.MOONSHOT.label,
            default_base_url="https://api.moonshot.cn/v1",
            default_model="moonshot-v1-8k",
            temperature=Range(0.0, 1.0),
            stream_usage=False,
            embeddings=False,
            vision_models=("vision",),
        ),
        ProviderSpec(
            key=Provider.BAIDU,
            label=Provider.BAIDU.label,
            default_base_url="https://qianfan.baidubce.com/v2",
            default_model="ernie-4.0-8k",
            default_embedding_model="embedding-v1",
            temperature=Range(0.0, 1.0, low_open=True),
            top_p=Range(0.0, 1.0),
            vision_models=("ernie-4.5-vl", "vl"),
            embedding_batch_size=16,
        ),
        ProviderSpec(
            key=Provider.OPENAI_COMPATIBLE,
            label=Provider.OPENAI_COMPATIBLE.label,
            default_base_url="",
            default_model="",
            requires_api_key=False,
            vision_models=("vision", "vl", "gpt-4o"),
        ),
    ]
}


def provider_spec(provider: str) -> ProviderSpec:
    try:
        return PROVIDERS[provider]
    except KeyError:
        raise ValueError(f"Unknown provider {provider!r}; expected one of: {', '.join(PROVIDERS)}") from None


def parameter_errors(
    provider: str,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
) -> dict[str, str]:
    """Field name -> message for every parameter outside what `provider` accepts. Empty when all are fine."""
    spec = provider_spec(provider)
    errors: dict[str, str] = {}
    if temperature is not None and not spec.temperature.contains(temperature):
        errors["temperature"] = (
            f"{spec.label} accepts temperature in {spec.temperature.describe()}, got {temperature:g}."
        )
    if top_p is not None and not spec.top_p.contains(top_p):
        errors["top_p"] = f"{spec.label} accepts top_p in {spec.top_p.describe()}, got {top_p:g}."
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        errors["max_tokens"] = f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}."
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if value is None:
            continue
        if not PENALTY_RANGE.contains(value):
            errors[name] = f"{name} must be in {PENALTY_RANGE.describe()}, got {value:g}."
        elif value and not spec.penalties:
            errors[name] = f"{spec.label} does not accept {name}; leave it at 0."
    return errors
