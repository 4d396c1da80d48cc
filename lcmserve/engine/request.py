"""What callers ask the engine for, and the checks that keep bad values out of it."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from lcmserve.errors import InvalidInputError, check_int

MIN_STEPS, MAX_STEPS = 1, 8
MAX_GUIDANCE = 50.0
MAX_SEED = 2**63 - 1
SIZE_MULTIPLE = 8
MAX_ADAPTERS = 4  # per row: each adds a low-rank product to every layer it targets
MAX_ADAPTER_SCALE = 4.0

AdapterItems = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Limits:
    """What one engine accepts; the server narrows these further for the public API."""

    min_size: int = 64
    max_size: int = 1024
    max_images: int = 64
    max_guidance: float = MAX_GUIDANCE

    def __post_init__(self) -> None:
        if not SIZE_MULTIPLE <= self.min_size <= self.max_size:
            raise ValueError(f"min_size/max_size must satisfy {SIZE_MULTIPLE} <= min <= max; got {self}")
        if self.max_images < 1:
            raise ValueError(f"max_images must be >= 1; got {self.max_images}")

    @classmethod
    def for_native_size(cls, native: int, **overrides) -> "Limits":
        """Sizes from a quarter to twice the model's native size, as multiples of 8."""
        low = max(SIZE_MULTIPLE, (native // 4) // SIZE_MULTIPLE * SIZE_MULTIPLE)
        return cls(min_size=low, max_size=native * 2, **overrides)


@dataclass(frozen=True)
class Row:
    """One image of a batch: its own prompt, seed and guidance scale (and negative prompt, for CFG models)."""

    prompt: str
    seed: int
    guidance_scale: float
    negative_prompt: str = ""
    """What classifier-free guidance steers away from, in place of the empty prompt; "" for none."""
    adapters: AdapterItems = ()
    """The LoRA adapters this row runs with: a mapping name -> scale, kept as sorted (name, scale) pairs."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", check_adapters(self.adapters))


@dataclass(frozen=True)
class GenerationRequest:
    """One caller's ask: n images of one prompt, sharing steps and resolution.

    Image i uses seed ``seed + i``, so every image can be reproduced alone. ``seed=None``
    draws a random seed; ``width``/``height`` of None take the model's native size.
    """

    prompt: str
    num_images: int = 1
    steps: int = 4
    guidance_scale: float | None = None
    """None: the model's default (8.0 for a distilled LCM, 1.0 for a base model with an LCM-LoRA)."""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    negative_prompt: str = ""
    """Classifier-free guidance models only (a base model with an LCM-LoRA): the prompt that guidance
    steers away from, in place of the empty one; it acts on images with guidance_scale > 1."""
    adapters: AdapterItems = ()
    """LoRA adapters loaded beside the model (``AdapterSet``): a mapping name -> scale, at most
    ``MAX_ADAPTERS``, each scale in [-MAX_ADAPTER_SCALE, MAX_ADAPTER_SCALE]; kept as sorted pairs."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", check_adapters(self.adapters))

    def rows(self) -> list[Row]:
        assert self.seed is not None, "resolve() the request first"
        return [Row(self.prompt, self.seed + i, self.guidance_scale, self.negative_prompt, self.adapters)
                for i in range(self.num_images)]


@dataclass(frozen=True)
class ResolvedRequest(GenerationRequest):
    """A request whose every field has been checked and filled in."""

    truncated: bool = field(default=False)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_steps(steps) -> int:
    return check_int("steps", steps, MIN_STEPS, MAX_STEPS)


def check_guidance(guidance_scale, limits: Limits) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise InvalidInputError.out_of_range("guidance_scale", guidance_scale, f"a number in [0, {limits.max_guidance}]")
    if not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= limits.max_guidance:
        raise InvalidInputError.out_of_range(
            "guidance_scale", guidance_scale, f"a finite number in [0, {limits.max_guidance}]"
        )
    return float(guidance_scale)


def check_size(name: str, value, limits: Limits) -> int:
    allowed = f"a multiple of {SIZE_MULTIPLE} in [{limits.min_size}, {limits.max_size}] for this model"
    if not _is_int(value) or value % SIZE_MULTIPLE or not limits.min_size <= value <= limits.max_size:
        raise InvalidInputError.out_of_range(name, value, allowed)
    return value


def check_seed(seed) -> int:
    if seed is None:
        return random.SystemRandom().randrange(0, 2**31)
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError.out_of_range("seed", seed, f"null or an integer in [0, {MAX_SEED}]")
    return seed


def check_num_images(num_images, limits: Limits) -> int:
    return check_int("num_images", num_images, 1, limits.max_images)


def check_prompt(prompt, param: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise InvalidInputError.out_of_range(param, prompt, "a string")
    if "\x00" in prompt:
        raise InvalidInputError(
            f"{param} must not contain NUL characters; found one at index {prompt.index(chr(0))}", param=param
        )
    try:  # the tokenizer takes valid Unicode only; JSON's "\ud800" escape makes a lone surrogate
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{param} is not valid Unicode: a lone surrogate U+{ord(prompt[exc.start]):04X} at index {exc.start} "
            "(send UTF-8 text; a JSON \\uD8xx escape needs its \\uDCxx pair)", param=param) from None
    return prompt


def check_negative_prompt(negative_prompt, guidance_mode: str) -> str:
    """A negative prompt needs classifier-free guidance: an LCM with a guidance embedding has no negative branch."""
    negative_prompt = check_prompt(negative_prompt, "negative_prompt")
    if negative_prompt and guidance_mode != "cfg":
        raise InvalidInputError(
            "negative_prompt: this model takes guidance as an embedding of w (a distilled LCM) and runs no "
            "unconditional branch for a negative prompt to replace; leave it empty, or serve a base model with an "
            "LCM-LoRA (--lora), which uses classifier-free guidance", param="negative_prompt")
    return negative_prompt


def check_adapters(adapters) -> AdapterItems:
    """A mapping name -> scale (or (name, scale) pairs) as sorted pairs, at most ``MAX_ADAPTERS``, scales in range."""
    allowed = (f"a mapping of at most {MAX_ADAPTERS} adapter names to scales in "
               f"[{-MAX_ADAPTER_SCALE:g}, {MAX_ADAPTER_SCALE:g}]")
    if adapters is None:
        return ()
    if isinstance(adapters, (str, bytes)):
        raise InvalidInputError.out_of_range("adapters", adapters, allowed)
    try:
        pairs = list(adapters.items() if isinstance(adapters, Mapping) else adapters)
        names = [name for name, _ in pairs]
    except (TypeError, ValueError):
        raise InvalidInputError.out_of_range("adapters", adapters, allowed) from None
    if len(pairs) > MAX_ADAPTERS or len(set(names)) != len(names):
        raise InvalidInputError.out_of_range("adapters", dict(pairs), allowed + " (each name once)")
    items = []
    for name, scale in pairs:
        ok = not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale)
        if not isinstance(name, str) or not name or not ok or abs(scale) > MAX_ADAPTER_SCALE:
            raise InvalidInputError(
                f"adapters: {name!r}: {scale!r} is not allowed; adapters must be {allowed}", param="adapters")
        items.append((name, float(scale)))
    return tuple(sorted(items))
