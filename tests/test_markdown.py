import pytest

from markdown_tables import markdown_table


def test_header_rule_and_rows_with_alignment():
    table = markdown_table(["name", "value", "mid"], [["a", 0.5, 1], ["b", None, ""]], "lrc")
    assert table.splitlines() == [
        "| name | value | mid |",
        "|---|---:|:---:|",
        "| a | 0.5 | 1 |",
        "| b | None |  |",
    ]


def test_default_alignment_and_no_rows():
    assert markdown_table(["a", "b"], []) == "| a | b |\n|---|---|"


def test_a_cell_cannot_break_the_table():
    assert markdown_table(["x"], [["a|b\nc"]]).splitlines()[-1] == "| a\\|b c |"


@pytest.mark.parametrize(("rows", "align"), [([["only one"]], None), ([["a", "b"]], "l"), ([["a", "b"]], "lx")])
def test_shape_mistakes_are_refused(rows, align):
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], rows, align)
