"""Personal data out of text before it is stored: e-mail addresses, phone numbers, payment-card numbers, IBANs,
IP addresses and user-configured patterns become typed placeholders (``<EMAIL>``, ``<PHONE>``, ``<CARD>``,
``<IBAN>``, ``<IP>``, ``<NAME>`` for a pattern called ``name``).

    scrub = Scrubber({"ticket": r"TCK-\\d{6}"})
    scrub("mail jo@example.com or call +44 20 7946 0958")   # 'mail <EMAIL> or call <PHONE>'

Candidates are found by pattern and confirmed by maintained validators where a checksum or numbering plan
exists: phone numbers by Google's libphonenumber (``phonenumbers``: valid numbers in international form, or
national form for ``regions``), card numbers by the Luhn check and IBANs by their ISO 7064 check digits
(``python-stdnum``), IP addresses by :mod:`ipaddress`. Overlapping finds keep the longest; a card number is never
left half-masked as a phone number.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Digit groups joined by single spaces or dashes: card numbers are looked for in windows of these groups.
DIGIT_RUN = re.compile(r"(?<![\w-])\d+(?:[ -]\d+)*(?![\w])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}", re.IGNORECASE)
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")
_DIGITS = re.compile(r"\d")
DEFAULT_REGIONS = ("US", "GB", "DE", "FR", "IN")


class PatternError(ValueError):
    """A user-configured pattern is not a valid regular expression (the message names it)."""


def _iban(text: str) -> Iterable[tuple[int, int]]:
    """IBAN candidates, each cut back from its longest reading until the check digits hold."""
    at = 0
    while match := IBAN.search(text, at):
        candidate, at = match.group(), match.start() + 1
        for end in range(len(candidate), 14, -1):
            if candidate[end - 1] != " " and stdnum_iban.is_valid(candidate[:end].upper()):
                yield match.start(), match.start() + end
                at = match.start() + end
                break


def _card(text: str) -> Iterable[tuple[int, int]]:
    """Windows of 13–19 digits over consecutive digit groups that pass the Luhn check (longest per start)."""
    for run in DIGIT_RUN.finditer(text):
        groups = [(m.start() + run.start(), m.end() + run.start()) for m in re.finditer(r"\d+", run.group())]
        i = 0
        while i < len(groups):
            best, digits = None, ""
            for j in range(i, len(groups)):
                digits += text[groups[j][0] : groups[j][1]]
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn.is_valid(digits) and len(set(digits)) > 1:
                    best = j
            if best is None:
                i += 1
                continue
            yield groups[i][0], groups[best][1]
            i = best + 1


def _ip(text: str) -> Iterable[tuple[int, int]]:
    for pattern in (IPV4, IPV6):
        for match in pattern.finditer(text):
            try:
                ipaddress.ip_address(match.group())
            except ValueError:
                continue
            yield match.span()


class Scrubber:
    """Replaces personal data in strings (and in the strings inside lists and dicts) with typed placeholders."""

    def __init__(self, patterns: Mapping[str, str] | None = None, *, regions: Iterable[str] = DEFAULT_REGIONS) -> None:
        self.regions = tuple(regions)
        self.patterns: dict[str, re.Pattern[str]] = {}
        for name, pattern in (patterns or {}).items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
                raise PatternError(f"PII pattern name {name!r}: use lower-case letters, digits and _ (≤ 32)")
            try:
                self.patterns[name] = re.compile(pattern)
            except re.error as exc:
                raise PatternError(f"PII pattern {name!r}: {pattern!r} is not a regular expression: {exc}") from None

    def _phones(self, text: str) -> Iterable[tuple[int, int]]:
        if len(_DIGITS.findall(text)) < 7:  # no phone number has fewer digits: skip the matcher
            return
        for region in self.regions:
            for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                yield match.start, match.end

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping ``(start, end, kind)`` finds. Where finds overlap, the stricter recognizer wins (a
        checksum or a fixed shape over the phone matcher's looser reading), then the longer find."""
        found: list[tuple[int, int, int, str]] = []
        numbers = _DIGITS.search(text) is not None  # every built-in kind but e-mail needs a digit (or IPv6 a colon)
        recognizers = [
            ("EMAIL", (m.span() for m in EMAIL.finditer(text)) if "@" in text else ()),
            ("IBAN", _iban(text) if numbers else ()),
            ("CARD", _card(text) if numbers else ()),
            ("IP", _ip(text) if numbers or ":" in text else ()),
            *(
                (name.upper(), (m.span() for m in p.finditer(text) if m.end() > m.start()))
                for name, p in self.patterns.items()
            ),
            ("PHONE", self._phones(text) if numbers else ()),
        ]
        for rank, (kind, spans) in enumerate(recognizers):
            found.extend((rank, start, end, kind) for start, end in spans)
        found.sort(key=lambda s: (s[0], s[1] - s[2], s[1]))
        kept: list[tuple[int, int, str]] = []
        for _, start, end, kind in found:
            if all(end <= s or start >= e for s, e, _ in kept):
                kept.append((start, end, kind))
        return sorted(kept)

    def __call__(self, text: str) -> str:
        spans = self.spans(text)
        if not spans:
            return text
        parts, at = [], 0
        for start, end, kind in spans:
            parts += [text[at:start], f"<{kind}>"]
            at = end
        parts.append(text[at:])
        return "".join(parts)

    def value(self, value: Any) -> Any:
        """``value`` with every string in it scrubbed (lists and dict values, recursively)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value
