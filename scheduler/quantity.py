"""Kubernetes resource quantities (`100m`, `64Mi`, `1.5Gi`, `1e3`) as exact integers.

`kubernetes.utils.parse_quantity` exists but accepts what the API server rejects (`NaN`, `Infinity`, `1_000`,
surrounding spaces, `1e3Mi`), so the grammar is checked here first (apimachinery's `resource.Quantity`) and the
arithmetic stays in `Decimal`. Rounding follows the caller's side of the ledger: requests round up, as
`Quantity.MilliValue` does, capacities round down, so the model never promises more than exists.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from functools import lru_cache

__all__ = ["NANO", "parse_quantity", "shown", "to_count", "to_mib", "to_milli", "to_nano"]

_PATTERN = re.compile(
    r"(?P<number>[+-]?(?:\d+\.?\d*|\.\d+))"
    r"(?:(?P<exp>[eE][+-]?\d+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?"
)
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_MAX_EXPONENT = 30  # beyond any real resource; keeps `1e999999999` from turning into a huge integer
_MAX_CHARS = 64  # the same for digits: a million of them overflow `Decimal`'s exponent range once scaled
_MIB = Decimal(1 << 20)
NANO = 10**9
"""Units per base unit in `to_nano`: the API server keeps quantities to nine decimals, rounding up."""
_LIMIT = Decimal(2**63 - 1)


def shown(value: object, limit: int = 40) -> str:
    """A refused value as an error text quotes it: a short repr of a scalar, the type of anything else (a list
    nested a thousand levels deep has no repr, and a megabyte string has no place in a message)."""
    if not isinstance(value, str | int | float | Decimal):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def parse_quantity(value: str | int | float | Decimal) -> Decimal:
    """The exact value of a quantity in base units (cores, bytes, devices). Raises ValueError on garbage."""
    if type(value) is str:
        return _parse_text(value)
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}: a boolean is not a quantity")
    if isinstance(value, int | Decimal):
        number = Decimal(value)
        if not number.is_finite():
            raise ValueError(f"invalid quantity {value!r}")
        return number
    if isinstance(value, float):
        value = repr(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid quantity {shown(value)}: expected a string such as '500m' or '4Gi'")
    return _parse_text(value)


@lru_cache(maxsize=4096)
def _parse_text(value: str) -> Decimal:
    """Cached: a cluster's pods repeat a handful of quantity strings, and the watch parses every one."""
    if len(value) > _MAX_CHARS:
        raise ValueError(f"invalid quantity {shown(value)}: longer than {_MAX_CHARS} characters")
    match = _PATTERN.fullmatch(value)
    if match is None:
        raise ValueError(
            f"invalid quantity {shown(value)}: expected a number with an optional suffix (m, k, Mi, Gi, e3)"
        )
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only valid decimals
        raise ValueError(f"invalid quantity {value!r}") from exc
    if match["exp"]:
        exponent = int(match["exp"][1:])
        if abs(exponent) > _MAX_EXPONENT:
            raise ValueError(f"invalid quantity {value!r}: exponent out of range")
        return number.scaleb(exponent)
    suffix = match["suffix"]
    if suffix in _BINARY:
        return number * (1 << (10 * _BINARY[suffix]))
    if suffix:
        return number.scaleb(_DECIMAL[suffix])
    return number


def to_nano(value: str | int | float | Decimal) -> int:
    """Billionths of the base unit, rounded up as the API server rounds: exact integer sums and maxima."""
    if type(value) is str:
        return _nano_text(value)
    return int((parse_quantity(value) * NANO).to_integral_value(rounding=ROUND_CEILING))


@lru_cache(maxsize=4096)
def _nano_text(value: str) -> int:
    return int((_parse_text(value) * NANO).to_integral_value(rounding=ROUND_CEILING))


def _integral(value: Decimal, original: object, rounding: str, what: str) -> int:
    if value < 0:
        raise ValueError(f"invalid {what} {original!r}: must not be negative")
    if value > _LIMIT:
        raise ValueError(f"invalid {what} {original!r}: too large")
    return int(value.to_integral_value(rounding=rounding))


def to_milli(value: str | int | float | Decimal, round_up: bool = True) -> int:
    """Thousandths of the base unit: CPU `100m` -> 100, `2` -> 2000."""
    return _integral(parse_quantity(value) * 1000, value, ROUND_CEILING if round_up else ROUND_FLOOR, "quantity")


def to_mib(value: str | int | float | Decimal, round_up: bool = True) -> int:
    """Mebibytes of a byte quantity: `64Mi` -> 64, `1.5Gi` -> 1536, `1G` (953.67 MiB) -> 954, or 953 rounding down."""
    return _integral(parse_quantity(value) / _MIB, value, ROUND_CEILING if round_up else ROUND_FLOOR, "memory")


def to_count(value: str | int | float | Decimal) -> int:
    """A device count (`nvidia.com/gpu: 2`): must be a whole, non-negative number."""
    number = parse_quantity(value)
    if number != number.to_integral_value():
        raise ValueError(f"invalid count {value!r}: must be a whole number")
    return _integral(number, value, ROUND_FLOOR, "count")
