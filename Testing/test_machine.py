"""The CPU check that stops a run asking for kernels the CPU lacks, before torch dies of an illegal instruction."""

from __future__ import annotations

import pytest

from MedVLSAM2Lib import cli, machine

ZEN3 = {"fpu", "sse4_2", "avx", "avx2", "fma"}
ZEN4 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize("capability", ["default", "avx2", "AVX2", ""])
def test_kernels_the_cpu_has_pass(monkeypatch, capability):
    monkeypatch.setattr(machine, "cpu_flags", lambda: ZEN3)
    assert machine.unsupported_capability(capability) is None


def test_avx512_on_a_cpu_without_it_names_the_missing_flags_and_the_choices(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: ZEN3 | {"avx512f"})
    message = machine.unsupported_capability("avx512")
    assert "lacks avx512bw, avx512dq, avx512vl." in message and "choose one of default, avx2." in message
    monkeypatch.setattr(machine, "cpu_flags", lambda: ZEN4)
    assert machine.unsupported_capability("avx512") is None


def test_unreadable_flags_never_block(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: None)
    assert machine.unsupported_capability("avx512") is None


def test_the_cli_refuses_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(machine, "cpu_flags", lambda: ZEN3)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert cli.main(["demo", "--output", str(tmp_path / "out")]) == 2
    assert "medvlsam2 demo: error: ATEN_CPU_CAPABILITY=avx512" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
