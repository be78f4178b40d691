"""The quickstart corpus: real multilingual text that ships inside PyPI packages (no download at run time).

- `plone.app.locales`: the Plone CMS's human translations of its interface and help texts — about
  340 KB of Hindi, 150 KB of German, 25 KB of Bengali, with the English originals.
- `gflanguages` (Google Fonts): sample texts from the Universal Declaration of Human Rights for
  hundreds of languages — here it adds Assamese, and more Hindi, Bengali, English and German.

Both are installed by `pip install "slmforge[demo]"`. The text is read from the installed packages
at run time and written to plain files, one sentence per line; nothing is vendored in this repo.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from slmforge.errors import SlmforgeError

# language -> (Plone locale folder or None, gflanguages id)
LANGUAGES = {
    "hi": ("hi", "hi_Deva"),
    "en": (None, "en_Latn"),  # English comes from the msgids / defaults of every catalogue
    "de": ("de", "de_Latn"),
    "bn": ("bn", "bn_Beng"),
    "as": (None, "as_Beng"),  # Plone has no Assamese catalogue
}

# Interpolation markers and markup that are not prose: ${name}, %(name)s, %s, {0}, <b>, &nbsp;
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}|\$\w+|%\([^)]*\)[a-z]|%[sd]|\{[^{}]*\}|<[^>]+>|&[a-z]+;")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.\-]+$")  # Plone message ids like `help_absolute_prefix`
_DEFAULT = re.compile(r'^Default:\s*"(.*)"\s*$', re.S)


def _package_dir(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a parent package (e.g. `plone`) is missing
        spec = None
    if spec is None:
        raise SlmforgeError(f"the demo corpus needs the package {name!r}: pip install \"slmforge[demo]\"")
    locations = spec.submodule_search_locations  # a package; polib is a single module
    return Path(next(iter(locations))) if locations else Path(spec.origin).parent


def _clean(text: str) -> str:
    return " ".join(_PLACEHOLDER.sub(" ", text).split()).strip(" :;,-")


def _keep(sentence: str) -> bool:
    return len(sentence) > 12 and not _IDENTIFIER.match(sentence)


def _english_of(entry) -> str:
    """Plone uses ids as msgids and keeps the English text in a `Default: "..."` comment."""
    if not _IDENTIFIER.match(entry.msgid):
        return entry.msgid
    for comment in entry.comment.splitlines():
        match = _DEFAULT.match(comment.strip())
        if match:
            return match.group(1)
    return ""


def plone_sentences(locale: str) -> tuple[list[str], list[str]]:
    """(translations into `locale`, their English originals) from Plone's .po catalogues."""
    folder = _package_dir("plone.app.locales") / "locales" / locale / "LC_MESSAGES"
    _package_dir("polib")
    import polib

    translated, english = [], []
    for po in sorted(folder.glob("*.po")):
        for entry in polib.pofile(str(po), encoding="utf-8"):
            if not entry.msgid or entry.fuzzy or entry.obsolete:
                continue
            strings = [entry.msgstr] + [entry.msgstr_plural[k] for k in sorted(entry.msgstr_plural)]
            translated.extend(_clean(s) for s in strings if s)
            english.append(_clean(_english_of(entry)))
    return translated, english


def plone_pairs(locale: str) -> list[tuple[str, str]]:
    """(English original, its translation into `locale`) of every translated, non-fuzzy Plone message:
    human translations, so a small real parallel corpus (about 3,500 English-German pairs)."""
    folder = _package_dir("plone.app.locales") / "locales" / locale / "LC_MESSAGES"
    if not folder.is_dir():
        raise SlmforgeError(f"plone.app.locales has no {locale!r} catalogues ({folder})")
    _package_dir("polib")
    import polib

    pairs = []
    for po in sorted(folder.glob("*.po")):
        for entry in polib.pofile(str(po), encoding="utf-8"):
            if not entry.msgid or entry.fuzzy or entry.obsolete or not entry.msgstr:
                continue  # plural entries (msgstr_plural) have no single translation: left out
            pairs.append((_clean(_english_of(entry)), _clean(entry.msgstr)))
    return pairs


@lru_cache(maxsize=1)
def _udhr_languages() -> dict:
    _package_dir("gflanguages")  # a clear error when the package is missing
    import gflanguages

    return gflanguages.LoadLanguages()


def udhr_sentences(language_id: str) -> list[str]:
    """Sentences of the UDHR sample text gflanguages carries for a language (e.g. "as_Beng")."""
    proto = _udhr_languages().get(language_id)
    if proto is None:
        return []
    fields = [value for _, value in proto.sample_text.ListFields() if isinstance(value, str)]
    text = max(fields, key=len, default="")
    return [s.strip() for s in re.split(r"(?<=[.।!?])\s+|\n", text) if s.strip()]


def build_demo_corpus(out_dir: str | Path) -> dict[str, Path]:
    """Write `<lang>.txt` (one sentence per line, deduplicated, in catalogue order) per language."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences: dict[str, list[str]] = {lang: [] for lang in LANGUAGES}
    for lang, (locale, udhr_id) in LANGUAGES.items():
        if locale is not None:
            translated, english = plone_sentences(locale)
            sentences[lang].extend(translated)
            sentences["en"].extend(english)
        sentences[lang].extend(udhr_sentences(udhr_id))
    files = {}
    for lang, lines in sentences.items():
        unique = [s for s in dict.fromkeys(lines) if _keep(s)]
        if not unique:
            raise SlmforgeError(f"demo corpus: no {lang} text found in the installed packages")
        path = out_dir / f"{lang}.txt"
        path.write_text("\n".join(unique) + "\n", encoding="utf-8")
        files[lang] = path
    return files
