"""The `claims:` block: published claims the report checks against the sweep's variants (report/claims.py).

A claim is directional (`better: [variants]`, `than: [variants]`: each of `better` beats each of `than`)
or an equivalence (`within: [variants]`, `margin: points`: every pair within noise, each pair's interval
inside +-margin), with the `source` and `statement` it reports. Every member names a variant that
space.variant searches. The margin is required: what "within noise" tolerates is the claim's to say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lora_sweep.config.checks import ConfigError, _is_number, _require

DIRECTIONAL, EQUIVALENCE = "directional", "equivalence"
KEYS = ("source", "statement", "better", "than", "within", "margin")
_SHAPES = ("either `better: [variants]` and `than: [variants]` (each of better beats each of than), or "
           "`within: [at least 2 variants]` with `margin: points` (all within noise of each other)")


@dataclass(frozen=True)
class Claim:
    name: str
    source: str
    statement: str
    better: tuple[str, ...] = ()
    than: tuple[str, ...] = ()
    within: tuple[str, ...] = ()
    margin: float | None = None   # equivalence: points of the metric (accuracy: percentage points)

    @property
    def kind(self) -> str:
        return EQUIVALENCE if self.within else DIRECTIONAL

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants the claim compares, each once: better then than, or within, in the order written."""
        return self.within or (*self.better, *self.than)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """Indices into `variants` compared, first minus second: each of better against each of than, or
        every pair of within."""
        if self.within:
            n = len(self.within)
            return tuple((i, j) for i in range(n) for j in range(i + 1, n))
        k = len(self.better)
        return tuple((i, k + j) for i in range(k) for j in range(len(self.than)))


def parse_claims(raw: Any, variants: Mapping[str, Any], space: Mapping[str, str]) -> tuple[Claim, ...]:
    """The validated claims of a config's `claims:` mapping (null or {}: none), in the order written."""
    _require(raw is None or isinstance(raw, Mapping), "claims", raw,
             "null or a mapping {claim name: {source, statement, better/than or within/margin}}")
    if not raw:
        return ()
    searched = variant_choices(space.get("variant"))
    return tuple(_claim(str(name), body, variants, searched) for name, body in raw.items())


def _claim(name: str, body: Any, variants: Mapping[str, Any], searched: tuple[str, ...]) -> Claim:
    where = f"claims.{name}"
    _require(isinstance(body, Mapping), where, body, "a mapping with source, statement and " + _SHAPES)
    unknown = sorted(set(map(str, body)) - set(KEYS))
    if unknown:
        raise ConfigError(f"Unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}. "
                          f"Allowed in {where}: {', '.join(KEYS)}.")
    for key in ("source", "statement"):
        value = body.get(key)
        _require(isinstance(value, str) and value.strip(), f"{where}.{key}", value, "a non-empty string")
    given = [k for k in ("better", "than", "within") if k in body]
    _require(given in (["better", "than"], ["within"]), where, {k: body[k] for k in given}, _SHAPES)
    lists = {k: _members(f"{where}.{k}", body[k], variants, searched) for k in given}
    if "within" in lists:
        _require(len(lists["within"]) >= 2, f"{where}.within", list(lists["within"]),
                 "at least 2 distinct variants (an equivalence compares them with each other)")
        _require("margin" in body, f"{where}.margin", None,
                 "a number of points > 0 with within (every pair's interval must lie inside +-margin)")
        margin = body["margin"]
        _require(_is_number(margin) and margin > 0, f"{where}.margin", margin,
                 "a number of points > 0 (accuracy: percentage points)")
        return Claim(name, body["source"].strip(), body["statement"].strip(), within=lists["within"],
                     margin=float(margin))
    _require("margin" not in body, f"{where}.margin", body.get("margin"),
             "left out with better/than (a margin belongs to a `within` claim)")
    overlap = [v for v in lists["better"] if v in lists["than"]]
    _require(not overlap, f"{where}.than", list(lists["than"]),
             f"variants not also in {where}.better (both: {', '.join(overlap)})")
    return Claim(name, body["source"].strip(), body["statement"].strip(), better=lists["better"],
                 than=lists["than"])


def _members(field: str, value: Any, variants: Mapping[str, Any], searched: tuple[str, ...]) -> tuple[str, ...]:
    _require(isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
             and len(set(value)) == len(value), field, value, "a non-empty list of distinct variant names")
    known = ", ".join(searched) or "none: space.variant is not choice(...)"
    for v in value:
        why = "not searched in space.variant" if v in variants else "not defined under `variants`"
        _require(v in variants and v in searched, field, list(value),
                 f"names of variants that space.variant searches ({known}); {v!r} is {why} (to search fewer "
                 f"variants, drop the claim too: ~{field.rsplit('.', 1)[0]})")
    return tuple(value)


def variant_choices(expr: Any) -> tuple[str, ...]:
    """The variant names of space.variant's `choice(a, b, ...)`; () when it is unset or not a choice (the
    search stage words that error)."""
    if not isinstance(expr, str):
        return ()
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(f"variant={expr}").value()
    except HydraException:
        return ()
    return tuple(str(v) for v in value.list) if isinstance(value, ChoiceSweep) else ()
