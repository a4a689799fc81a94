"""Names in matplotlib figures as the user wrote them.

Class and method names reach the figures of two stages (the classifier's report and CDTG's
sample sheet). matplotlib would read a name holding two '$' as math, and draws a character
its default font lacks (a Chinese class name) as a box, with one warning per character.
Here such characters come from an installed font that has them, and the ones no font has
are named once.
"""
import contextlib
import functools
import unicodedata
import warnings

import matplotlib
from matplotlib import font_manager
from matplotlib.ft2font import FT2Font

# matplotlib's own last resort maps every character, to a box.
PLACEHOLDER_FAMILIES = {"Last Resort High-Efficiency"}
_already_named = set()


@functools.lru_cache(maxsize=None)
def _characters_of(font_path):
    try:
        return frozenset(FT2Font(font_path).get_charmap())
    except (OSError, RuntimeError, ValueError):  # a damaged or unsupported font file
        return frozenset()


def _drawn_characters(texts):
    return {char for text in texts for char in str(text)
            if char.isprintable() and not char.isspace() and unicodedata.combining(char) == 0}


def fallback_families(texts):
    """(font families to try after the default one, characters that no installed font has).
    Greedy: the family that draws most of the missing characters first."""
    default = font_manager.findfont(font_manager.FontProperties(family=matplotlib.rcParams["font.family"]))
    missing = {char for char in _drawn_characters(texts) if ord(char) not in _characters_of(default)}
    coverage = {}
    if missing:
        for entry in font_manager.fontManager.ttflist:
            if entry.name not in PLACEHOLDER_FAMILIES:
                drawn = {char for char in missing if ord(char) in _characters_of(entry.fname)}
                if len(drawn) > len(coverage.get(entry.name, ())):
                    coverage[entry.name] = drawn
    families = []
    while missing and coverage:
        best = max(sorted(coverage), key=lambda name: len(coverage[name] & missing))
        if not coverage[best] & missing:
            break
        families.append(best)
        missing -= coverage.pop(best)
    return families, "".join(sorted(missing))


@contextlib.contextmanager
def text_as_written(texts):
    """Draw a figure holding `texts` (class and method names) inside this context."""
    families, unmatched = fallback_families(texts)
    unmatched = "".join(char for char in unmatched if char not in _already_named)
    if unmatched:
        _already_named.update(unmatched)
        warnings.warn(f"no installed font has the characters {unmatched!r} of a class or method name: the "
                      f"figures show boxes for them (install a font that has them, e.g. Noto Sans CJK for Chinese)")
    families = [*matplotlib.rcParams["font.family"], *families]
    with matplotlib.rc_context({"text.parse_math": False, "font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # named once above
        yield
