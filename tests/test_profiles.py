import pytest
from hypothesis import given
from hypothesis import strategies as st

from m3rt import InputError
from m3rt.profiles import default_profiles, parse_profiles, select_profile


def test_default_profiles_cover_every_length_within_the_token_budget():
    profiles = default_profiles(token_budget=16384, max_length=8192)
    assert [(p.name, p.max_batch, p.max_sequence) for p in profiles] == [
        ("short", 256, 64),
        ("medium", 32, 512),
        ("long", 2, 8192),
    ]
    assert profiles[0].shapes == ((1, 2), (256, 32), (256, 64))
    for length in range(2, 8193):
        k = select_profile(profiles, length)
        assert profiles[k].covers(1, length)
        assert profiles[k].max_batch * profiles[k].max_sequence <= 16384


@given(st.integers(2, 8192))
def test_selection_picks_the_tightest_profile(length):
    profiles = parse_profiles("q=64x16,128x128,8x2048,1x8192")
    k = select_profile(profiles, length)
    assert profiles[k].min_sequence <= length <= profiles[k].max_sequence
    assert all(p.max_sequence < length for p in profiles[:k])


def test_short_max_length_drops_unneeded_profiles():
    assert [p.name for p in default_profiles(4096, max_length=512)] == ["short", "medium"]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("64", "BATCHxSEQUENCE"),
        ("0x64,1x8192", "batch must be"),
        ("4x512,8x256,1x8192", "sequence in"),
        ("64x64", "must reach max_length"),
        ("", "no profiles"),
        ("4x9000", "sequence in"),
    ],
)
def test_bad_profile_specs(spec, match):
    with pytest.raises(InputError, match=match):
        parse_profiles(spec)


def test_budget_below_max_length():
    with pytest.raises(InputError, match="below max_length"):
        default_profiles(token_budget=1000, max_length=8192)
