"""The reading guide: README.md's and README.zh-CN.md's table keyed to the tutorial's sections.

The guide is the Markdown table between `<!-- reading-guide:start -->` and `<!-- reading-guide:end -->`.
Its columns are: section, the tutorial's Chinese heading, a gloss, the equations, code, test, notebook.
The references are the backticked spans of the last three columns:

    code      `path.py:name, Class.method` (path under parti_from_scratch/ unless its first folder is a
              top-level folder of the repository), or `examples/script.py` for a script
    test      `tests/test_x.py::test_name` (a pytest node id)
    notebook  `notebooks/NN_x.ipynb` › heading text, as the notebook's Markdown heading writes it

References in one cell are separated by `<br>`. A cell without a reference starts with "—" and says why.
A row whose first cell is bold and whose other cells are empty heads a group of rows.

The checks: every reference exists (the file, the def/class found by parsing it, the test function, the
notebook's heading), the two READMEs list the same rows with the same headings and references, the
tutorial's technical sections are all there, and the quickstart commands are the same in both.
"""
import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "parti_from_scratch"
READMES = ("README.md", "README.zh-CN.md")
START, END = "<!-- reading-guide:start -->", "<!-- reading-guide:end -->"
N_COLUMNS = 7  # section, heading, gloss, equation, code, test, notebook
CODE, TEST, NOTEBOOK = 4, 5, 6
# a code path whose first folder is one of these is read from the repository root, else from the package
TOP_LEVEL = {"examples", "weights_convert", "benchmarks", "tests", PACKAGE}
# the tutorial's sections with technical content: each has code, a test and a notebook
TECHNICAL = ("§2.1", "§2.2", "§2.3", "§2.4", "§3.1", "§3.2", "§3.3", "§4.1", "§4.2", "§4.3", "§5.2", "§5.3")
# sections that must have a row, with references or with the reason they have none
LISTED = TECHNICAL + ("§5.1", "§6", "§7", "§8", "§9")
NOTEBOOK_REF = re.compile(r"^`(notebooks/[^`]+\.ipynb)` › (.+)$")
CODE_REF = re.compile(r"^([\w./-]+\.py)(?::(.+))?$")
TEST_REF = re.compile(r"^(tests/[\w/-]+\.py)::(\w+)$")
IDENTIFIER = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)?$")


@dataclass(frozen=True)
class Row:
    """One row of the guide: a group heading (`group` True, nothing else set) or a section's references."""
    line: int
    group: bool
    section: str = ""
    heading: str = ""
    code: Tuple[str, ...] = ()
    tests: Tuple[str, ...] = ()
    notebooks: Tuple[str, ...] = ()

    def references(self) -> tuple:
        """What both READMEs must agree on (the glosses and equations are written in each language)."""
        return (self.group, self.section, self.heading, self.code, self.tests, self.notebooks)


def split_cells(line: str) -> List[str]:
    """`| a | b \\| c |` -> ["a", "b \\| c"]: cells split at unescaped pipes."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def cell_parts(cell: str) -> List[str]:
    """A cell's references, one per `<br>`-separated part; [] for a "—" cell."""
    if cell.startswith("—"):
        return []
    return [part.strip() for part in cell.split("<br>") if part.strip()]


def guide_table(text: str, source: str) -> List[Tuple[int, List[str]]]:
    """(line number, cells) of each body row of the guide table in `text`."""
    lines = text.splitlines()
    try:
        start = lines.index(START)
        end = lines.index(END, start)
    except ValueError:
        raise AssertionError(f"{source}: no {START} ... {END} block") from None
    rows = [(n + 1, line) for n, line in enumerate(lines[start + 1:end], start + 1) if line.startswith("|")]
    if len(rows) < 3:
        raise AssertionError(f"{source}: the reading guide has no table rows")
    header, rule, body = rows[0], rows[1], rows[2:]
    if len(split_cells(header[1])) != N_COLUMNS or not set(rule[1]) <= set("|-: "):
        raise AssertionError(f"{source}, line {header[0]}: the guide needs a {N_COLUMNS}-column header and rule")
    return [(n, split_cells(line)) for n, line in body]


def parse_guide(text: str, source: str) -> Tuple[List[Row], List[str]]:
    """The guide's rows and the problems of form (wrong column count, a reference in no known shape)."""
    rows: List[Row] = []
    problems: List[str] = []
    for n, cells in guide_table(text, source):
        where = f"{source}, line {n}"
        if len(cells) != N_COLUMNS:
            problems.append(f"{where}: {len(cells)} cells, expected {N_COLUMNS}")
            continue
        if cells[0].startswith("**") and not any(cells[1:]):
            rows.append(Row(line=n, group=True))
            continue
        refs: Dict[int, List[str]] = {}
        for column in (CODE, TEST, NOTEBOOK):
            if not cells[column]:
                problems.append(f"{where}: empty cell {column + 1}; write the reference or '—' and why")
            refs[column] = []
            for part in cell_parts(cells[column]):
                if column == NOTEBOOK:
                    if not NOTEBOOK_REF.match(part):
                        problems.append(f"{where}: {part!r} is not `notebooks/file.ipynb` › heading")
                    refs[column].append(part)
                    continue
                spans = re.fullmatch(r"`([^`]+)`", part)
                if spans is None:
                    problems.append(f"{where}: {part!r} is not one backticked reference")
                    continue
                refs[column].append(spans.group(1))
        rows.append(Row(line=n, group=False, section=cells[0], heading=cells[1], code=tuple(refs[CODE]),
                        tests=tuple(refs[TEST]), notebooks=tuple(refs[NOTEBOOK])))
    return rows, problems


def code_path(path: str) -> Path:
    """A code reference's file: repository-relative if its first folder is a top-level one, else in the package."""
    first = path.split("/", 1)[0]
    return ROOT / path if first in TOP_LEVEL else ROOT / PACKAGE / path


def defined_names(tree: ast.Module) -> Dict[str, set]:
    """{"": top-level def/class names, "Class": that class's method names} of a parsed file."""
    names: Dict[str, set] = {"": set()}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[""].add(node.name)
        if isinstance(node, ast.ClassDef):
            names[node.name] = {item.name for item in node.body
                                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def check_code_reference(ref: str) -> Optional[str]:
    """None if `ref` (`path.py:name, Class.method`) names a file and defs that exist, else the problem."""
    match = CODE_REF.match(ref)
    if match is None:
        return f"`{ref}` is not `file.py:function` (a bare name says nothing of where it lives)"
    path, names = code_path(match.group(1)), match.group(2)
    if not path.is_file():
        return f"`{ref}`: no file {path.relative_to(ROOT)}"
    if names is None:
        if not match.group(1).startswith("examples/"):
            return f"`{ref}`: name the function or class (only scripts in examples/ stand alone)"
        return None
    defined = defined_names(ast.parse(path.read_text(encoding="utf-8")))
    for name in (name.strip() for name in names.split(",")):
        if not IDENTIFIER.match(name):
            return f"`{ref}`: {name!r} is not a name or Class.method"
        owner, _, member = name.rpartition(".")
        if owner and owner not in defined:
            return f"`{ref}`: no class {owner} in {path.relative_to(ROOT)}"
        if member not in defined[owner]:
            kind = f"method {member} in class {owner}" if owner else f"def or class {member}"
            return f"`{ref}`: no {kind} in {path.relative_to(ROOT)}"
    return None


def check_test_reference(ref: str) -> Optional[str]:
    """None if `ref` (`tests/test_x.py::test_name`) is a test function that exists, else the problem."""
    match = TEST_REF.match(ref)
    if match is None:
        return f"`{ref}` is not `tests/test_file.py::test_name`"
    path, name = ROOT / match.group(1), match.group(2)
    if not path.is_file():
        return f"`{ref}`: no file {match.group(1)}"
    if not name.startswith("test_"):
        return f"`{ref}`: {name} is not a test function (pytest collects test_*)"
    if name not in defined_names(ast.parse(path.read_text(encoding="utf-8")))[""]:
        return f"`{ref}`: no test function {name} in {match.group(1)}"
    return None


def notebook_headings(path: Path) -> set:
    """The text of every Markdown heading of a notebook, without its leading #s."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return {line.lstrip("#").strip() for cell in cells if cell["cell_type"] == "markdown"
            for line in "".join(cell["source"]).splitlines() if line.startswith("#")}


def check_notebook_reference(ref: str) -> Optional[str]:
    """None if `ref` (`notebooks/file.ipynb` › heading) names a notebook holding that heading, else the problem."""
    match = NOTEBOOK_REF.match(ref)
    if match is None:
        return f"{ref!r} is not `notebooks/file.ipynb` › heading"
    path, heading = ROOT / match.group(1), match.group(2).strip()
    if not path.is_file():
        return f"{ref!r}: no notebook {match.group(1)}"
    if heading not in notebook_headings(path):
        return f"{ref!r}: {match.group(1)} has no heading {heading!r}"
    return None


def reference_problems(rows: List[Row], source: str) -> List[str]:
    """Every reference of the rows that does not resolve, with the README and line it is on."""
    problems = []
    for row in rows:
        for refs, check in ((row.code, check_code_reference), (row.tests, check_test_reference),
                            (row.notebooks, check_notebook_reference)):
            problems += [f"{source}, line {row.line}: {problem}" for problem in map(check, refs) if problem]
    return problems


def difference(rows_a: List[Row], rows_b: List[Row], a: str, b: str) -> List[str]:
    """Rows where the two READMEs disagree on the section, heading or references ([] if none)."""
    problems = []
    if len(rows_a) != len(rows_b):
        problems.append(f"{a} has {len(rows_a)} guide rows, {b} has {len(rows_b)}")
    for row_a, row_b in zip(rows_a, rows_b):
        if row_a.references() != row_b.references():
            problems.append(f"{a} line {row_a.line} and {b} line {row_b.line} differ: "
                            f"{row_a.references()} != {row_b.references()}")
    return problems


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def parsed(name: str) -> List[Row]:
    rows, problems = parse_guide(read(name), name)
    assert not problems, "\n".join(problems)
    return rows


@pytest.mark.parametrize("readme", READMES)
def test_guide_rows_are_well_formed(readme):
    parsed(readme)


@pytest.mark.parametrize("readme", READMES)
def test_every_code_test_and_notebook_reference_exists(readme):
    problems = reference_problems(parsed(readme), readme)
    assert not problems, "\n".join(problems)


def test_both_readmes_list_the_same_sections_headings_and_references():
    problems = difference(parsed(READMES[0]), parsed(READMES[1]), *READMES)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("readme", READMES)
def test_every_technical_section_has_code_a_test_and_a_notebook(readme):
    rows = [row for row in parsed(readme) if not row.group]
    sections = {row.section for row in rows}
    missing = [section for section in LISTED if section not in sections]
    assert not missing, f"{readme}: no row for {missing}"
    for section in TECHNICAL:
        for row in (row for row in rows if row.section == section):
            assert row.code and row.tests and row.notebooks, f"{readme}, line {row.line}: {section} lacks a reference"


@pytest.mark.parametrize("readme", READMES)
def test_every_footnote_marker_is_defined(readme):
    text = read(readme)
    used = set(re.findall(r"\[\^([\w-]+)\](?!:)", text))
    defined = set(re.findall(r"^\[\^([\w-]+)\]:", text, flags=re.MULTILINE))
    assert used and used <= defined, f"{readme}: footnotes used {sorted(used)}, defined {sorted(defined)}"


def quickstart_commands(text: str, source: str) -> List[str]:
    """The command lines (not the comments) of the first ```bash block after the Quickstart heading."""
    match = re.search(r"^## (?:Quickstart|快速开始)\n.*?```bash\n(.*?)```", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"{source}: no Quickstart section with a bash block"
    return [line for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_commands_are_the_same_in_both_readmes():
    english, chinese = (quickstart_commands(read(name), name) for name in READMES)
    assert len(english) == 2 and english == chinese


def test_made_up_references_are_caught():
    """The checks can fail: each made-up or malformed reference is reported, and the real ones are not."""
    assert check_code_reference("nn/positional.py:sinusoidal_position_encoding, LearnedPositionalEmbedding") is None
    assert check_code_reference("pipeline.py:TextToImagePipeline.__call__") is None
    assert check_code_reference("examples/tutorial_5_3.py") is None
    assert "no def or class" in check_code_reference("nn/positional.py:sinusoidal_position_encodings")
    assert "no method" in check_code_reference("pipeline.py:TextToImagePipeline.denoise")
    assert "no class" in check_code_reference("pipeline.py:TextToImagePipelin.__call__")
    assert "no file" in check_code_reference("nn/positionals.py:sinusoidal_position_encoding")
    assert "bare name" in check_code_reference("sinusoidal_position_encoding")
    assert "name the function" in check_code_reference("nn/positional.py")

    assert check_test_reference("tests/test_positional.py::test_sinusoid_formula_pointwise") is None
    assert "no test function" in check_test_reference("tests/test_positional.py::test_sinusoid_formula")
    assert "is not `tests/" in check_test_reference("test_sinusoid_formula_pointwise")
    assert "no file" in check_test_reference("tests/test_positionals.py::test_sinusoid_formula_pointwise")

    good = "`notebooks/01_attention_and_positions.ipynb` › 5. Sinusoidal position encoding"
    assert check_notebook_reference(good) is None
    assert "has no heading" in check_notebook_reference(good.replace("5.", "6."))
    assert "no notebook" in check_notebook_reference(good.replace("01_", "11_"))


def test_a_guide_that_breaks_its_form_or_disagrees_is_caught():
    """A made-up row is reported by reference_problems, and a changed README by difference."""
    text = read(READMES[0])
    bad_row = ("| §2.1 | 位置编码 | x | x | `nn/positional.py:no_such_function` | "
               "`tests/test_positional.py::test_no_such_test` | `notebooks/03_forward_diffusion.ipynb` › 9. Nowhere |")
    broken = text.replace(END, bad_row + "\n" + END)
    rows, problems = parse_guide(broken, "broken")
    assert not problems
    found = reference_problems(rows[-1:], "broken")
    assert len(found) == 3 and all("broken, line" in problem for problem in found), found

    unformed = text.replace(END, "| §2.1 | 位置编码 | x | x | sinusoidal_position_encoding | — | — |\n" + END)
    assert any("not one backticked reference" in p for p in parse_guide(unformed, "unformed")[1])

    rows = parse_guide(text, "a")[0]
    swapped = text.replace("tests/test_clip_loss.py::test_clip_loss_3x3_by_hand",
                           "tests/test_clip_loss.py::test_clip_loss_gradcheck_float64", 1)
    assert swapped != text
    assert len(difference(rows, parse_guide(swapped, "b")[0], "a", "b")) == 1
