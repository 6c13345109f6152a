"""TensorRT optimisation profiles: which (batch, sequence) ranges an engine is built for.

Activation memory is sized from each profile's largest shape, so long sequences get their own
profile with a small batch. Pure Python: planned at export, selected per batch at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from m3rt.errors import InputError

MIN_SEQUENCE = 2  # <s> and </s>


@dataclass(frozen=True)
class Profile:
    name: str
    max_batch: int
    max_sequence: int
    min_sequence: int = MIN_SEQUENCE

    @property
    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) shapes of `input_ids` and `attention_mask`."""
        opt_sequence = max(self.min_sequence, self.max_sequence // 2)
        return (1, self.min_sequence), (self.max_batch, opt_sequence), (self.max_batch, self.max_sequence)

    def covers(self, batch: int, sequence: int) -> bool:
        return self.min_sequence <= sequence <= self.max_sequence and batch <= self.max_batch


def default_profiles(token_budget: int = 16384, max_length: int = 8192) -> list[Profile]:
    """Short (queries, <= 64 tokens), medium (passages, <= 512) and long (<= max_length) inputs,
    each with as many rows as the token budget allows."""
    if token_budget < max_length:
        raise InputError(f"token budget {token_budget} is below max_length {max_length}")
    planned = []
    lower = MIN_SEQUENCE
    for name, length in (("short", 64), ("medium", 512), ("long", max_length)):
        length = min(length, max_length)
        if length < lower:
            continue
        planned.append(Profile(name, max(1, token_budget // length), length, lower))
        lower = length + 1
    return planned


_SPEC = re.compile(r"^(?:(?P<name>[a-z][\w-]*)=)?(?P<batch>\d+)x(?P<seq>\d+)$")


def parse_profiles(spec: str, max_length: int = 8192) -> list[Profile]:
    """`"64x64,16x512,1x8192"` (or with names: `"short=64x64,..."`): max batch x max sequence each,
    in increasing sequence length; each profile starts where the previous one ends."""
    profiles: list[Profile] = []
    lower = MIN_SEQUENCE
    for index, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        match = _SPEC.match(part)
        if not match:
            raise InputError(f"profile {part!r} is not BATCHxSEQUENCE (e.g. 16x512)")
        batch, sequence = int(match["batch"]), int(match["seq"])
        if batch < 1 or not lower <= sequence <= max_length:
            raise InputError(f"profile {part!r}: batch must be >= 1 and sequence in [{lower}, {max_length}]")
        profiles.append(Profile(match["name"] or f"p{index}", batch, sequence, lower))
        lower = sequence + 1
    if not profiles:
        raise InputError("no profiles given")
    if profiles[-1].max_sequence < max_length:
        raise InputError(f"the last profile must reach max_length {max_length}")
    return profiles


def select_profile(profiles: list[Profile], sequence: int) -> int:
    """Index of the profile for this padded sequence length (rows beyond its max batch are split)."""
    for index, profile in enumerate(profiles):
        if profile.min_sequence <= sequence <= profile.max_sequence:
            return index
    raise InputError(f"no engine profile covers sequence length {sequence}")
