"""The NHS Number: normalisation, the modulus-11 check, and masking for logs.

An NHS Number is ten digits; the tenth is a modulus-11 check digit over the first nine
(weights 10..2; 11 -> 0; 10 -> invalid). The ten repeated-digit numbers pass the check but
are placeholders and are refused. The 999 range is NHS England's test range, accepted only
while the setting allows it (production turns it off).
"""

from __future__ import annotations

import re
from typing import NewType

NhsNumber = NewType("NhsNumber", str)

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
NHS_NUMBER_OID = "2.16.840.1.113883.2.1.4.1"
TEST_RANGE_PREFIX = "999"

_FORMATTING = re.compile(r"[\s\-]")
_PLACEHOLDERS = frozenset(str(d) * 10 for d in range(10))


class InvalidNhsNumberError(ValueError):
    """A value that was given as an NHS Number and is not a valid one."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid NHS Number {mask(value)}: {reason}")
        self.reason = reason


def check_digit(first_nine: str) -> int | None:
    """The modulus-11 check digit for nine digits, or None when no digit can be valid (10)."""
    total = sum(int(d) * w for d, w in zip(first_nine, range(10, 1, -1), strict=True))
    digit = 11 - total % 11
    if digit == 11:
        return 0
    return None if digit == 10 else digit


def normalise(value: str) -> str:
    """Drop the spaces and dashes that are only formatting (`943 476 5919`, `943-476-5919`)."""
    return _FORMATTING.sub("", value)


def parse_nhs_number(value: str, *, accept_test_numbers: bool = True) -> NhsNumber:
    """Return the normalised NHS Number or raise InvalidNhsNumberError saying why."""
    digits = normalise(value)
    if len(digits) != 10 or not digits.isascii() or not digits.isdigit():
        raise InvalidNhsNumberError(value, "not ten digits")
    if digits in _PLACEHOLDERS:
        raise InvalidNhsNumberError(value, "a repeated-digit placeholder")
    if check_digit(digits[:9]) != int(digits[9]):
        raise InvalidNhsNumberError(value, "fails the modulus-11 check")
    if not accept_test_numbers and digits.startswith(TEST_RANGE_PREFIX):
        raise InvalidNhsNumberError(value, "in the 999 test range, which this service refuses")
    return NhsNumber(digits)


def is_valid(value: str, *, accept_test_numbers: bool = True) -> bool:
    try:
        parse_nhs_number(value, accept_test_numbers=accept_test_numbers)
    except InvalidNhsNumberError:
        return False
    return True


def mask(value: str | None) -> str:
    """The form an NHS Number may take in a log line: at most its last four digits."""
    if not value:
        return "<none>"
    digits = normalise(value)
    return "******" + digits[-4:] if len(digits) >= 4 else "****"


_TEN_DIGITS = re.compile(r"(?<!\d)(\d{3}[ \-]?\d{3}[ \-]?\d{4})(?!\d)")


def redact_text(text: str) -> str:
    """Mask anything in free text that looks like a valid NHS Number (for log records)."""

    def _mask(match: re.Match[str]) -> str:
        candidate = match.group(1)
        return mask(candidate) if is_valid(candidate) else candidate

    return _TEN_DIGITS.sub(_mask, text)
