"""bench/gpu_check.py where there is no GPU: the one line it gives, and its table, which must hold every row
that ended (a row cut at its time limit, with its children, included) however the check goes on."""
import importlib.util
import os
import sys
import time

import psutil
import pytest
import torch

from conftest import ROOT, run_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA is told")
def test_without_cuda_the_check_says_so_in_one_line_and_writes_nothing(tmp_path):
    r = run_script("bench/gpu_check.py", f"--out_dir={tmp_path / 'out'}", f"--work_dir={tmp_path / 'work'}", timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU here (torch ") and "--device=cpu" in lines[0], r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed; only its exit status is left to collect
    except psutil.NoSuchProcess:
        return True


def test_a_row_cut_at_its_time_limit_is_in_the_table_with_its_children_ended_and_the_rows_after_it_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    table_path, pid_file = str(tmp_path / "table.md"), tmp_path / "grandchild.pid"

    def hangs(r):  # a child with a child of its own, as torchrun and safe_train.py have
        r.sh("sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait")

    def breaks(r):
        raise ValueError("a bug in a row")

    def passes(r):
        with open(table_path) as f:
            r.expect("| hangs | timeout |" in f.read(), "the cut row's line is not on disk yet")
        rc, out = r.sh(sys.executable, "-c", "print('after the others')")
        r.expect(rc == 0 and out.strip() == "after the others", out)
        return "ran"

    rows = [gpu_check.Row("hangs", 2, hangs), gpu_check.Row("breaks", 60, breaks), gpu_check.Row("passes", 60, passes)]
    table = gpu_check.Table(table_path, "title")
    said = []
    assert gpu_check.run_rows(rows, table, time.time() + 600, 1, str(tmp_path), said.append) == ["timeout", "FAIL", "pass"]
    assert gone(int(pid_file.read_text()))
    # out of time for the whole check: the row is in the table, not started
    assert gpu_check.run_rows([gpu_check.Row("late", 60, passes)], table, time.time() - 1, 1, str(tmp_path), said.append) == ["not run"]
    lines = open(table_path).read().splitlines()[4:]
    assert [line.split(" | ")[:2] for line in lines] == [["| hangs", "timeout"], ["| breaks", "FAIL"], ["| passes", "pass"], ["| late", "not run"]]
    assert "cut at 2 s" in lines[0] and "gpu_check error: ValueError: a bug in a row" in lines[1] and lines[2].endswith("| ran |")
    assert "$ sh -c sleep 300" in (tmp_path / "01-hangs.log").read_text()  # each row's commands and output, in its own log
