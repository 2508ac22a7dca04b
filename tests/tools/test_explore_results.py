"""A race program cannot ignore what the call under test returned: a call that fails
raises KmmError (uncaught: the program's error); turned into its errno name
(``errno_name``) and never examined with ``k.expect``, it is reported by the explorer
as the program's assertion (kmm.workload.Kernel.expect / unexamined)."""

from __future__ import annotations

import pytest

from kmm.tools import explore as ex

IGNORES = '''
from kmm import errno_name

async def main(k):
    p = await k.process("main")
    a = await p.mmap(1 << 21)
    await errno_name(p.munmap(a + 4096, 0))          # EINVAL, not looked at
    return {"lost_bytes": len(await p.verify())}
'''

RAISES = '''
async def main(k):
    p = await k.process("main")
    a = await p.mmap(1 << 21)
    await p.munmap(a + 4096, 0)          # EINVAL, raised, not caught
'''

EXAMINES = '''
from kmm import errno_name

async def main(k):
    p = await k.process("main")
    a = await p.mmap(1 << 21)
    k.expect(await errno_name(p.munmap(a + 4096, 0)), "EINVAL", what="munmap of nothing")
    k.expect(await p.munmap(a, 4096), what="munmap")
    return {"lost_bytes": len(await p.verify())}
'''

WRONG = '''
from kmm import errno_name

async def main(k):
    p = await k.process("main")
    a = await p.mmap(1 << 21)
    k.expect(await errno_name(p.munmap(a + 4096, 0)), "ENOMEM", what="munmap of nothing")
'''


def _run(tmp_path, text):
    path = tmp_path / "prog.py"
    path.write_text(text)
    return ex.run_schedule(ex.Config(program=str(path)), "random", 1, {})


def test_an_ignored_failed_call_is_a_violation(tmp_path):
    out = _run(tmp_path, IGNORES)
    assert (out.kind, out.message) == (
        "assertion", "the program ignored failed calls: main: munmap -> EINVAL")


def test_an_uncaught_failed_call_is_the_programs_error(tmp_path):
    out = _run(tmp_path, RAISES)
    assert out.kind == "program-error"
    assert "KmmError: EINVAL: munmap(" in out.message and "prog.py" in out.message


def test_an_examined_failure_is_not(tmp_path):
    out = _run(tmp_path, EXAMINES)
    assert (out.kind, out.result) == (None, {"lost_bytes": 0})


def test_expect_asserts_the_allowed_results(tmp_path):
    out = _run(tmp_path, WRONG)
    assert out.kind == "assertion"
    assert "munmap of nothing failed with EINVAL" in out.message


@pytest.mark.parametrize("result", [-11, None])
def test_expect_refuses_a_negative_or_missing_result(result):
    from kmm.machine import Machine, MachineConfig
    from kmm.workload import Kernel
    k = Kernel(Machine(MachineConfig(memory=1 << 26, cpus=1)))
    with pytest.raises(AssertionError, match="split returned"):
        k.expect(result, what="split")
