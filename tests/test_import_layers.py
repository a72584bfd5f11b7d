"""The package's layering, as the import-linter contracts in pyproject.toml state it.

Each contract runs on its own (``lint-imports --contract ID``) so that a failure
names the rule that broke and prints import-linter's report: the chain of
imports (file and line) that breaks it. docs/ARCHITECTURE.md explains the rules.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

importlinter_api = pytest.importorskip(
    "importlinter.api", reason="import-linter is not installed (pip install -e .[test])")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
CONTRACTS = [c["id"] for c in importlinter_api.read_configuration(PYPROJECT)["contracts_options"]]
# the same interpreter as the tests, whatever `lint-imports` on PATH belongs to
LINT = ("import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())")


def test_the_contracts_are_there():
    # the rules of issue 15: layers, no cycles, the oracle only in the dispatch,
    # the inference runtime free of training code
    assert {"top-layers", "nn-layers", "arrays-layers", "no-cycles",
            "reference-only-in-dispatch", "runtime-without-training"} <= set(CONTRACTS)


@pytest.mark.parametrize("contract", CONTRACTS)
def test_contract_is_kept(contract):
    if contract == "runtime-without-training" and \
            importlib.util.find_spec("nimbus.nn.runtime") is None:
        pytest.skip("nimbus.nn.runtime does not exist yet: the contract holds trivially")
    out = subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--contract", contract, PYPROJECT],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "200"})       # unwrapped lines in the report
    if out.returncode != 0:
        pytest.fail(f"import-linter contract {contract!r} broken (exit {out.returncode}):\n"
                    f"{out.stdout[out.stdout.find('Contracts'):]}\n{out.stderr}", pytrace=False)
