"""The Ray executor (kmm/tools/executors.py) against the local ones: kmm sweep and kmm
explore give the same results on Ray tasks as on this process or a local pool.

One local Ray with 2 CPUs serves the whole module (starting one takes seconds); the
commands find it with ``--ray auto`` (a Ray already running in this process) and leave
it running. Skipped where the optional extra is not installed (pip install 'kmm[ray]';
.ci/run installs it).
"""

from __future__ import annotations

import json
import pathlib
import signal

import pytest

from kmm.tools import cli, executors
from kmm.tools import explore as ex
from tests.tools.test_explore import TOY  # the textbook lost update

ray = pytest.importorskip("ray")

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFILL = str(ROOT / "workloads" / "khugepaged_dontneed_refill_64.toml")

PICKY = '''
async def main(k):
    p = await k.process("main")
    a = await p.mmap(2 << 20)
    await p.touch(a, 2 << 20)
    if k.knob("enabled") == "always":
        raise RuntimeError("not always")
'''


@pytest.fixture(scope="module")
def local_ray():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="error")
    try:
        yield
    finally:
        ray.shutdown()
        for s, h in handlers.items():  # kmm's own handlers are installed per command
            signal.signal(s, h)


def _sweep(tmp_path, name, *extra) -> pathlib.Path:
    out = tmp_path / name
    rc = cli.main(["sweep", REFILL, "--set", "khugepaged.max_ptes_none=0,64,511",
                   "--set", "thp.enabled=always,madvise", "--seeds", "1..2",
                   "--mode", "random", "--out", str(out), "--quiet",
                   "--plot", "AnonHugePages", *extra])
    assert rc == 0
    return out


def test_sweep_on_ray_equals_the_local_pool(local_ray, tmp_path, capsys):
    """The same grid and seeds give byte-equal files on Ray tasks and a local pool (the
    host-checked figures are in tests/tools/test_sweep.py)."""
    local = _sweep(tmp_path, "local", "--jobs", "2")
    remote = _sweep(tmp_path, "ray", "--ray", "auto")
    assert "on 2 Ray workers" in capsys.readouterr().out
    for name in ("sweep.csv", "sweep.jsonl", "anon_huge_kb.png", "anon_huge_kb.svg"):
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    assert ray.is_initialized()  # a Ray the command did not start is left running


def test_a_failing_run_on_ray_is_reported_as_locally(local_ray, tmp_path):
    """A run's own exception travels back from the Ray task as its row."""
    prog = tmp_path / "picky.py"
    prog.write_text(PICKY)
    rows = {}
    for how, extra in (("local", []), ("ray", ["--ray", "auto"])):
        out = tmp_path / how
        assert cli.main(["sweep", str(prog), "--set", "thp.enabled=madvise,always",
                         "--out", str(out), "--quiet", *extra]) == 1
        rows[how] = (out / "sweep.jsonl").read_text()
    assert rows["local"] == rows["ray"]
    got = [json.loads(ln) for ln in rows["ray"].splitlines()]
    assert [(r["thp.enabled"], r["status"]) for r in got] == [
        ("always", "program-error"), ("madvise", "ok")]
    assert "not always" in got[0]["error"] and got[0]["report"]["regions"]


def test_explore_on_ray_has_the_same_first_failing_schedule(local_ray, tmp_path):
    """Ray tasks run ranges of schedules as pool workers do: the first violation is
    the lowest failing index, the same count of schedules up to it, on either."""
    path = tmp_path / "lost_update.py"
    path.write_text(TOY)
    cfg = ex.Config(program=str(path), mode="random", seed=1)
    one = ex.explore(cfg, 40)
    on_ray = ex.explore(cfg, 40, executor=executors.RayExecutor("auto"))
    assert on_ray.workers == 2
    assert one.first == on_ray.first is not None
    assert (one.schedules, one.violations) == (on_ray.schedules, on_ray.violations)
    every1 = ex.explore(cfg, 24, all_=True)
    every_ray = ex.explore(cfg, 24, all_=True, executor=executors.RayExecutor("auto"))
    assert every1.violations == every_ray.violations and every_ray.schedules == 24


def test_explore_ray_cli(local_ray, tmp_path, capsys):
    """kmm explore --ray auto: the same summary and failure file as --jobs 1."""
    path = tmp_path / "lost_update.py"
    path.write_text(TOY)
    outs = {}
    for how, extra in (("jobs", []), ("ray", ["--ray", "auto"])):
        out = tmp_path / f"{how}.jsonl"
        assert cli.main(["explore", str(path), "--schedules", "40", "--quiet",
                         "--out", str(out), *extra]) == 1
        text = capsys.readouterr().out
        outs[how] = [ln for ln in text.splitlines() if ln.startswith("first failing")]
        assert json.loads(out.read_text().splitlines()[0])["schedule"] >= 0
    assert outs["jobs"] == outs["ray"] and outs["ray"]


def test_unreachable_ray_address_is_one_line_exit_2(tmp_path, capsys):
    """A port nobody listens on (loopback): one line naming the address, exit 2,
    within the short connection timeout; nothing ran."""
    for argv in (["sweep", REFILL, "--ray", "127.0.0.1:1"],
                 ["explore", str(ROOT / "workloads" / "two_cpu_fault.py"), "--ray",
                  "127.0.0.1:1"],
                 ["sweep", REFILL, "--ray", "nonsense"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and argv[-1] in err[0], err
