"""The GRPO objective's release of freed host memory (`tuneplex_automodel.heap`): a real
fragmented glibc heap, its pages handed back once the process has grown past the threshold,
and nothing done below it or on another device."""

from __future__ import annotations

import ctypes
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's"
)


def test_freed_blocks_go_back_to_the_os_past_the_threshold_only():
    torch = pytest.importorskip("torch")
    from tuneplex_automodel import heap

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    heap._floor[0] = None
    heap.release_freed(torch.device("cpu"))  # the first call only sets the floor
    start = heap._anonymous_resident()
    # 256 KiB blocks: below glibc's mmap threshold once it has risen, so they live in the heap
    blocks = [torch.ones(64 * 1024) for _ in range(1600)]  # 400 MiB
    del blocks[::2]  # every other block freed: holes no trim at the heap's top can return
    grown = heap._anonymous_resident()
    assert grown - start > 300 << 20

    heap.release_freed(torch.device("meta"))  # not the CPU: nothing happens
    assert heap._anonymous_resident() > grown - (32 << 20)

    heap.release_freed(torch.device("cpu"))
    after = heap._anonymous_resident()
    assert grown - after > 150 << 20  # the freed half went back
    assert abs(heap._floor[0] - after) < 1 << 20

    heap.release_freed(torch.device("cpu"))  # grown less than RELEASE_ABOVE since: no walk
    assert heap._floor[0] <= after + (1 << 20)
    del blocks
