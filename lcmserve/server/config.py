"""ServerConfig: every knob of ``lcmserve serve``, typed, documented and range-checked once.

Values come from three layers, later ones winning: the field defaults, ``LCMSERVE_<FIELD>``
environment variables (``LCMSERVE_PORT=8080``), then command-line flags (``--port 8080``).
A bad value fails at start-up with an InvalidInputError that names the variable or flag
that carried it, the value, and the allowed range.
"""

from __future__ import annotations

import argparse
import errno
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from lcmserve.engine.adapters import NAME_PATTERN
from lcmserve.engine.backends import check_backend_attention
from lcmserve.engine.batcher import BatcherConfig
from lcmserve.engine.request import MAX_STEPS, MIN_STEPS
from lcmserve.errors import InvalidInputError, check_float, check_int
from lcmserve.models import DEFAULT_MODEL

ENV_PREFIX = "LCMSERVE_"
# Room for a request's fields besides its two prompts (numbers, the output format, field tags).
REQUEST_FIELDS_BYTES = 1024
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens, which model it loads, how it batches and what it accepts."""

    # 1. network -----------------------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata=_doc(
        "interface to bind; loopback by default, pass 0.0.0.0 explicitly to listen on every interface"))
    port: int = field(default=8000, metadata=_doc("HTTP port (REST, /metrics, playground), 1-65535"))
    grpc_port: int = field(default=50051, metadata=_doc("gRPC port, 1-65535; 0 turns gRPC off"))
    # 2. model -------------------------------------------------------------------------------
    model: str = field(default=DEFAULT_MODEL, metadata=_doc("diffusers folder, Hub id or preset:NAME"))
    lora: str | None = field(default=None, metadata=_doc(
        "LCM-LoRA adapter (folder, file, Hub id, or the bundled shapes-lcm-lora) fused at load"))
    lora_scale: float = field(default=1.0, metadata=_doc("weight of the fused LoRA, in [0, 10]"))
    adapters: tuple[str, ...] = field(default=(), metadata=_doc(
        "LoRA adapters held unfused beside the model, which a request chooses by name (its adapters field); "
        "NAME=PATH, PATH a LoRA .safetensors file or its folder (as --lora takes); repeat --adapter, or give a "
        "comma list; more can be loaded at run time (POST /v1/adapters)", alias="--adapter"))
    bundled_adapters: bool = field(default=True, metadata=_doc(
        "also hold the adapters bundled with a bundled model (shapes-lcm: shifted, a palette style); an --adapter "
        "of the same name takes its place"))
    unet: str | None = field(default=None, metadata=_doc("an LCM UNet folder that replaces the pipeline's UNet"))
    vae: str | None = field(default=None, metadata=_doc(
        "a VAE that replaces the pipeline's: folder or Hub id of an AutoencoderKL or AutoencoderTiny (TAESD, a much "
        "faster decode), or preset:taesd (random weights: for timing only)"))
    preview_vae: str | None = field(default=None, metadata=_doc(
        "a second decoder for the per-step previews only (gRPC GenerateStream, REST /generate/stream; same forms "
        "as vae; e.g. a TAESD folder, so that previews cost "
        "the batch a fraction of a full decode); final images keep the model's VAE"))
    device: str = field(default="auto", metadata=_doc("auto, cpu, cuda or cuda:N"))
    dtype: str = field(default="auto", metadata=_doc("auto, float32, bfloat16 or float16"))
    backend: str = field(default="auto", metadata=_doc(
        "engine backend: auto (the rule of engine/backends/auto.py picks the backend, and the dtype and attention "
        "left at auto, for this machine and model; GET /v1/models says which and why; a compiled pick builds its "
        "programs at the first start, minutes, and loads them from cache_dir at the next ones; batches with "
        "per-request adapters run eager whatever the backend), torch, compiled, cuda-graph, "
        "onnx or tensorrt (the bucketed ones build every batch size up to max_batch_size in powers of two, steps "
        "1-8, the model's native size, at start-up)"))
    attention: str = field(default="auto", metadata=_doc(
        "auto (small-head where it pays), sdpa (torch's attention) or small-head (our CPU kernel for heads of up to "
        "16 channels, or 24 over at most 80 keys, as in the shapes models; torch, compiled and cuda-graph backends "
        "on a CPU; built with the C compiler on first use)"))
    cache_dir: str | None = field(default=None, metadata=_doc(
        "where exported ONNX graphs, TensorRT engines and built kernels are kept (default $LCMSERVE_CACHE_DIR or ~/.cache/lcmserve)"))
    # 3. batching ----------------------------------------------------------------------------
    max_batch_size: int = field(default=8, metadata=_doc("rows (images) per engine call, 1-1024"))
    max_queue_delay_ms: float = field(default=10.0, metadata=_doc(
        "how long a partial batch waits for batch mates, in [0, 60000] ms"))
    max_queue_rows: int = field(default=256, metadata=_doc(
        "images waiting in the queue, at most (>= max_batch_size); beyond it requests get 429"))
    request_timeout_s: float = field(default=60.0, metadata=_doc(
        "deadline of a request from arrival, in (0, 3600] s; a request still queued at it gets 504"))
    drain_grace_s: float = field(default=30.0, metadata=_doc(
        "on SIGTERM/SIGINT, how long in-flight work may finish, in [0, 3600] s"))
    warmup_steps: tuple[int, ...] = field(default=(4,), metadata=_doc(
        "step counts run once before /readyz turns ready (comma list, each 1-8; empty: no warm-up)"))
    # 4. access ------------------------------------------------------------------------------
    api_key: str | None = field(default=None, repr=False, metadata=_doc(
        "Bearer token required on the generation routes, GET /v1/models, the adapter routes and every "
        "ImageGeneration RPC, checked before the request is read (prefer LCMSERVE_API_KEY: flags show in ps)"))
    auth_metrics: bool = field(default=False, metadata=_doc(
        "also require the API key on /metrics, /healthz and /readyz (open by default)"))
    cors_origins: tuple[str, ...] = field(default=(), metadata=_doc(
        "origins allowed by CORS (comma list, e.g. http://localhost:3000); empty: CORS off"))
    # 5. request limits ----------------------------------------------------------------------
    max_body_bytes: int = field(default=65536, metadata=_doc("request body size, at most, in [1024, 16 MiB]"))
    max_prompt_chars: int = field(default=2000, metadata=_doc("prompt length in characters, at most, 1-100000"))
    max_images: int = field(default=4, metadata=_doc("images per request, at most, 1-64"))
    max_pixels: int = field(default=1024 * 1024, metadata=_doc(
        "width * height of one image, at most, in [4096, 16777216]"))
    grpc_max_message_bytes: int = field(default=4 * 2**20, metadata=_doc(
        "size of one incoming gRPC message, at most, in [64 KiB, 256 MiB]; a larger one is refused with "
        "RESOURCE_EXHAUSTED before it is parsed. At least the largest legal request: both prompts at "
        "max_prompt_chars of 4-byte UTF-8 characters, plus room for the other fields"))
    read_timeout_s: float = field(default=30.0, metadata=_doc(
        "how long an HTTP client may take to send a request's headers, and then its body, in (0, 3600] s; "
        "a slower one gets 408 and its connection is closed"))

    def __post_init__(self) -> None:
        check_int("port", self.port, 1, 65535)
        check_int("grpc_port", self.grpc_port, 0, 65535)
        if self.grpc_port == self.port:
            raise InvalidInputError.out_of_range("grpc_port", self.grpc_port,
                                                 f"a port other than port={self.port}, or 0 to turn gRPC off")
        if not isinstance(self.host, str) or not self.host.strip():
            raise InvalidInputError.out_of_range("host", self.host, "an interface address such as 127.0.0.1")
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidInputError.out_of_range("model", self.model, "a diffusers folder, Hub id or preset:NAME")
        check_float("lora_scale", self.lora_scale, 0.0, 10.0)
        adapter_paths(self.adapters)
        check_backend_attention(self.backend, self.attention)
        check_int("max_batch_size", self.max_batch_size, 1, 1024)
        check_float("max_queue_delay_ms", self.max_queue_delay_ms, 0.0, 60000.0)
        check_int("max_queue_rows", self.max_queue_rows, 1, 1_000_000)
        check_float("request_timeout_s", self.request_timeout_s, 0.0, 3600.0, open_low=True)
        check_float("drain_grace_s", self.drain_grace_s, 0.0, 3600.0)
        for steps in self.warmup_steps:
            if isinstance(steps, bool) or not isinstance(steps, int) or not MIN_STEPS <= steps <= MAX_STEPS:
                raise InvalidInputError.out_of_range(
                    "warmup_steps", self.warmup_steps, f"a comma list of integers in [{MIN_STEPS}, {MAX_STEPS}]")
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise InvalidInputError("api_key must be a non-empty token without spaces (or unset)", param="api_key")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise InvalidInputError.out_of_range("cors_origins", origin, "'*' or origins like https://example.com")
        check_int("max_body_bytes", self.max_body_bytes, 1024, 16 * 2**20)
        check_int("max_prompt_chars", self.max_prompt_chars, 1, 100_000)
        check_int("max_images", self.max_images, 1, 64)
        check_int("max_pixels", self.max_pixels, 64 * 64, 4096 * 4096)
        check_int("grpc_max_message_bytes", self.grpc_max_message_bytes, 64 * 2**10, 256 * 2**20)
        check_float("read_timeout_s", self.read_timeout_s, 0.0, 3600.0, open_low=True)
        if self.grpc_max_message_bytes < self.largest_request_bytes:
            raise InvalidInputError.out_of_range(
                "grpc_max_message_bytes", self.grpc_max_message_bytes,
                f">= {self.largest_request_bytes} bytes, the largest legal request at "
                f"max_prompt_chars={self.max_prompt_chars}")
        # cross-field: the batcher needs room for one full batch and one whole request
        if self.max_queue_rows < max(self.max_batch_size, self.max_images):
            raise InvalidInputError.out_of_range(
                "max_queue_rows", self.max_queue_rows,
                f">= max_batch_size ({self.max_batch_size}) and >= max_images ({self.max_images})")

    # derived ----------------------------------------------------------------------------------
    @property
    def largest_request_bytes(self) -> int:
        """The wire size of the largest request the limits allow: two prompts of 4-byte characters, and the rest."""
        return 2 * 4 * self.max_prompt_chars + REQUEST_FIELDS_BYTES

    @property
    def batcher_config(self) -> BatcherConfig:
        return BatcherConfig(
            max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms,
            max_queue_rows=self.max_queue_rows, default_timeout_s=self.request_timeout_s,
            drain_grace_s=self.drain_grace_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config for logs and run folders; the API key is redacted."""
        out = asdict(self)
        if out["api_key"] is not None:
            out["api_key"] = "<redacted>"
        return out

    # loading ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, args: argparse.Namespace | Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "ServerConfig":
        """Defaults < ``LCMSERVE_*`` variables in ``environ`` < flags in ``args`` (None: not given)."""
        given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for f in fields(cls):
            env_name = ENV_PREFIX + f.name.upper()
            flag = "--" + f.name.replace("_", "-")
            if environ is not None and environ.get(env_name) is not None:
                values[f.name] = _parse(f, environ[env_name], env_name)
                sources[f.name] = env_name
            if given.get(f.name) is not None:
                raw = given[f.name]
                if isinstance(raw, list):  # a repeatable flag: one entry per use
                    raw = ",".join(raw)
                values[f.name] = _parse(f, raw, flag) if isinstance(raw, str) else raw
                sources[f.name] = flag
        try:
            return cls(**values)
        except InvalidInputError as exc:
            source = sources.get(exc.param or "")
            if source is None:
                raise
            raise InvalidInputError(f"{source}: {exc.message}", param=exc.param) from None

    def with_overrides(self, **changes: Any) -> "ServerConfig":
        return replace(self, **changes)


def adapter_paths(entries: tuple[str, ...]) -> dict[str, str]:
    """NAME=PATH entries as name -> path, in the order given; a malformed or repeated entry is an error naming it."""
    paths: dict[str, str] = {}
    for entry in entries:
        name, equals, path = entry.partition("=") if isinstance(entry, str) else ("", "", "")
        name, path = name.strip(), path.strip()
        if not equals or not NAME_PATTERN.fullmatch(name) or not path:
            raise InvalidInputError.out_of_range(
                "adapters", entry, "NAME=PATH, NAME of 1-64 letters, digits, '_', '.' or '-' (e.g. sketch=./lora)")
        if name in paths:
            raise InvalidInputError.out_of_range("adapters", entry, f"a name not given before ({name!r} is)")
        paths[name] = path
    return paths


def port_error(name: str, host: str, port: int, exc: OSError | str) -> InvalidInputError:
    """A port that cannot be listened on, as one line naming the flag and the variable that move it."""
    flag, env = "--" + name.replace("_", "-"), ENV_PREFIX + name.upper()
    what = "gRPC port" if name == "grpc_port" else "HTTP port"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        why = "is in use by another program"
    else:
        why = f"cannot be listened on ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc})"
    fix = f"pass a free one with {flag} (or {env})"
    if name == "grpc_port":
        fix += f", or {flag} 0 to turn gRPC off"
    return InvalidInputError(f"{what} {port} on {host} {why}: {fix}")


def _kind(f) -> str:
    annotation = str(f.type)
    for kind in ("tuple[int", "tuple[str", "bool", "float", "int"):
        if annotation.startswith(kind):
            return kind
    return "str"


def _parse(f, raw: str, source: str) -> Any:
    """One variable or flag's text as the field's type; the error names the source."""
    kind, text = _kind(f), raw.strip()
    try:
        if kind == "bool":
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "tuple[int":
            return tuple(int(x) for x in text.split(",") if x.strip())
        if kind == "tuple[str":
            return tuple(x.strip() for x in text.split(",") if x.strip())
    except ValueError:
        expected = {"bool": "true or false", "int": "an integer", "float": "a number",
                    "tuple[int": "a comma list of integers", "tuple[str": "a comma list"}[kind]
        raise InvalidInputError(f"{source}: {f.name} must be {expected}; got {raw!r}", param=f.name) from None
    return text or None if f.default is None else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field; every default is None so that only given flags override."""
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, tuple):
            default = ",".join(str(x) for x in default)
        shown = "<unset>" if default is None or f.name == "api_key" else default
        help_text = f"{f.metadata['doc']} (default {shown}; env {ENV_PREFIX}{f.name.upper()})"
        if _kind(f) == "bool":
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif "alias" in f.metadata:  # repeatable under its singular name; the plural takes a comma list too
            parser.add_argument(flag, f.metadata["alias"], dest=f.name, default=None, action="append",
                                metavar=f.name.upper(), help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


__all__ = ["ENV_PREFIX", "ServerConfig", "adapter_paths", "add_arguments", "port_error"]
