"""The README's commands are the scripts' real commands.

Every `python SCRIPT.py ...` in the README (code blocks and inline code) goes through that script's
own argument parser, run as `__main__` with argparse stopped right after parsing: an unknown or
abbreviated flag, a bad value, a missing `train.py` kind fail the test; nothing is trained or generated. The README's
`python -c` snippets (a prompt cut from an episode, an actions file) run too, and what they write
must be readable by generate.py. All commands share one subprocess, so torch is imported once.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_commands():
    """(kind, argv) for every python command in the README: kind is "script" or "snippet"."""
    text = README.read_text()
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        lines += block.splitlines()
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    lines += re.findall(r"`([^`\n]*\bpython3? [^`\n]*)`", outside)
    commands = []
    for line in (line for line in lines if re.search(r"\bpython3? ", line)):
        tokens = shlex.split(line, comments=True)
        for i, tok in enumerate(tokens[:-1]):
            if tok in ("python", "python3") and tokens[i + 1] == "-c":
                commands.append(("snippet", tokens[i + 2 : i + 3]))
            elif tok in ("python", "python3") and tokens[i + 1].endswith(".py"):
                commands.append(("script", tokens[i + 1 :]))
    return commands


COMMANDS = readme_commands()
SCRIPTS = [argv for kind, argv in COMMANDS if kind == "script"]
SNIPPETS = [argv[0] for kind, argv in COMMANDS if kind == "snippet"]
# A command that must fail, run alongside: proof that the parse below rejects a flag no script has.
BOGUS = ["generate.py", "--frames", "10", "--no-such-flag", "1"]

DRIVER = textwrap.dedent(
    """
    import argparse, contextlib, io, json, os, runpy, sys
    root, commands, snippets, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    sys.path.insert(0, root)

    class Parsed(Exception):
        pass

    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        flags = [a.split("=")[0] for a in (sys.argv[1:] if args is None else args) if a.startswith("--")]
        for flag in flags:  # argparse would take an abbreviation (--gen-frame for --gen-frames)
            if flag not in self._option_string_actions:
                self.error(f"{flag} is not one of its flags as written")
        parse_args(self, args, namespace)  # exits 2 on an unknown flag or a bad value
        raise Parsed

    argparse.ArgumentParser.parse_args = parse_only
    results = []
    for argv in commands:
        sys.argv, err = list(argv), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                runpy.run_path(os.path.join(root, argv[0]), run_name="__main__")
            results.append(dict(ok=False, why="the script ran to the end without parsing its flags"))
        except Parsed:
            results.append(dict(ok=True))
        except SystemExit as e:
            results.append(dict(ok=False, why=f"exit {e.code}: {err.getvalue().strip()}"))
    argparse.ArgumentParser.parse_args = parse_args

    os.symlink(os.path.join(root, "sample_data"), "sample_data")
    before = set(os.listdir("."))
    for code in snippets:
        exec(code, {})
    import engine
    made = {}
    for name in sorted(set(os.listdir(".")) - before):
        if name.endswith(".pt"):
            made[name] = list(engine.read_actions(name, 6).shape)
        elif name.endswith((".npz", ".png")):
            made[name] = list(engine.read_prompt(name, 96).shape)
    json.dump(dict(results=results, made=made), open(out, "w"))
    """
)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """Run every README command's parse, and the snippets, in one subprocess -> its JSON report."""
    tmp = tmp_path_factory.mktemp("readme")
    out = tmp / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(ROOT), json.dumps(SCRIPTS + [BOGUS]), json.dumps(SNIPPETS), str(out)]
    try:
        p = subprocess.run(
            [sys.executable, "-c", DRIVER, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        pytest.fail("parsing the README's commands took over 300 s")
    assert p.returncode == 0 and out.exists(), f"the parse driver failed:\n{p.stderr[-3000:]}"
    report = json.loads(out.read_text())
    return dict(zip(map(tuple, SCRIPTS + [BOGUS]), report["results"])), report["made"]


def test_readme_shows_every_user_facing_script():
    shown = {argv[0] for argv in SCRIPTS}
    for script in ("generate.py", "evaluate.py", "play.py", "generate_dataset.py", "train.py", "bundle.py"):
        assert script in shown, f"the README shows no `python {script} ...` command"
    assert not [a for a in SCRIPTS if "..." in a], "a README command has a `...` placeholder: write it in full"


@pytest.mark.parametrize("argv", SCRIPTS, ids=[" ".join(a)[:80] for a in SCRIPTS])
def test_readme_command_parses(parsed, argv):
    result = parsed[0][tuple(argv)]
    assert result["ok"], f"README: `python {shlex.join(argv)}` does not parse: {result['why']}"


def test_an_unknown_flag_fails(parsed):
    result = parsed[0][tuple(BOGUS)]
    assert not result["ok"] and "--no-such-flag" in result["why"], result


def test_readme_snippets_make_a_prompt_and_actions(parsed):
    made = parsed[1]
    assert SNIPPETS, "the README shows no `python -c` snippet making a prompt or an actions file"
    prompts = [shape for name, shape in made.items() if not name.endswith(".pt")]
    actions = [shape for name, shape in made.items() if name.endswith(".pt")]
    assert prompts and actions, f"the README's snippets wrote {sorted(made)}; expected a prompt and an actions .pt"
    assert all(s[1:] == [96, 96, 3] for s in prompts), made
    assert all(len(s) == 1 and s[0] > 0 for s in actions), made
