import pytest

from sliderquant.schedule import explicit_windows, single_layer_windows, sliding_windows


def test_thirty_layers_matches_algorithm_md():
    # docs/algorithm.md section 2, written out by hand.
    expected = [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3)]
    expected += [(a, a + 1) for a in range(3, 26)]
    expected += [(26, 27, 28, 29), (27, 28, 29), (28, 29), (29,)]
    got = sliding_windows(30)
    assert len(got) == 31
    assert got == expected


def test_each_intermediate_layer_optimised_twice():
    counts = {}
    for w in sliding_windows(30):
        for i in w:
            counts[i] = counts.get(i, 0) + 1
    assert all(counts[i] == 2 for i in range(4, 26))
    assert counts[0] == 4 and counts[29] == 4


def test_omniquant_and_cbq_special_cases():
    assert sliding_windows(5, shallow=0, deep=0, size=1, stride=1) == single_layer_windows(5)
    assert single_layer_windows(3) == [(0,), (1,), (2,)]
    assert sliding_windows(6, shallow=0, deep=0, size=2, stride=2) == [(0, 1), (2, 3), (4, 5)]


@pytest.mark.parametrize("n", range(1, 12))
def test_small_models_degrade_sensibly(n):
    windows = sliding_windows(n)
    covered = {i for w in windows for i in w}
    assert covered == set(range(n))
    assert windows[0] == (0,)
    assert windows[-1] == (n - 1,)
    assert len(set(windows)) == len(windows)
    starts = [w[0] for w in windows]
    assert starts == sorted(starts)
    for w in windows:
        assert list(w) == list(range(w[0], w[-1] + 1))


def test_five_layers_by_hand():
    assert sliding_windows(5) == [(0,), (0, 1), (1, 2), (2, 3), (3, 4), (4,)]
    assert sliding_windows(1) == [(0,)]
    assert sliding_windows(2) == [(0,), (0, 1), (1,)]


def test_explicit_windows_validation():
    assert explicit_windows([[0, 1], [1, 2]], 3) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="no window"):
        explicit_windows([[0, 1]], 3)
    with pytest.raises(ValueError, match="consecutive"):
        explicit_windows([[0, 2], [1]], 3)
    with pytest.raises(ValueError, match="outside"):
        explicit_windows([[0, 1, 2, 3]], 3)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, size=1, stride=2)
