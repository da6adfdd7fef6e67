"""What a person types -> an FTS5 query of index terms, never an FTS5 syntax error.

    walrus "ivory tusk" e-mail -spam cat OR dog narwh*
      -> ("walrus") AND ("ivori tusk") AND ("e mail") AND ("cat" OR "dog") AND ("narwh" *)
         NOT ("spam")

The syntax (as in web search):
  word            must appear (stemmed: `foxes` finds `fox`)
  "a phrase"      these words in this order; an unclosed quote runs to the end
  a-b, a+b, a.b   words joined by anything but a space are a phrase of them
  word*           a prefix (folded, not stemmed)
  -word, -"a b"   must not appear
  a OR b          either; `OR` in capitals between two words, phrases or prefixes
Every other character separates words.  Each word becomes an FTS5 string
("..."), which holds nothing but letters and digits, so no input reaches
FTS5 as syntax.  With `raw` the text is FTS5's own syntax, run as given
against the terms (so words must be written as their stems); an error FTS5
finds in it is a BadQuery.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .analyzer import Analyzer

MAX_TERMS = 64   # words in one query: each is a doclist FTS5 walks
CANDIDATE_LETTERS = 3   # of a term that a word must begin with to be stemmed for a snippet
_CHUNK = re.compile(r'-?"[^"]*"?|[^\s"]+')


class BadQuery(ValueError):
    """A query that cannot be run; the message says why, in one line."""


@dataclass(frozen=True)
class _Item:
    terms: tuple[str, ...]
    prefix: bool = False
    negated: bool = False

    def fts(self) -> str:
        return f'"{" ".join(self.terms)}"' + (" *" if self.prefix else "")


@dataclass(frozen=True)
class Query:
    text: str                    # as typed
    fts: str                     # what FTS5 runs
    lang: str | None             # the stemmer for every word, or None: by script
    terms: frozenset[str]        # what a snippet marks: the wanted terms ...
    prefixes: tuple[str, ...]    # ... and prefixes
    candidates: re.Pattern | None = None   # folded words that may be marked (see below)

    def __post_init__(self):
        # A word whose term is t begins with t's first letters (Snowball strips and
        # changes endings only), so only words that begin so need stemming.
        starts = sorted({t[:CANDIDATE_LETTERS] for t in (*self.terms, *self.prefixes)})
        if starts:
            object.__setattr__(self, "candidates", re.compile(
                r"(?<![^\W_])(?:" + "|".join(map(re.escape, starts)) + r")[^\W_]*"))

    def matches(self, terms: list[str]) -> bool:
        for term in terms:
            if term in self.terms or (self.prefixes and term.startswith(self.prefixes)):
                return True
        return False


_RAW_OPERATORS = frozenset(("and", "or", "not", "near"))


def parse(text: str, analyzer: Analyzer, lang: str | None = None, raw: bool = False) -> Query:
    if raw:
        if not text.strip():
            raise BadQuery("the query is empty: give words to look for")
        terms = frozenset(w for w in analyzer.words(text) if w not in _RAW_OPERATORS)
        return Query(text, text, lang, terms, ())
    fts, wanted = to_fts(text, analyzer, lang)
    return Query(text, fts, lang, frozenset(t for i in wanted if not i.prefix for t in i.terms)
                 | frozenset(t for i in wanted if i.prefix for t in i.terms[:-1]),
                 tuple(i.terms[-1] for i in wanted if i.prefix))


def to_fts(text: str, analyzer: Analyzer, lang: str | None = None) -> tuple[str, list[_Item]]:
    """The FTS5 query for typed `text` and the wanted items; BadQuery when it
    has no word to look for."""
    chunks = _CHUNK.findall(text)
    items = [_item(c, analyzer, lang) for c in chunks]
    groups, excluded = _group(chunks, items)
    count = sum(len(i.terms) for i in items if i is not None)
    if count > MAX_TERMS:
        raise BadQuery(f"the query has {count} words; at most {MAX_TERMS}")
    if not groups:
        raise BadQuery("nothing to search for: the query has no words (letters or digits)"
                       if not excluded else
                       "the query only excludes words (-word): give a word to look for too")
    query = " AND ".join("(" + " OR ".join(i.fts() for i in g) + ")" for g in groups)
    if excluded:
        query += " NOT (" + " OR ".join(i.fts() for i in excluded) + ")"
    return query, [i for g in groups for i in g]


def _item(chunk: str, analyzer: Analyzer, lang: str | None) -> _Item | None:
    negated = chunk.startswith("-") and len(chunk) > 1
    body = chunk[1:] if negated else chunk
    quoted = body.startswith('"')
    prefix = not quoted and body.endswith("*")
    words = analyzer.words(body)
    if not words:
        return None
    if prefix:  # a prefix is matched as typed (folded): a stem of a fragment means little
        terms = [analyzer.stem(w, lang) for w in words[:-1]] + words[-1:]
    else:
        terms = [analyzer.stem(w, lang) for w in words]
    return _Item(tuple(terms), prefix, negated)


def _group(chunks: list[str], items: list[_Item | None]) -> tuple[list[list[_Item]], list[_Item]]:
    """Items -> (groups that must each match, one of its items; excluded items).
    An OR joins the wanted items on either side of it; anywhere else it is ignored."""
    groups: list[list[_Item]] = []
    excluded: list[_Item] = []
    join_next = last_wanted = False
    for chunk, item in zip(chunks, items):
        if chunk == "OR":
            join_next = last_wanted
            continue
        if item is None:
            continue
        if item.negated:
            excluded.append(item)
        elif join_next:
            groups[-1].append(item)
        else:
            groups.append([item])
        join_next, last_wanted = False, not item.negated
    return groups, excluded
