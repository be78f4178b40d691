"""Personal data redaction (emails, phone numbers incl. Indian formats, IP addresses, Aadhaar and PAN
numbers) and block lists matched on word boundaries that work inside Indic scripts.

Emails and IPv4 addresses use datatrove's `PIIFormatter` patterns and IP validator; phone numbers,
Aadhaar and PAN are ours. Every pattern is matched on a copy of the text in which each Unicode decimal
digit of any script (Devanagari ०-९, Bengali ০-৯, Gurmukhi, Tamil, fullwidth, ...) is replaced by its
ASCII digit, one character for one, so positions are the same in both: a number written in Devanagari
or Bengali digits (०९८७६५४३२१०, ০৩৬১ ২৩৪৫৬৭৮, an email address or IP with such digits) is redacted
exactly when the same number in ASCII digits is, and nothing else is.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import regex

from slmforge.curate.scripts import WORD_CHAR_CLASS
from slmforge.errors import SlmforgeError

PII_KINDS = ("email", "ip", "aadhaar", "pan", "phone")  # applied in this order (longest numbers first)

# The patterns see ASCII digits only: `fold_digits` turns every script's digits into ASCII first.
_LEAD_6_9 = "[6-9]"
_LEAD_2_9 = "[2-9]"
_PHONE = "|".join([
    # Indian mobile: optional +91 / 0091 / 0, ten digits starting 6-9, maybe split 5+5
    rf"(?:(?:\+|00)\s?91[\s-]?|0)?{_LEAD_6_9}\d{{4}}[\s-]?\d{{5}}",
    # Indian landline with its STD code: 011-23456789, (022) 2345 6789, 0361 2345678
    r"\(0\d{2,4}\)\s?\d{3,4}[\s-]?\d{4}",
    r"0\d{2,4}[\s-]\d{3,4}[\s-]?\d{4}",
    # any other international number: +49 30 1234567, +1 (415) 555-0100
    r"\+\d{1,3}(?:[\s-]?\(?\d{1,4}\)?){2,5}",
])
_PATTERNS = {
    "aadhaar": rf"(?<!\d){_LEAD_2_9}\d{{3}}[\s-]?\d{{4}}[\s-]?\d{{4}}(?!\d)",
    # PAN: 5 letters (the 4th says the holder type: Person, Company, Hindu undivided family, ...),
    # 4 digits, a check letter
    "pan": r"(?<![A-Za-z0-9])[A-Z]{3}[ABCFGHJLPT][A-Z][0-9]{4}[A-Z](?![A-Za-z0-9])",
    "phone": rf"(?<![\w+])(?:{_PHONE})(?!\d)",
}
DEFAULT_PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "aadhaar": "<AADHAAR>", "pan": "<PAN>",
                        "phone": "<PHONE>"}


_NON_ASCII_DIGIT = re.compile(r"[^\x00-\x7f]")  # only these can be non-ASCII decimal digits


def _ascii_digit(match: re.Match) -> str:
    char = match.group(0)
    value = unicodedata.decimal(char, None)
    return char if value is None else str(value)


def fold_digits(text: str) -> str:
    """`text` with every Unicode decimal digit (category Nd, any script) replaced by its ASCII digit;
    same length, so a match's span in the folded text is its span in `text`."""
    if text.isascii():
        return text
    return _NON_ASCII_DIGIT.sub(_ascii_digit, text)


def _phone_digits_ok(match: str) -> bool:
    digits = sum(1 for c in match if c.isdigit())
    return 8 <= digits <= 15


class Redactor:
    """Replaces each kind of personal data with its placeholder and counts what it replaced."""

    def __init__(self, kinds: tuple[str, ...] | list[str] = PII_KINDS, only_public_ips: bool = False,
                 placeholders: dict[str, str] | None = None):
        from datatrove.pipeline.formatters.pii import PIIFormatter, public_ip_validator

        reference = PIIFormatter(only_remove_public_ips=only_public_ips)
        compiled: dict[str, tuple[re.Pattern, Callable[[str], bool] | None]] = {
            "email": (reference.emails_replacer.regex, None),
            "ip": (reference.ip_replacer.regex, partial(public_ip_validator, public_only=only_public_ips)),
            "aadhaar": (re.compile(_PATTERNS["aadhaar"]), None),
            "pan": (re.compile(_PATTERNS["pan"]), None),
            "phone": (re.compile(_PATTERNS["phone"]), _phone_digits_ok),
        }
        names = {**DEFAULT_PLACEHOLDERS, **(placeholders or {})}
        self.rules = [(kind, *compiled[kind], names[kind]) for kind in PII_KINDS if kind in kinds]

    def redact(self, text: str) -> tuple[str, Counter]:
        """(text with placeholders, replacements per kind). Matching runs on `fold_digits(text)`; what
        is not replaced is copied from `text` unchanged (its own digits kept)."""
        counts: Counter = Counter()
        folded = fold_digits(text)
        for kind, pattern, valid, placeholder in self.rules:
            pieces, folded_pieces, last = [], [], 0
            for match in pattern.finditer(folded):
                if valid is not None and not valid(match.group(0)):
                    continue
                start, end = match.span()
                pieces += [text[last:start], placeholder]
                folded_pieces += [folded[last:start], placeholder]
                last = end
                counts[kind] += 1
            if pieces:
                unfolded = folded is text  # no non-ASCII digit in it: one string serves as both
                text = "".join(pieces) + text[last:]
                folded = text if unfolded else "".join(folded_pieces) + folded[last:]
        return text, counts

    def find(self, text: str) -> list[tuple[str, str]]:
        """Every (kind, match) still in `text` (as written there): what a test expects to be empty
        after `redact`."""
        found = []
        folded = fold_digits(text)
        for kind, pattern, valid, _ in self.rules:
            found += [(kind, text[m.start():m.end()]) for m in pattern.finditer(folded)
                      if valid is None or valid(m.group(0))]
        return found


# ---------------------------------------------------------------- block lists


def normalize_term(term: str) -> str:
    return " ".join(unicodedata.normalize("NFC", term).split())


def read_terms(path: str | Path) -> list[str]:
    """One word or phrase per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SlmforgeError(f"{path}: block list not found") from None
    except UnicodeDecodeError as e:
        raise SlmforgeError(f"{path}: block list is not UTF-8 (byte {e.start})") from None
    return [normalize_term(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def compile_terms(terms: list[str]) -> regex.Pattern | None:
    """One pattern for all terms: case-insensitive (full Unicode case folding), NFC, any run of
    whitespace inside a phrase, and no letter, mark or digit directly before or after (so that कम does
    not match inside कमी, and गंदी, which ends in a vowel sign, still matches as a word)."""
    terms = sorted({normalize_term(t) for t in terms if t.strip()}, key=len, reverse=True)
    if not terms:
        return None
    body = "|".join(r"\s+".join(regex.escape(part) for part in t.split()) for t in terms)
    return regex.compile(rf"(?<!{WORD_CHAR_CLASS})(?:{body})(?!{WORD_CHAR_CLASS})",
                         regex.IGNORECASE | regex.FULLCASE | regex.V1)
