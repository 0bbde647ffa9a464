"""Cost of a call from a config's per-million-token prices, in Dify's usage shape (prices as Decimals)."""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

PRICE_UNIT = Decimal("0.000001")  # prices are stored per million tokens
QUANT = Decimal("0.0000001")


@dataclass(frozen=True)
class Cost:
    prompt_unit_price: Decimal
    completion_unit_price: Decimal
    price_unit: Decimal
    prompt_price: Decimal
    completion_price: Decimal
    total_price: Decimal
    currency: str


def usage_cost(
    *,
    input_price_per_million: Decimal | None,
    output_price_per_million: Decimal | None,
    currency: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> Cost:
    prompt_unit = Decimal(input_price_per_million or 0)
    completion_unit = Decimal(output_price_per_million or 0)
    prompt_price = (prompt_unit * prompt_tokens * PRICE_UNIT).quantize(QUANT)
    completion_price = (completion_unit * completion_tokens * PRICE_UNIT).quantize(QUANT)
    return Cost(
        prompt_unit_price=prompt_unit,
        completion_unit_price=completion_unit,
        price_unit=PRICE_UNIT,
        prompt_price=prompt_price,
        completion_price=completion_price,
        total_price=prompt_price + completion_price,
        currency=currency or "USD",
    )
