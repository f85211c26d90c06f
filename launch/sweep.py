"""`--sweep key=v1,v2,...` (repeatable): the grid of runs a job array trains."""

from __future__ import annotations

import hashlib
import itertools
import re

from fastvae.errors import UserError


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: `optim.betas=[0.5,0.9],[0.9,0.99]` has two values."""
    values, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += ch
    values.append(current)
    return values


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """`optim.lr=1e-3,5e-4` -> ("optim.lr", ["1e-3", "5e-4"])."""
    key, sep, raw = spec.partition("=")
    values = split_values(raw) if sep else []
    if not key.strip() or not values or any(not v.strip() for v in values):
        raise UserError(f"--sweep '{spec}': expected key=value1,value2,... (e.g. optim.lr=1e-3,5e-4)")
    if len(set(values)) != len(values):
        raise UserError(f"--sweep '{spec}': a value is repeated; expected distinct values")
    return key.strip(), values


def run_tag(overrides: list[str]) -> str:
    """A folder- and W&B-safe name for one combination: `optim.lr=0.001_model.latent_dim=8`."""
    return "_".join(re.sub(r"[^A-Za-z0-9._=-]+", "-", o).strip("-") for o in overrides)


def run_tags(combos: list[list[str]]) -> list[str]:
    """run_tag of each combination, made unique: values that sanitize alike (`/d/a b`, `/d/a-b`) get a
    short hash of their overrides, so no two runs share a folder."""
    tags = [run_tag(combo) for combo in combos]
    return [f"{tag}-{hashlib.sha1(repr(combo).encode()).hexdigest()[:8]}" if tags.count(tag) > 1 else tag
            for tag, combo in zip(tags, combos)]


def expand(sweeps: list[str]) -> list[list[str]]:
    """Every combination of the sweep values, as override lists ([[]] without sweeps)."""
    parsed = [parse_sweep(s) for s in sweeps]
    keys = [k for k, _ in parsed]
    repeated = {k for k in keys if keys.count(k) > 1}
    if repeated:
        raise UserError(f"--sweep key '{sorted(repeated)[0]}' given twice; expected each key once")
    grids = [[f"{k}={v}" for v in values] for k, values in parsed]
    return [list(combo) for combo in itertools.product(*grids)]
