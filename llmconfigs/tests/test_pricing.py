"""Cost of a call from per-million-token prices: exact Decimals, each side priced by its own tokens."""
from decimal import Decimal

from llmconfigs.pricing import PRICE_UNIT, usage_cost


def test_each_side_is_priced_by_its_own_tokens_and_price_per_million():
    cost = usage_cost(input_price_per_million=Decimal("2.50"), output_price_per_million=Decimal("10"),
                      currency="EUR", prompt_tokens=1200, completion_tokens=300)

    assert (cost.prompt_unit_price, cost.completion_unit_price) == (Decimal("2.50"), Decimal("10"))
    assert cost.price_unit == Decimal("0.000001")
    assert cost.prompt_price == Decimal("0.0030000")  # 1200 * 2.50 / 1e6
    assert cost.completion_price == Decimal("0.0030000")  # 300 * 10 / 1e6
    assert cost.total_price == Decimal("0.0060000")
    assert cost.currency == "EUR"


def test_prices_are_kept_to_seven_decimals_half_even():
    cost = usage_cost(input_price_per_million=Decimal("0.15"), output_price_per_million=Decimal("0.6"),
                      currency="USD", prompt_tokens=7, completion_tokens=3)

    assert cost.prompt_price == Decimal("0.0000010")  # 0.00000105 rounds half-even to 0.0000010
    assert cost.completion_price == Decimal("0.0000018")
    assert cost.total_price == Decimal("0.0000028")
    assert str(cost.total_price) == "0.0000028"


def test_an_unpriced_config_costs_nothing_in_usd_by_default():
    cost = usage_cost(input_price_per_million=None, output_price_per_million=None, currency="",
                      prompt_tokens=1000, completion_tokens=1000)

    assert (cost.prompt_unit_price, cost.completion_unit_price) == (Decimal(0), Decimal(0))
    assert (cost.prompt_price, cost.completion_price, cost.total_price) == (Decimal(0), Decimal(0), Decimal(0))
    assert cost.price_unit == PRICE_UNIT and cost.currency == "USD"


def test_one_side_unpriced_still_prices_the_other():
    cost = usage_cost(input_price_per_million=None, output_price_per_million=Decimal("4"), currency="USD",
                      prompt_tokens=500, completion_tokens=250)

    assert (cost.prompt_price, cost.completion_price, cost.total_price) == (
        Decimal("0.0000000"), Decimal("0.0010000"), Decimal("0.0010000"))
