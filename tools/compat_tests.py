#!/usr/bin/env python3
"""Run esper-lite's own test suite against esper_fast (a compatibility harness).

This is a developer tool. It works on a checkout of esper-lite that *you* provide and
copies nothing into this project: the chosen test files (plus the support files they need:
``conftest.py`` files, ``__init__.py`` files, ``strategies.py``, ``fixtures/`` and
``pytest.ini``) are copied into a fresh temporary directory, and pytest runs there.

Modes
-----
``original``
    Run the copied tests against esper-lite itself (``PYTHONPATH=<esper-lite>/src``).
    This is the baseline.
``rewrite``
    Rewrite the copied tests so that every reference to the ``esper`` package points at
    ``esper_fast`` instead -- ``import esper.x``, ``import esper.x as y``,
    ``from esper import ...``, ``from esper.x import ...``, ``esper.x.y`` attribute paths,
    and string literals naming a dotted path such as ``"esper.kasmina.slot.SeedSlot"``
    (``monkeypatch.setattr`` / ``mock.patch`` targets, ``importlib.import_module``).
    esper-lite is *not* on the path. Tests of packages esper_fast does not provide
    (simic, tamiyo, nissa) fail with ImportError in this mode.
``install``
    Leave the tests unchanged, put ``<esper-lite>/src`` on the path, and load a small
    pytest plugin (``-p``, so before any conftest or test module is imported) that calls
    ``esper_fast.install_as_esper()``. After that ``esper.leyline``, ``esper.kasmina``,
    ``esper.tolaria``, ``esper.runtime`` and ``esper.utils`` are esper_fast's modules,
    while ``esper.simic``, ``esper.tamiyo`` and ``esper.nissa`` still load from esper-lite.

In ``rewrite`` and ``install`` modes the root of this project is put first on
``PYTHONPATH`` (so the working tree's esper_fast is the one tested); ``original`` mode
keeps it off.

Usage
-----
Run it with an interpreter that can import pytest, torch and esper_fast (and, for the
``original`` and ``install`` modes, pyyaml and pydantic, which esper-lite's nissa needs)::

    python tools/compat_tests.py --esper-lite /tmp/esper-lite --mode original \\
        --junit /tmp/compat/original.xml
    python tools/compat_tests.py --esper-lite /tmp/esper-lite --mode install --focus \\
        --junit /tmp/compat/install.xml --compare /tmp/compat/original.xml
    python tools/compat_tests.py --esper-lite /tmp/esper-lite --mode rewrite \\
        --files tests/test_seed_slot.py tests/kasmina --keep-tmp

``--files`` takes test files or directories, relative to the esper-lite checkout or to
its ``tests/`` folder (``tests/kasmina``, ``test_seed_slot.py``); a ``::`` suffix selects
single tests. ``--focus`` selects the files that exercise the training layer (the list
``FOCUS_FILES`` below). Without either, the whole suite runs. Arguments after ``--`` go
to pytest unchanged (``-- -k governor -x``).

Output: pytest's own output, then a per-file table of passed / failed / skipped / errors
(and xfailed where present; junit records an xpass as passed). With ``--compare OTHER.xml`` (a junit xml from another
run, e.g. the original), a side-by-side per-file table follows, then every test whose
outcome differs between the two runs. ``--summary-only FILE.xml`` prints the tables for an
existing junit xml without running anything.

Exit status: pytest's exit status (0 when everything passed; 1 when some test failed),
or 2 for a usage error.

Only the standard library and pytest are used.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tokenize
import xml.etree.ElementTree as ET
from collections import Counter, OrderedDict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: esper-lite test files that exercise the layer esper_fast replaces
#: (leyline, kasmina, tolaria, runtime, utils). Paths are relative to ``tests/``.
FOCUS_FILES = [
    "esper",
    "kasmina",
    "leyline",
    "test_leyline.py",
    "test_action_enums.py",
    "test_blueprint_registry.py",
    "test_host_protocol.py",
    "test_kasmina_telemetry.py",
    "test_lifecycle_fix.py",
    "test_lm_validation.py",
    "test_seed_slot.py",
    "test_task_spec.py",
    "test_tinystories.py",
    "test_tolaria_governor.py",
    "test_tolaria_trainer.py",
    "test_topology_guard.py",
    "properties/test_action_properties.py",
    "integration/test_blueprint_analytics.py",
    "integration/test_transformer_integration.py",
]

#: Packages of esper-lite that esper_fast replaces (install mode maps only these).
REPLACED_PACKAGES = ("leyline", "kasmina", "tolaria", "runtime", "utils")

OUTCOMES = ("passed", "failed", "skipped", "error", "xfailed")
# When one test id appears more than once in a junit file (a test that passed and then
# errored in teardown), the worse outcome wins.
_SEVERITY = {"passed": 0, "xfailed": 1, "skipped": 2, "failed": 3, "error": 4}

TEST_FILE_RE = re.compile(r"^test_.*\.py$")


# ---------------------------------------------------------------------------
# Import rewriting (mode "rewrite")
# ---------------------------------------------------------------------------

_DOTTED_ESPER = re.compile(r"esper(\.[A-Za-z_]\w*)*")
_STRING_PREFIX = re.compile(r"^([rRbBuUfF]*)('''|\"\"\"|'|\")")


def _rewrite_string_token(text: str, old: str, new: str) -> str | None:
    """Rewrite a one-line string literal whose whole content is a dotted ``esper`` path."""
    match = _STRING_PREFIX.match(text)
    if not match:
        return None
    prefix, quote = match.groups()
    if "b" in prefix.lower() or not text.endswith(quote) or len(text) < len(prefix) + 2 * len(quote):
        return None
    body = text[len(prefix) + len(quote) : len(text) - len(quote)]
    pattern = re.compile(re.escape(old) + r"(\.[A-Za-z_]\w*)*")
    if not pattern.fullmatch(body):
        return None
    return f"{prefix}{quote}{new}{body[len(old):]}{quote}"


def rewrite_source(source: str, old: str = "esper", new: str = "esper_fast") -> tuple[str, int]:
    """Point every reference to package ``old`` in Python ``source`` at package ``new``.

    Works on tokens, so formatting and comments are kept and nothing inside comments or
    ordinary strings changes. Rewritten:

    * a NAME token ``old`` that is not an attribute (not preceded by ``.``) and not a
      keyword argument (not followed by a lone ``=``): covers ``import esper.x [as y]``,
      ``from esper[.x] import ...`` and ``esper.x.y`` attribute paths;
    * a one-line string literal whose whole content is ``old`` or ``old.<dotted path>``:
      covers ``monkeypatch.setattr("esper.kasmina.slot.X", ...)``,
      ``mock.patch("esper....")``, ``importlib.import_module("esper.x")``.

    Returns the new source and the number of tokens changed.
    """
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    edits: list[tuple[int, int, int, str]] = []  # (row, col_start, col_end, replacement)
    significant = [t for t in tokens if t.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
    for index, tok in enumerate(significant):
        if tok.type == tokenize.NAME and tok.string == old:
            prev = significant[index - 1] if index > 0 else None
            nxt = significant[index + 1] if index + 1 < len(significant) else None
            if prev is not None and prev.type == tokenize.OP and prev.string == ".":
                continue
            if nxt is not None and nxt.type == tokenize.OP and nxt.string == "=":
                continue
            edits.append((tok.start[0], tok.start[1], tok.end[1], new))
        elif tok.type == tokenize.STRING and tok.start[0] == tok.end[0]:
            replacement = _rewrite_string_token(tok.string, old, new)
            if replacement is not None:
                edits.append((tok.start[0], tok.start[1], tok.end[1], replacement))
    if not edits:
        return source, 0
    lines = source.splitlines(keepends=True)
    for row, start, end, replacement in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:start] + replacement + line[end:]
    return "".join(lines), len(edits)


# ---------------------------------------------------------------------------
# Install mode plugin
# ---------------------------------------------------------------------------

INSTALL_PLUGIN = textwrap.dedent(
    '''\
    """Loaded with ``-p`` by compat_tests.py: maps esper.* onto esper_fast before any test imports."""
    import importlib
    import sys

    import pytest

    _REPLACED = {replaced!r}

    try:
        import esper_fast
    except Exception as exc:  # pragma: no cover - diagnostics only
        raise pytest.UsageError(f"compat_tests install mode: cannot import esper_fast: {{exc!r}}")

    _install = getattr(esper_fast, "install_as_esper", None)
    if _install is None:
        raise pytest.UsageError(
            "compat_tests install mode: esper_fast has no install_as_esper() "
            f"(esper_fast from {{getattr(esper_fast, '__file__', '?')}})"
        )
    _install()


    def _where(name):
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # report, do not fail: the tests will say more
            return f"import failed: {{exc!r}}"
        return f"{{getattr(module, '__name__', '?')}} ({{getattr(module, '__file__', '?')}})"


    def pytest_report_header(config):
        lines = ["compat_tests install mode: esper_fast.install_as_esper() was called"]
        for pkg in _REPLACED + ("simic", "tamiyo", "nissa"):
            lines.append(f"  esper.{{pkg}} -> {{_where('esper.' + pkg)}}")
        return lines
    '''
).format(replaced=REPLACED_PACKAGES)


# ---------------------------------------------------------------------------
# Copying the tests
# ---------------------------------------------------------------------------


def resolve_selection(tests_dir: Path, items: list[str]) -> tuple[set[Path], list[str]]:
    """Map ``--files`` items to (test files to copy, pytest arguments relative to the temp root)."""
    chosen: set[Path] = set()
    pytest_args: list[str] = []
    root = tests_dir.parent
    for item in items:
        path_part, sep, node = item.partition("::")
        # relative to the checkout first, then to its tests/ (an absolute path stays as it is)
        candidates = [root / path_part, tests_dir / path_part]
        target = next((c.resolve() for c in candidates if c.exists()), None)
        if target is None:
            raise SystemExit(f"compat_tests: no such test file or folder: {item}")
        try:
            rel = target.relative_to(tests_dir.resolve())
        except ValueError:
            raise SystemExit(f"compat_tests: {item} is not under {tests_dir}")
        if target.is_dir():
            files = [p for p in target.rglob("test_*.py") if "__pycache__" not in p.parts]
            if not files:
                raise SystemExit(f"compat_tests: no test_*.py under {item}")
            chosen.update(p.resolve().relative_to(tests_dir.resolve()) for p in files)
        else:
            chosen.add(rel)
        pytest_args.append((Path("tests") / rel).as_posix() + (sep + node if sep else ""))
    return chosen, pytest_args


def copy_tests(esper_lite: Path, dest: Path, chosen: set[Path], rewrite: bool) -> Counter:
    """Copy pytest.ini, the support files of tests/ and the chosen test files into ``dest``.

    Support files: every file under tests/ that is not a ``test_*.py`` module (conftest.py,
    __init__.py, strategies.py, fixtures/...). Returns rewrite counts per copied .py file.
    """
    src_tests = esper_lite / "tests"
    counts: Counter = Counter()
    ini = esper_lite / "pytest.ini"
    if ini.exists():
        shutil.copy2(ini, dest / "pytest.ini")
    for path in sorted(src_tests.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file() or path.suffix in (".pyc", ".pyo"):
            continue
        rel = path.relative_to(src_tests)
        if TEST_FILE_RE.match(path.name) and rel not in chosen:
            continue
        target = dest / "tests" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rewrite and path.suffix == ".py":
            text, n = rewrite_source(path.read_text(encoding="utf-8"))
            target.write_text(text, encoding="utf-8")
            counts[str(Path("tests") / rel)] = n
        else:
            shutil.copy2(path, target)
    return counts


# ---------------------------------------------------------------------------
# Junit parsing and tables
# ---------------------------------------------------------------------------


def _file_of(classname: str, name: str) -> tuple[str, str]:
    """(test file, test id) for a junit testcase; test modules are ``test_*`` names."""
    parts = classname.split(".") if classname else []
    if not parts:  # collection error: pytest puts the module path in ``name``
        parts, name = name.split("."), ""
    for i, part in enumerate(parts):
        if part.startswith("test_"):
            module = "/".join(parts[: i + 1]) + ".py"
            rest = parts[i + 1 :]
            test_id = "::".join([module, *rest, name] if name else [module, *rest])
            return module, test_id
    module = "/".join(parts) + ".py"
    return module, "::".join([module, name]) if name else module


_GENERIC_MESSAGES = ("collection failure", "failed on setup", "failed on teardown", "")


def _one_line(message: str, text: str) -> str:
    """A one-line reason: the junit message, or the last ``E   ...`` line when it is generic."""
    message = message.strip().splitlines()[0] if message.strip() else ""
    if any(message.startswith(g) for g in _GENERIC_MESSAGES if g) or not message:
        e_lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
        if e_lines:
            return (message + ": " if message else "") + e_lines[-1]
        tail = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if not message and tail:
            return tail[-1]
    return message


def parse_junit(path: Path) -> "OrderedDict[str, tuple[str, str, str]]":
    """Test id -> (file, outcome, one-line message) from a pytest junit xml."""
    results: "OrderedDict[str, tuple[str, str, str]]" = OrderedDict()
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        file, test_id = _file_of(case.get("classname", ""), case.get("name", ""))
        outcome, message = "passed", ""
        for child in case:
            tag = child.tag
            if tag == "failure":
                outcome = "failed"
            elif tag == "error":
                outcome = "error"
            elif tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
            else:
                continue
            message = _one_line(child.get("message") or "", child.text or "")
            break
        previous = results.get(test_id)
        if previous is None or _SEVERITY[outcome] > _SEVERITY[previous[1]]:
            results[test_id] = (file, outcome, message)
    return results


def per_file_counts(results) -> "OrderedDict[str, Counter]":
    table: "OrderedDict[str, Counter]" = OrderedDict()
    for file, outcome, _ in results.values():
        table.setdefault(file, Counter())[outcome] += 1
    return OrderedDict(sorted(table.items()))


def _columns(tables) -> list[str]:
    present = {o for table in tables for counts in table.values() for o in counts}
    return [o for o in OUTCOMES if o in present or o in ("passed", "failed", "skipped", "error")]


def format_table(results, title: str) -> str:
    table = per_file_counts(results)
    cols = _columns([table])
    width = max([len("file"), len("TOTAL")] + [len(f) for f in table])
    lines = [title, f"{'file':<{width}}  " + "  ".join(f"{c:>7}" for c in cols)]
    total: Counter = Counter()
    for file, counts in table.items():
        total.update(counts)
        lines.append(f"{file:<{width}}  " + "  ".join(f"{counts.get(c, 0):>7}" for c in cols))
    lines.append(f"{'TOTAL':<{width}}  " + "  ".join(f"{total.get(c, 0):>7}" for c in cols))
    return "\n".join(lines)


def _short(counts: Counter, cols) -> str:
    return "/".join(str(counts.get(c, 0)) for c in cols)


def format_comparison(base, other, base_name: str, other_name: str, only_files=None) -> str:
    """Side-by-side per-file table plus every test whose outcome differs."""
    if only_files is not None:
        base = OrderedDict((k, v) for k, v in base.items() if v[0] in only_files)
    tb, to = per_file_counts(base), per_file_counts(other)
    cols = ["passed", "failed", "skipped", "error"]
    files = sorted(set(tb) | set(to))
    width = max([len("file"), len("TOTAL")] + [len(f) for f in files])
    head = "/".join(c[0] for c in cols)  # p/f/s/e
    lines = [
        f"Comparison ({head} = {'/'.join(cols)})",
        f"{'file':<{width}}  {base_name:>16}  {other_name:>16}",
    ]
    sum_b, sum_o = Counter(), Counter()
    for file in files:
        cb, co = tb.get(file, Counter()), to.get(file, Counter())
        sum_b.update(cb)
        sum_o.update(co)
        mark = "" if _short(cb, cols) == _short(co, cols) else "  *"
        lines.append(f"{file:<{width}}  {_short(cb, cols):>16}  {_short(co, cols):>16}{mark}")
    lines.append(f"{'TOTAL':<{width}}  {_short(sum_b, cols):>16}  {_short(sum_o, cols):>16}")
    # A file that failed to import in one run shows as one "file" entry with an error and
    # none of its tests: report it once instead of once per missing test.
    broken = {
        side: {test_id: msg for test_id, (f, o, msg) in results.items() if test_id == f and o == "error"}
        for side, results in (("base", base), ("other", other))
    }
    diffs, grouped = [], []
    for file in files:
        for side, name, here, there in (("other", other_name, other, base), ("base", base_name, base, other)):
            if file in broken[side]:
                missing = sum(1 for tid, (f, _, _) in there.items() if f == file and tid not in here)
                grouped.append(f"  {file}: collection error in {name} ({missing} tests not run)  [{broken[side][file][:160]}]")
    for test_id in sorted(set(base) | set(other)):
        file = (base.get(test_id) or other.get(test_id))[0]
        if file in broken["base"] or file in broken["other"]:
            if test_id == file or test_id not in base or test_id not in other:
                continue
        ob = base[test_id][1] if test_id in base else "absent"
        oo = other[test_id][1] if test_id in other else "absent"
        if ob != oo:
            msg = other[test_id][2] if test_id in other else ""
            diffs.append((test_id, ob, oo, msg))
    lines.append("")
    lines.append(f"Files that did not import: {len(grouped)}")
    lines += grouped
    lines.append(f"Tests whose outcome differs: {len(diffs)}")
    for test_id, ob, oo, msg in diffs:
        lines.append(f"  {test_id}: {base_name}={ob} {other_name}={oo}" + (f"  [{msg[:160]}]" if msg else ""))
    return "\n".join(lines)


def format_failures(results) -> str:
    bad = [(tid, o, m) for tid, (_, o, m) in results.items() if o in ("failed", "error")]
    if not bad:
        return "No failures or errors."
    lines = [f"Failures and errors ({len(bad)}):"]
    lines += [f"  {o.upper():6} {tid}: {m[:200]}" for tid, o, m in bad]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def build_env(mode: str, esper_lite: Path, tmp: Path) -> dict:
    env = dict(os.environ)
    paths = [str(tmp)]
    if mode in ("rewrite", "install"):
        paths.append(str(PROJECT_ROOT))
    if mode in ("original", "install"):
        paths.append(str((esper_lite / "src").resolve()))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("HYPOTHESIS_PROFILE", "dev")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description="Run esper-lite's tests against esper-lite or esper_fast.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after -- are passed to pytest. See the module docstring for details.",
    )
    parser.add_argument("--esper-lite", type=Path, help="esper-lite checkout (with src/ and tests/)")
    parser.add_argument("--mode", choices=("original", "rewrite", "install"), default="original")
    parser.add_argument("--files", nargs="+", default=None, help="test files/folders (default: all)")
    parser.add_argument("--focus", action="store_true", help="only the training-layer test files")
    parser.add_argument("--junit", type=Path, default=None, help="where to write the junit xml")
    parser.add_argument("--compare", type=Path, default=None, help="junit xml of another run to compare with")
    parser.add_argument("--deselect", action="append", default=[], help="test id to deselect (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="wall-clock limit for pytest, seconds")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    parser.add_argument("--keep-tmp", action="store_true", help="keep (and print) the temporary directory")
    parser.add_argument("--show-failures", action="store_true", help="list every failure with its message")
    parser.add_argument("--summary-only", type=Path, default=None, metavar="XML",
                        help="print the tables for an existing junit xml and exit")
    args = parser.parse_args(argv)

    if args.summary_only is not None:
        results = parse_junit(args.summary_only)
        print(format_table(results, f"Per-file outcomes: {args.summary_only}"))
        if args.show_failures:
            print("\n" + format_failures(results))
        if args.compare is not None:
            print("\n" + format_comparison(parse_junit(args.compare), results, args.compare.stem, args.summary_only.stem))
        return 0

    if args.esper_lite is None:
        parser.error("--esper-lite is required")
    esper_lite = args.esper_lite.resolve()
    tests_dir = esper_lite / "tests"
    if not (tests_dir.is_dir() and (esper_lite / "src" / "esper").is_dir()):
        parser.error(f"{esper_lite} does not look like an esper-lite checkout (src/esper, tests/)")

    items = list(args.files or [])
    if args.focus:
        items += FOCUS_FILES
    if not items:
        items = ["tests"]
    chosen, pytest_targets = resolve_selection(tests_dir, items)

    tmp = Path(tempfile.mkdtemp(prefix=f"compat_{args.mode}_"))
    junit = (args.junit or tmp / "junit.xml").resolve()
    junit.parent.mkdir(parents=True, exist_ok=True)
    try:
        counts = copy_tests(esper_lite, tmp, chosen, rewrite=args.mode == "rewrite")
        cmd = [args.python, "-m", "pytest", *pytest_targets, "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={junit}"]
        if args.mode == "install":
            (tmp / "_compat_install_esper_fast.py").write_text(INSTALL_PLUGIN, encoding="utf-8")
            cmd += ["-p", "_compat_install_esper_fast"]
        for test_id in args.deselect:
            cmd += ["--deselect", test_id]
        cmd += extra
        if args.mode == "rewrite":
            changed = sum(counts.values())
            print(f"compat_tests: rewrote {changed} esper references in {sum(1 for n in counts.values() if n)} files")
        print(f"compat_tests: mode={args.mode} dir={tmp}")
        print("compat_tests: " + " ".join(cmd), flush=True)
        try:
            rc = subprocess.run(cmd, cwd=tmp, env=build_env(args.mode, esper_lite, tmp), timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"compat_tests: pytest ran past --timeout {args.timeout}s and was stopped", flush=True)
            rc = 124
        if not junit.exists():
            print("compat_tests: pytest wrote no junit xml", file=sys.stderr)
            return rc or 1
        results = parse_junit(junit)
        print()
        print(format_table(results, f"Per-file outcomes (mode={args.mode}, junit={junit})"))
        if args.show_failures:
            print("\n" + format_failures(results))
        if args.compare is not None:
            base = parse_junit(args.compare)
            ran_files = {file for file, _, _ in results.values()} | {
                str(Path("tests") / rel) for rel in chosen
            }
            print()
            print(format_comparison(base, results, args.compare.stem, f"this:{args.mode}", only_files=ran_files))
        return rc
    finally:
        if args.keep_tmp:
            print(f"compat_tests: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
