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


@pytest.mark.parametrize("script", sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))))
def test_help_shows_the_defaults_but_never_none(script, capsys):
    """--help on every script; a flag whose default is None says in words what happens, not "(default: None)"."""
    with pytest.raises(SystemExit):
        importlib.import_module(script).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: " in text and "(default: None)" not in text
