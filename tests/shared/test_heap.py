"""The start-up heap freeze: survivors leave the collector's generations, and come back on release."""

import gc

from splitserve.shared.heap import freeze_startup_heap, release_startup_heap


def test_freeze_moves_survivors_to_the_permanent_generation_and_release_returns_them():
    kept = [object() for _ in range(10)], {"a": [1, 2]}
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert not any(kept[1] is obj for obj in gc.get_objects())  # frozen objects are not tracked
    finally:
        release_startup_heap()
    assert gc.get_freeze_count() == 0
    assert any(kept[1] is obj for obj in gc.get_objects())
