"""Names in figures: characters the default font lacks come from another installed font; the
ones no font has are named in one warning, not one per character."""
import unicodedata
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font

import tgn.plot_text
from Classification.figures import plot_confusion, plot_long_tail
from Classification.report import build_report
from tgn.plot_text import fallback_families, text_as_written


@pytest.fixture
def bundled_fonts_only(monkeypatch):
    """matplotlib's own fonts, whatever else the machine has installed (Windows and macOS ship
    fonts for historic scripts too), so that some characters are in none of them."""
    bundled = [entry for entry in font_manager.fontManager.ttflist
               if entry.fname.startswith(matplotlib.get_data_path())]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", bundled)


def charmap(family):
    return set(FT2Font(font_manager.findfont(font_manager.FontProperties(family=[family]))).get_charmap())


def only_in_stix():
    """A letter that matplotlib's bundled STIXGeneral has and its default DejaVu Sans lacks."""
    extra = sorted(charmap("STIXGeneral") - charmap("DejaVu Sans"))
    return next(chr(code) for code in extra if unicodedata.category(chr(code)).startswith("L"))


def drawn(text, families=None):
    with matplotlib.rc_context({"font.family": families} if families else {}), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figure = Figure(figsize=(1, 1), dpi=100)
        figure.text(0.1, 0.3, text, fontsize=40)
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba()).copy()


def no_font_has(count=2):
    """Letters that no font matplotlib knows of draws (Linear B, hieroglyphs, ...)."""
    installed = set().union(*(charmap(entry.name) for entry in font_manager.fontManager.ttflist
                              if entry.name not in tgn.plot_text.PLACEHOLDER_FAMILIES))
    candidates = (chr(code) for start in (0x10000, 0x13000, 0x12000, 0x20000) for code in range(start, start + 0x400))
    letters = "".join([char for char in candidates if char.isprintable() and ord(char) not in installed][:count])
    assert len(letters) == count
    return letters


def report_named(names):
    size = len(names)
    return build_report(np.eye(size, dtype=int) * 2, method="TGN", source="x.pth", dataset="TOY",
                        class_ids=list(range(size)), class_names=names, train_counts=[9] * size,
                        generated_counts=None, head=[0], tail=list(range(1, size)), grouping="hand")


def test_a_character_the_default_font_lacks_is_drawn_from_a_font_that_has_it():
    letter = only_in_stix()
    families, unmatched = fallback_families(["plane", f"ship {letter}"])
    assert unmatched == "" and families and ord(letter) in charmap(families[0])
    assert fallback_families(["plane", "ship"]) == ([], "")  # nothing to add for names the default font draws
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with text_as_written([letter]):
            inside = drawn(letter, matplotlib.rcParams["font.family"])
    assert np.array_equal(inside, drawn(letter, families[:1]))  # the glyph of the font that has it
    assert not np.array_equal(inside, drawn(letter))  # not the default font's box


def test_characters_no_font_has_are_named_once_not_warned_per_glyph(tmp_path, monkeypatch, bundled_fonts_only):
    monkeypatch.setattr(tgn.plot_text, "_already_named", set())
    missing = no_font_has()
    report = report_named(["plane", f"ship{missing}", "tank"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(report, tmp_path / "cm.png")
        plot_long_tail([report], tmp_path / "lt.png")
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and repr(missing) in messages[0], messages
    assert (tmp_path / "cm.png").stat().st_size > 0 and (tmp_path / "lt.png").stat().st_size > 0


def test_a_method_name_no_font_has_is_named_too(tmp_path, monkeypatch, bundled_fonts_only):
    """The figure's title holds the method's name (--method): its characters are looked up
    with the class names'."""
    monkeypatch.setattr(tgn.plot_text, "_already_named", set())
    missing = no_font_has()
    report = {**report_named(["plane", "ship"]), "method": f"TGN{missing}"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(report, tmp_path / "cm.png")
    named = [str(warning.message) for warning in caught if issubclass(warning.category, UserWarning)]
    assert [repr(missing) in message for message in named] == [True]


def test_the_sample_sheet_names_missing_characters_once_too(tmp_path, monkeypatch, bundled_fonts_only):
    from CDTG.eval_report import plot_sample_sheet

    monkeypatch.setattr(tgn.plot_text, "_already_named", set())
    missing = no_font_has()
    tiles = {0: torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_sample_sheet({"real": tiles, f"r{missing[0]}": tiles}, [0], [f"tank{missing[1]}"], tmp_path / "s.png")
    assert [repr(missing) in str(warning.message) for warning in caught] == [True]


@pytest.mark.parametrize("name", ["coins 50$ & 100$", "a_b^c"])
def test_names_with_math_signs_stay_as_written(name):
    with text_as_written([name]):
        assert matplotlib.rcParams["text.parse_math"] is False
    assert matplotlib.rcParams["text.parse_math"] is True
