"""Run the test suite tier by tier (scripts/test.sh without arguments; CI through .ci/run).

Each tier of tests/conftest.py TIERS runs as its own pytest process (`-m TIER`), timed; then the
fast tiers (TWICE) run again with `--dtype auto` forced to the other type: bfloat16 where this
machine resolves auto to float32 (an AVX2 CPU: torch emulates bfloat16, slower, same rounding),
float32 where it resolves to bfloat16 (AVX512-BF16 / AMX CPUs, bfloat16 GPUs). So every machine
checks both types. Prints one line per run and a table of the times, checks that the tiers'
test counts add up to the whole suite, and exits non-zero if any run failed. A tier that
selects no test (pytest's exit code 5) is reported and is not a failure; no test at all is.

    python scripts/tiers.py                 # what CI runs
    python scripts/tiers.py unit parity     # only these tiers (and their second pass)
    SOFTPROMPT_TEST_SECOND_PASS=none python scripts/tiers.py   # no second pass
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIERS = ("unit", "parity", "server", "browser", "slow")  # as tests/conftest.py TIERS
TWICE = ("unit", "parity")
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
NO_TESTS = 5  # pytest's exit code when a selection holds no test


def machine_auto_dtype() -> str:
    """What --dtype auto resolves to here, without SOFTPROMPT_AUTO_DTYPE."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTPROMPT_AUTO_DTYPE"}
    code = "from softprompt.modeling.load import resolve_dtype; print(resolve_dtype('auto'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"tiers: could not resolve --dtype auto:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def collected() -> int:
    """How many tests the whole suite holds."""
    out = subprocess.run([*PYTEST, "--collect-only"], cwd=REPO, capture_output=True, text=True)
    m = re.search(r"(\d+) tests? collected", out.stdout)
    if out.returncode or not m:
        sys.exit(f"tiers: collecting the suite failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return int(m.group(1))


def counts(junit: Path) -> dict[str, int]:
    """passed / failed / skipped of one run, from its JUnit XML."""
    got = {"passed": 0, "failed": 0, "skipped": 0}
    if not junit.is_file():
        return got
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            got["failed"] += 1
        elif "skipped" in kinds:
            got["skipped"] += 1
        else:
            got["passed"] += 1
    return got


def run_tier(tier: str, forced: str | None, tmp: Path) -> dict:
    name = tier if forced is None else f"{tier} (auto={forced})"
    junit = tmp / f"{tier}-{forced or 'machine'}.xml"
    argv = [*PYTEST, "-m", tier, f"--junitxml={junit}"]
    if forced:
        argv.append(f"--auto-dtype={forced}")
    print(f"\n==== tier {name}: {' '.join(argv[2:])}", flush=True)
    t0 = time.monotonic()
    rc = subprocess.run(argv, cwd=REPO).returncode
    seconds = time.monotonic() - t0
    c = counts(junit)
    ok = rc == 0 or (rc == NO_TESTS and not any(c.values()))
    state = "no tests" if rc == NO_TESTS else ("ok" if ok else f"FAILED (pytest exit {rc})")
    print(f"==== tier {name}: {state} in {seconds:.0f} s", flush=True)
    return {"name": name, "tier": tier, "forced": forced, "rc": rc, "ok": ok, "s": seconds, **c}


def main(argv: list[str]) -> int:
    tiers = argv or list(TIERS)
    unknown = sorted(set(tiers) - set(TIERS))
    if unknown:
        sys.exit(f"tiers: unknown tier(s) {unknown}; the tiers are {', '.join(TIERS)}")
    machine = machine_auto_dtype()
    second = os.environ.get("SOFTPROMPT_TEST_SECOND_PASS", "other")
    other = {"bfloat16": "float32"}.get(machine, "bfloat16") if second == "other" else second
    print(f"tiers: --dtype auto resolves to {machine} here; second pass of {', '.join(TWICE)}: "
          f"{'none' if other == 'none' else 'auto=' + other}", flush=True)  # fmt: skip
    total = collected() if not argv else None
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="tiers-") as tmp:
        for tier in tiers:
            runs.append(run_tier(tier, None, Path(tmp)))
        if other != "none":
            for tier in (t for t in tiers if t in TWICE):
                runs.append(run_tier(tier, other, Path(tmp)))
    wall = time.monotonic() - started

    print("\n| tier run | seconds | passed | failed | skipped | |\n|---|---:|---:|---:|---:|---|")
    for r in runs:
        state = "ok" if r["ok"] else f"FAILED (exit {r['rc']})"
        state = "no tests" if r["rc"] == NO_TESTS else state
        print(f"| {r['name']} | {r['s']:.0f} | {r['passed']} | {r['failed']} | {r['skipped']} | {state} |")  # fmt: skip
    print(f"| all | {wall:.0f} | | | | |")
    problems = [f"tier {r['name']} failed (pytest exit {r['rc']})" for r in runs if not r["ok"]]
    first = [r for r in runs if r["forced"] is None]
    ran = sum(r["passed"] + r["failed"] + r["skipped"] for r in first)
    if total is not None and ran != total:
        problems.append(f"the tiers ran {ran} tests but the suite holds {total}: a test is in no tier or in two")  # fmt: skip
    if not any(r["passed"] + r["failed"] for r in runs):
        problems.append("no test ran")
    for p in problems:
        print(f"tiers: {p}", file=sys.stderr)
    passed = sum(r["passed"] for r in runs)
    failed = sum(r["failed"] for r in runs)
    skipped = sum(r["skipped"] for r in runs)
    print(f"total: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
