"""NHS Number: normalisation, modulus-11, placeholders, the test range, masking."""

from __future__ import annotations

import pytest

from locator.core.nhs_number import (
    InvalidNhsNumberError,
    check_digit,
    is_valid,
    mask,
    parse_nhs_number,
    redact_text,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9434765919", "9434765919"),
        ("943 476 5919", "9434765919"),
        ("943-476-5919", "9434765919"),
        (" 9434765919 ", "9434765919"),
        ("9990000018", "9990000018"),
        ("9990000026", "9990000026"),
        ("4010232137", "4010232137"),
    ],
)
def test_valid_numbers_are_normalised(value: str, expected: str) -> None:
    assert parse_nhs_number(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("9434765918", "modulus-11"),
        ("943476591", "ten digits"),
        ("94347659190", "ten digits"),
        ("94347659A9", "ten digits"),
        ("", "ten digits"),
        ("\uff11" * 10, "ten digits"),  # full-width digits are not ASCII digits
        ("0000000000", "placeholder"),
        ("1111111111", "placeholder"),
        ("9999999999", "placeholder"),
        ("1000000010", "modulus-11"),  # check digit would be 10: no valid number
    ],
)
def test_invalid_numbers_say_why(value: str, reason: str) -> None:
    with pytest.raises(InvalidNhsNumberError) as info:
        parse_nhs_number(value)
    assert reason in info.value.reason
    assert value[:6] not in str(info.value) or len(value) < 6


def test_every_repeated_digit_placeholder_passes_mod11_but_is_refused() -> None:
    for d in "0123456789":
        number = d * 10
        if check_digit(number[:9]) == int(number[9]):
            assert not is_valid(number)


def test_test_range_follows_the_setting() -> None:
    assert is_valid("9990000018", accept_test_numbers=True)
    with pytest.raises(InvalidNhsNumberError, match="test range"):
        parse_nhs_number("9990000018", accept_test_numbers=False)
    assert is_valid("9434765919", accept_test_numbers=False)


def test_check_digit_matches_the_published_algorithm() -> None:
    # 943 476 591: 9*10+4*9+3*8+4*7+7*6+6*5+5*4+9*3+1*2 = 299; 299 % 11 = 2; 11-2 = 9
    assert check_digit("943476591") == 9


def test_mask_keeps_at_most_the_last_four_digits() -> None:
    assert mask("9434765919") == "******5919"
    assert mask("943 476 5919") == "******5919"
    assert "943476" not in mask("9434765919")
    assert mask(None) == "<none>"


def test_redact_text_masks_valid_numbers_only() -> None:
    text = "look-up 9434765919 and 943 476 5919; order 1234567890; ts 20240301093000"
    redacted = redact_text(text)
    assert "9434765919" not in redacted and "943 476 5919" not in redacted
    assert "******5919" in redacted
    assert "20240301093000" in redacted
