"""csrc/attention/window.h, compiled for the host and checked against brute force.

The CUDA kernels decide which key tiles a query block visits (and which query tiles a
key block visits in backward), which tiles need a per-element test, and each row's
allowed keys with the functions of that header. Without a GPU their device code cannot
run here, but these functions are plain integer arithmetic marked ``__host__
__device__``: a host C++ compiler builds the same header into a small driver, and every
answer is compared with the definition (query ``i`` sees key ``j`` iff ``i + shift -
left <= j <= i + shift + right``, -1 unbounded) over a grid of sizes, windows, both
alignments and tile shapes. The visited ranges must be exact: every allowed pair inside,
no tile without one (a tile skipped by mistake loses attention weight; a tile visited
needlessly is the cost sliding windows exist to avoid).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DRIVER = r"""
#include <cstdio>
#include "attention/window.h"
using namespace fastft::attention;
int main() {
  int sq, sk, left, right, bottom_right, bm, bn;
  while (std::scanf("%d %d %d %d %d %d %d", &sq, &sk, &left, &right, &bottom_right, &bm, &bn) == 7) {
    Window w;
    w.left = left;
    w.right = right;
    w.shift = bottom_right ? sk - sq : 0;
    std::printf("case\n");
    for (int i = 0; i < sq; ++i) {
      int first, last;
      keys_of_query(w, i, sk, first, last);
      std::printf("q %d %d %d\n", i, first, last);
    }
    for (int j = 0; j < sk; ++j) {
      int first, last;
      queries_of_key(w, j, sq, first, last);
      std::printf("k %d %d %d\n", j, first, last);
    }
    for (int m = 0; m < sq; m += bm) std::printf("m %d %d %d\n", m, key_begin(w, m, bn, sk), key_end(w, m, bm, sq, sk));
    for (int n = 0; n < sk; n += bn) std::printf("n %d %d %d\n", n, query_begin(w, n, bm, sq), query_end(w, n, bn, sq, sk));
    for (int m = 0; m < sq; m += bm)
      for (int n = 0; n < sk; n += bn) std::printf("t %d %d %d\n", m, n, int(tile_crosses_window(w, m, bm, n, bn)));
  }
  return 0;
}
"""

CASES = [  # (seq_q, seq_k, left, right, bottom_right, block_m, block_n)
    (sq, sk, left, right, br, bm, bn)
    for (sq, sk), (left, right), br, (bm, bn) in itertools.product(
        [(1, 1), (7, 7), (33, 70), (70, 33), (113, 113), (5, 130)],
        [(-1, -1), (-1, 0), (4, 0), (0, 0), (17, 3), (3, -1), (-1, 5), (64, 0), (200, 200)],
        [0, 1],
        [(64, 64), (32, 64), (16, 32)],
    )
]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    work = tmp_path_factory.mktemp("window")
    (work / "driver.cpp").write_text(DRIVER)
    binary = work / "driver"
    subprocess.run([compiler, "-std=c++17", "-O1", "-I", str(CSRC), str(work / "driver.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    return binary


def _allowed(i, j, shift, left, right):
    diagonal = i + shift
    return (right < 0 or j <= diagonal + right) and (left < 0 or j >= diagonal - left)


def _cases_output(binary):
    stdin = "\n".join(" ".join(map(str, case)) for case in CASES) + "\n"
    text = subprocess.run([str(binary)], input=stdin, capture_output=True, text=True, check=True).stdout
    blocks = text.split("case\n")[1:]
    assert len(blocks) == len(CASES)
    for case, block in zip(CASES, blocks):
        lines = [line.split() for line in block.strip().splitlines()]
        yield case, [(kind, *map(int, rest)) for kind, *rest in lines]


def test_window_functions_match_brute_force(driver):
    for (sq, sk, left, right, br, bm, bn), answers in _cases_output(driver):
        shift = sk - sq if br else 0
        allowed = {(i, j) for i in range(sq) for j in range(sk) if _allowed(i, j, shift, left, right)}
        where = f"seq_q={sq} seq_k={sk} window=({left}, {right}) bottom_right={br} blocks=({bm}, {bn})"
        for kind, *values in answers:
            if kind == "q":  # each query's keys: exactly the allowed ones, as [first, last]
                i, first, last = values
                assert {j for j in range(first, last + 1)} == {j for (qi, j) in allowed if qi == i}, (where, kind, values)
            elif kind == "k":
                j, first, last = values
                assert {i for i in range(first, last + 1)} == {i for (i, kj) in allowed if kj == j}, (where, kind, values)
            elif kind == "m":  # a query block visits exactly the key tiles holding an allowed pair
                m, begin, end = values
                assert begin % bn == 0 or begin >= end, (where, kind, values)
                visited = set(range(begin // bn, -(-end // bn))) if end > begin else set()
                needed = {j // bn for (i, j) in allowed if m <= i < m + bm}
                assert visited == needed, (where, kind, values, sorted(visited), sorted(needed))
            elif kind == "n":  # a key block visits exactly the query tiles holding an allowed pair
                n, begin, end = values
                assert begin % bm == 0 or begin >= end, (where, kind, values)
                visited = set(range(begin // bm, -(-end // bm))) if end > begin else set()
                needed = {i // bm for (i, j) in allowed if n <= j < n + bn}
                assert visited == needed, (where, kind, values, sorted(visited), sorted(needed))
            else:  # a tile skips the per-element window test only when all of it is inside
                m, n, crosses = values
                inside = all(_allowed(i, j, shift, left, right) for i in range(m, m + bm) for j in range(n, n + bn))
                assert bool(crosses) == (not inside), (where, kind, values)
