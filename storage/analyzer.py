"""Text -> index terms: the one place that says what a word is and how it is stemmed.

    "Ёжики в Москве-реке"  --fold-->  "ежики в москве реке"  --stem-->  ежик в москв рек
                            (case, diacritics, ё -> е)      (each word by the stemmer of its script)

storage/fulltext.py indexes these terms and storage/query.py builds queries of
them, so a document and a query are always cut and stemmed alike.  Words are
runs of letters and digits; everything else (hyphens, pluses, punctuation)
separates them.  Stemmers are Snowball's, through PyStemmer; which ones are in
use is config (``[search] languages``, core/config.py).  A word with a
Cyrillic letter is stemmed by the configured stemmer for Cyrillic, a word
with a Latin one by the one for Latin, other words are kept as folded.  A
``lang`` names one stemmer for every word (or ``none``: no stemming).

An Analyzer is not thread-safe (PyStemmer's stemmers are not): one per thread.
"""
from __future__ import annotations

import re
import unicodedata
import Stemmer

from core.config import SEARCH_LANGUAGES

NO_STEMMING = "none"
# A word as it appears in a document: letters and digits with their combining marks.
RAW_WORD = re.compile(r"(?:[^\W_]|[\u0300-\u036f\u0483-\u0489])+")
WORD = re.compile(r"[^\W_]+")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_LATIN = re.compile(r"[a-z]")
_KEEP_SHORT_I = "\uffff"   # й is a letter of its own in Russian, not и with a breve
# Combining marks left by NFKD (diacritics); one regex pass over a whole text is
# ~20x faster than unicodedata.combining() per character.
_MARKS = re.compile("[\u0300-\u036f\u0483-\u0489\u1ab0-\u1aff\u1dc0-\u1dff"
                    "\u20d0-\u20ff\ufe20-\ufe2f]")
STEM_CACHE = 100_000   # words whose terms an Analyzer remembers (a document repeats its words)


class UnknownLanguage(ValueError):
    """A lang= that is neither a configured stemmer nor 'none'."""


def fold(text: str) -> str:
    """Case, diacritics and ё folded: 'Ёжик' -> 'ежик', 'Café' -> 'cafe'."""
    text = text.casefold()
    if text.isascii():
        return text
    text = text.replace("ё", "е").replace("й", _KEEP_SHORT_I)
    text = _MARKS.sub("", unicodedata.normalize("NFKD", text))
    return text.replace(_KEEP_SHORT_I, "й")


def language_name(lang: str | None, languages: tuple[str, ...]) -> str | None:
    """A lang= (one of `languages`, its short name, or 'none') -> its stemmer's name;
    None or "" -> None (each word by its script); UnknownLanguage otherwise.  Also
    what an indexed write's lang= is checked with, before anything is stored."""
    if lang is None or lang == "":
        return None
    names = {NO_STEMMING: NO_STEMMING}
    for name in languages:
        names[name] = names[SEARCH_LANGUAGES[name][1]] = name
    found = names.get(lang.lower()) if isinstance(lang, str) else None
    if found is None:
        raise UnknownLanguage(f"unknown language {str(lang)[:40]!r}: known are "
                              f"{', '.join(sorted(names))}")
    return found


def _script(word: str) -> str | None:
    if _CYRILLIC.search(word):
        return "cyrillic"
    if _LATIN.search(word):
        return "latin"
    return None


class Analyzer:
    def __init__(self, languages: tuple[str, ...]):
        self.languages = tuple(languages)
        self._stemmers = {name: Stemmer.Stemmer(name) for name in self.languages}
        self._by_script: dict[str, str] = {}
        for name in self.languages:
            self._by_script.setdefault(SEARCH_LANGUAGES[name][0], name)
        self._cache: dict[str, str] = {}   # folded word -> term, by script

    def language(self, lang: str | None) -> str | None:
        """A lang= as given (a stemmer, its short name or 'none') -> its stemmer's name;
        None (by script) stays None.  UnknownLanguage for anything else."""
        return language_name(lang, self.languages)

    def stem(self, word: str, lang: str | None = None) -> str:
        """A folded word -> its term.  `lang` is a name language() returned."""
        if lang is None:
            term = self._cache.get(word)
            if term is None:
                if len(self._cache) >= STEM_CACHE:
                    self._cache.clear()
                term = self._cache[word] = self._stem(word, self._by_script.get(_script(word)))
            return term
        return self._stem(word, lang)

    def _stem(self, word: str, name: str | None) -> str:
        if name is None or name == NO_STEMMING:
            return word
        return self._stemmers[name].stemWord(word)

    def words(self, text: str) -> list[str]:
        """The folded words of `text`, in order."""
        return WORD.findall(fold(text))

    def terms(self, text: str, lang: str | None = None) -> list[str]:
        stem = self.stem
        return [stem(w, lang) for w in WORD.findall(fold(text))]

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, the word folded) of each word as written in `text`: what a
        snippet marks (`terms` of the folded word tell whether it matches)."""
        folded = fold(text)
        if len(folded) == len(text):  # folding kept every character in place (most text)
            return [(m.start(), m.end(), m.group()) for m in WORD.finditer(folded)]
        return [(m.start(), m.end(), fold(m.group())) for m in RAW_WORD.finditer(text)]
