"""The lexer: istgt's grammar (istgt-core.md 2.1) plus fatal syntax errors."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istgt.conf import ConfigError, SectionKind, parse_conf, read_conf, split_tokens


def items_of(text, section="S"):
    conf = parse_conf(text, "t.conf")
    return [(item.key, item.values, item.line) for item in conf.find(section).items]


# --- tokens (strsepq) -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("a b\tc", ["a", "b", "c"]),
        ("a  \t  b", ["a", "b"]),
        ('"two words" x', ["two words", "x"]),
        ("'two words' x", ["two words", "x"]),
        ('a"b c"d', ["ab cd"]),
        ("a'b c'd", ["ab cd"]),
        ('""', [""]),
        ('x "" y', ["x", "", "y"]),
        (r"a\ b", ["a b"]),
        (r'"a\"b"', ['a"b']),
        (r"'a\b'", [r"a\b"]),
        (r"'a\'", ["a\\"]),  # backslash is literal inside single quotes
        ('"unterminated to end', ["unterminated to end"]),
        ("'open  quote", ["open  quote"]),
        ("a,b c", ["a,b", "c"]),  # commas do not separate
        ('"it\'s"', ["it's"]),
        ("trailing\\", ["trailing\\"]),
        ("", []),
        ("   ", []),
    ],
)
def test_split_tokens(text, tokens):
    assert split_tokens(text) == tokens


# --- lines, comments, continuation -------------------------------------------


def test_comments_blank_lines_and_trimming():
    text = "# comment\n\n   \n[S]\n   # indented comment\n\tKey  v1   v2  \t\n"
    assert items_of(text) == [("Key", ("v1", "v2"), 6)]


def test_no_inline_comments():
    assert items_of("[S]\nTimeout 30 # seconds\n") == [("Timeout", ("30", "#", "seconds"), 2)]


def test_final_line_without_newline():
    assert items_of("[S]\nKey v") == [("Key", ("v",), 2)]


def test_continuation_joins_verbatim_and_keeps_first_line_number():
    text = '[S]\n  Auth "u"  "s" \\\n       "mu" "ms"\nNext x\n'
    assert items_of(text) == [("Auth", ("u", "s", "mu", "ms"), 2), ("Next", ("x",), 4)]


def test_continuation_without_space_glues_text():
    assert items_of("[S]\nKey ab\\\ncd\n") == [("Key", ("abcd",), 2)]


def test_continuation_over_several_lines():
    assert items_of("[S]\nK a \\\n b \\\n c\nL\n") == [("K", ("a", "b", "c"), 2), ("L", (), 5)]


def test_continuation_with_crlf_line_endings():
    text = '[S]\r\n  Auth "u" "s" \\\r\n    "mu" "ms"\r\nNext x\r\n'
    assert items_of(text) == [("Auth", ("u", "s", "mu", "ms"), 2), ("Next", ("x",), 4)]


def test_crlf_is_not_part_of_values():
    assert items_of("[S]\r\nKey value\r\n") == [("Key", ("value",), 2)]


def test_continued_comment_swallows_next_line_like_c():
    text = "[S]\n# Auth a b \\\n   Auth c d\nKey v\n"
    assert items_of(text) == [("Key", ("v",), 4)]


def test_backslash_at_end_of_file():
    assert items_of("[S]\nKey v \\") == [("Key", ("v",), 2)]


def test_lone_backslash_does_not_continue():
    assert items_of("[S]\nA\n\\\nB\n") == [("A", (), 2), ("\\", (), 3), ("B", (), 4)]


# --- sections -------------------------------------------------------------------


def test_section_number_and_kind():
    conf = parse_conf(
        "[Global]\n[logicalunit12]\n[PortalGroup]\n[AuthGroup9999]\n[Something]\n"
        "[InitiatorGroupX7]\n[UnitControl]\n",
        "t.conf",
    )
    got = [(s.name, s.kind, s.number, s.line) for s in conf.sections]
    assert got == [
        ("Global", SectionKind.GLOBAL, 0, 1),
        ("logicalunit12", SectionKind.LOGICAL_UNIT, 12, 2),
        ("PortalGroup", SectionKind.PORTAL_GROUP, 0, 3),
        ("AuthGroup9999", SectionKind.AUTH_GROUP, 9999, 4),
        ("Something", SectionKind.NONE, 0, 5),
        ("InitiatorGroupX7", SectionKind.INITIATOR_GROUP, 7, 6),
        ("UnitControl", SectionKind.UNIT_CONTROL, 0, 7),
    ]


def test_prefix_match_for_kind_but_exact_match_for_find():
    conf = parse_conf("[GlobalStuff]\nA 1\n", "t.conf")
    assert conf.sections[0].kind is SectionKind.GLOBAL
    assert conf.find("Global") is None
    assert conf.find("globalstuff") is conf.sections[0]


def test_repeated_header_reopens_section():
    conf = parse_conf("[S]\nA 1\n[T]\nB 2\n[s]\nC 3\n", "t.conf")
    assert [s.name for s in conf.sections] == ["S", "T"]
    assert [i.key for i in conf.find("S").items] == ["A", "C"]
    assert conf.find("S").line == 1


def test_leading_zeros_make_a_different_section_with_same_number():
    conf = parse_conf("[LogicalUnit1]\n[LogicalUnit01]\n", "t.conf")
    assert [(s.name, s.number) for s in conf.sections] == [
        ("LogicalUnit1", 1),
        ("LogicalUnit01", 1),
    ]


def test_quoted_section_name():
    conf = parse_conf('["Port]al"]\n', "t.conf")
    assert conf.sections[0].name == "Port]al"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("[Global]\nA 1\n[X] trailing\nB 2\n", 3, "unexpected text 'trailing'"),
        ("# c\n\n[Global\n", 3, "missing ']'"),
        ("[]\n", 1, "empty section name"),
        ("# header comes later\nNodeBase x\n[Global]\n", 2, "outside any section"),
        ('[S]\nA 1\n"" value\n', 3, "broken key"),
        ("[S]\nA \\\n1\n[X]y\n", 4, "unexpected text 'y'"),
    ],
)
def test_syntax_errors_are_fatal_with_file_and_line(text, line, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_conf(text, "bad.conf")
    assert caught.value.path == "bad.conf"
    assert caught.value.line == line
    assert str(caught.value).startswith(f"bad.conf:{line}: ")
    assert fragment in str(caught.value)


def test_key_outside_section_names_the_key():
    with pytest.raises(ConfigError) as caught:
        parse_conf("Timeout 30\n", "x.conf")
    assert caught.value.key == "Timeout"
    assert str(caught.value) == (
        "x.conf:1: Timeout: key outside any section (a [Section] header must come first)"
    )


# --- keys ----------------------------------------------------------------------


def test_keys_case_insensitive_and_duplicates_kept_in_order():
    conf = parse_conf("[S]\nPortal a 1\nportal b 2\nOther x\nPORTAL c 3\n", "t.conf")
    section = conf.find("s")
    assert section.first("PORTAL").values == ("a", "1")
    assert [i.values[0] for i in section.all("portal")] == ["a", "b", "c"]
    assert [i.line for i in section.all("Portal")] == [2, 3, 5]
    assert section.first("missing") is None
    assert section.all("missing") == ()


def test_key_without_value():
    conf = parse_conf("[S]\nAuthGroup \n", "t.conf")
    item = conf.find("S").first("AuthGroup")
    assert item.values == () and item.value is None


def test_empty_file_has_no_sections():
    assert parse_conf("", "t.conf").sections == ()
    assert parse_conf("\n# only comments\n", "t.conf").sections == ()


def test_read_conf_missing_file(tmp_path):
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as caught:
        read_conf(missing)
    assert str(caught.value).startswith(f"{missing}: cannot read")


def test_read_conf_passes_non_utf8_bytes_through(tmp_path):
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"[S]\nComment caf\xe9\n")
    conf = read_conf(path)
    assert conf.path == str(path)
    assert conf.find("S").first("Comment").value.encode("utf-8", "surrogateescape") == b"caf\xe9"


# --- properties -------------------------------------------------------------------


_token_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\n\r"),
    max_size=12,
)


@given(st.lists(_token_text, max_size=6))
def test_double_quoted_tokens_round_trip(tokens):
    line = " ".join('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in tokens)
    assert split_tokens(line) == tokens


@given(st.lists(_token_text, min_size=1, max_size=6), st.sampled_from(["\n", "\r\n"]))
def test_continued_key_line_equals_single_line(tokens, newline):
    quoted = ["'" + t.replace("'", "") + "'" for t in tokens]
    one_line = parse_conf("[S]\nKey " + " ".join(quoted) + newline, "t.conf")
    continued = parse_conf(
        "[S]\nKey " + (" \\" + newline + "   ").join(quoted) + newline, "t.conf"
    )
    assert continued.find("S").items == one_line.find("S").items
