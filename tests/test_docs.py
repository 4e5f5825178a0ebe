"""The docs keep their promises: every `python SCRIPT.py ...` command in README.md, RESULTS.md and notes/ names a
script that exists and flags its parser accepts (parsed, not run); every image link resolves to a file; every
`file.py:function` reference in notes/ names a function that exists; and no script's --help says "(default: None)"."""
import glob
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "RESULTS.md")] + sorted(
    glob.glob(os.path.join(ROOT, "notes", "*.md")))
COMMAND = re.compile(r"python ([\w]+)\.py((?: +[^\s`#|]+)*)")


def commands(text):
    """`python X.py ...` in inline code (which may wrap over lines) and in fenced blocks, without # comments."""
    found = []
    for block in re.findall(r"```\w*\n(.*?)```", text, flags=re.S):
        found += [line.split(" #")[0] for line in block.splitlines() if line.startswith("python ")]
    inline = re.sub(r"```\w*\n.*?```", "", text, flags=re.S)
    found += [span.replace("\n", " ") for span in re.findall(r"`(python [^`]+)`", inline)]
    return [match.groups() for line in found for match in [COMMAND.match(line.strip())] if match]


def doc_id(path):
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_command_names_a_script_and_flags_it_accepts(doc):
    found = commands(open(doc, encoding="utf-8").read())
    assert found or "notes" in doc, "no commands found: is the pattern still right?"
    for script, rest in found:
        assert os.path.isfile(os.path.join(ROOT, f"{script}.py")), f"{doc_id(doc)}: no {script}.py"
        module = importlib.import_module(script)
        try:
            module.parse_args(shlex.split(rest))
        except SystemExit:
            pytest.fail(f"{doc_id(doc)}: `python {script}.py{rest}` is refused by its parser")


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_image_link_resolves(doc):
    for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", open(doc, encoding="utf-8").read()):
        assert os.path.isfile(os.path.join(os.path.dirname(doc), link)), f"{doc_id(doc)}: missing {link}"


def test_every_code_reference_in_the_notes_exists():
    notes = sorted(glob.glob(os.path.join(ROOT, "notes", "*.md")))
    assert notes, "notes/ has no theory notes"
    references = 0
    for note in notes:
        for script, name in re.findall(r"\b(\w+)\.py:(\w+)", open(note, encoding="utf-8").read()):
            module = importlib.import_module(script)
            assert hasattr(module, name), f"{doc_id(note)}: {script}.py has no {name}"
            references += 1
    assert references >= 20


def test_the_extractor_finds_what_it_should():
    text = ("```\npython src.py --minutes 10   # ten minutes\n```\nthen `python evaluate.py a.npz\n--n 2000`, "
            "| `python sample_ddim.py --steps 50` |")
    assert commands(text) == [("src", " --minutes 10"), ("evaluate", " a.npz --n 2000"),
                              ("sample_ddim", " --steps 50")]


def help_text(module, capsys):
    """What `--help` prints, and for a script with tasks (edit.py) what every `TASK --help` prints too."""
    text = ""
    for argv in [["--help"]] + [[task, "--help"] for task in getattr(module, "TASKS", [])]:
        with pytest.raises(SystemExit):
            module.parse_args(argv)
        text += capsys.readouterr().out
    return text


@pytest.mark.parametrize("script", sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))))
def test_help_shows_the_defaults_but_never_none(script, capsys):
    """--help on every script; a flag whose default is None says in words what happens, not "(default: None)"."""
    text = " ".join(help_text(importlib.import_module(script), capsys).split())
    assert "(default: None)" not in text
    assert "(default: " in text or script == "ship_weights"  # its one flag's default is said in words


README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "RESULTS.md")
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "*.py")))


def sections(text):
    """{heading: text} of every "## " section (its "###" subsections included), code blocks and all."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {part.splitlines()[0]: "## " + part for part in parts}


def test_the_readme_is_read_in_one_sitting():
    """The README teaches: 14,000 characters in all and 1,600 per section; the measurements live in RESULTS.md."""
    text = open(README, encoding="utf-8").read()
    assert len(text) <= 14_000, f"README.md has {len(text)} characters (at most 14,000): move the log to RESULTS.md"
    chapters = {title: body for title, body in sections(text).items() if title.startswith("Chapter")}
    assert len(chapters) >= 6
    for title, body in sections(text).items():
        assert len(body) <= 1_600, f"README.md section '{title}' has {len(body)} characters (at most 1,600)"
    assert not re.search(r"^\|", text, re.M), "no tables in the README: they belong in RESULTS.md"


def test_results_opens_with_the_current_table_and_archives_the_rest():
    text = open(RESULTS, encoding="utf-8").read()
    assert len(text) <= 20_000, f"RESULTS.md has {len(text)} characters (at most 20,000): archive the history"
    table = text[text.index("| chapter |"):text.index("\n\n", text.index("| chapter |"))]
    for chapter in ["src.py", "src_cfg.py", "sample_ddim.py", "train_distilled.py", "train_dmd.py",
                    "src_classifier_free.py", "train_flow.py", "train_meanflow.py", "edit.py"]:
        assert f"python {chapter}" in table, f"RESULTS.md's table has no current number for {chapter}"
    assert "](RESULTS-archive.md)" in text and os.path.isfile(os.path.join(ROOT, "RESULTS-archive.md"))


ROUND = re.compile(r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|"
                   r"thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|\d+(?:st|nd|"
                   r"rd|th)?) rounds?\b|\brounds? \d+\b", re.I)


@pytest.mark.parametrize("path", [README, RESULTS] + sorted(glob.glob(os.path.join(ROOT, "notes", "*.md"))) + SCRIPTS,
                         ids=doc_id)
def test_no_issue_numbers_rounds_or_machine_paths(path, capsys, monkeypatch):
    """A reader cannot follow an issue number, a work round or this machine's folders: write `--data-root DIR`."""
    monkeypatch.delenv("MNIST_ROOT", raising=False)  # --help shows it as --data-root's default
    if path.endswith(".py"):
        module = importlib.import_module(os.path.basename(path)[:-3])
        text = (module.__doc__ or "") + help_text(module, capsys)
    else:
        text = open(path, encoding="utf-8").read()
    assert not re.search(r"\bissues? #?\d", text, re.I), f"{doc_id(path)} names an issue number"
    assert not ROUND.search(text), f"{doc_id(path)} says '{ROUND.search(text).group()}'"
    assert "shared/data" not in text and "/work/" not in text, f"{doc_id(path)} names a machine-local path"


def test_the_guards_above_can_fail():
    assert ROUND.search("as the nineteenth round found") and ROUND.search("round 3") and not ROUND.search("rounding")
    long_section = "## Chapter 9\n" + "x" * 1_601
    assert len(sections(long_section)["Chapter 9"]) > 1_600


def test_every_picture_is_shown_in_the_readme_or_a_note():
    shown = open(README, encoding="utf-8").read() + "".join(
        open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(ROOT, "notes", "*.md")))
    for picture in sorted(os.listdir(os.path.join(ROOT, "images"))):
        assert f"images/{picture}" in shown, f"images/{picture} is shown nowhere: show it in a note or delete it"
